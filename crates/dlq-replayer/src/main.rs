#[tokio::main]
async fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("setup") {
        return enrich_common::cli::run_once("dlq-replayer", dlq_replayer::setup).await;
    }
    enrich_common::cli::run_service("dlq-replayer", dlq_replayer::run).await
}
