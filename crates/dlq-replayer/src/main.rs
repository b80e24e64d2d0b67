#[tokio::main]
async fn main() -> anyhow::Result<()> {
    enrich_common::telemetry::init("dlq-replayer");
    let settings = enrich_common::cli::load_settings()?;
    dlq_replayer::run(settings, enrich_common::shutdown::on_signals()).await
}
