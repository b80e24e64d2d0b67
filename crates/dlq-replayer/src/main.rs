#[tokio::main]
async fn main() -> std::process::ExitCode {
    enrich_common::cli::run_service("dlq-replayer", dlq_replayer::run).await
}
