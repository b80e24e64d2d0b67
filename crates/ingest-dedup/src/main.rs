#[tokio::main]
async fn main() -> anyhow::Result<()> {
    enrich_common::telemetry::init("ingest-dedup");
    let settings = enrich_common::cli::load_settings()?;
    ingest_dedup::run(settings, enrich_common::shutdown::on_signals()).await
}
