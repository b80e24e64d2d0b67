#[tokio::main]
async fn main() -> anyhow::Result<()> {
    enrich_common::telemetry::init("publisher");
    let settings = enrich_common::cli::load_settings()?;
    publisher::run(settings, enrich_common::shutdown::on_signals()).await
}
