#[tokio::main]
async fn main() -> anyhow::Result<()> {
    enrich_common::telemetry::init("enricher");
    let settings = enrich_common::cli::load_settings()?;
    enricher::run(settings, enrich_common::shutdown::on_signals()).await
}
