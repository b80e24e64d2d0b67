#[tokio::main]
async fn main() -> std::process::ExitCode {
    enrich_common::cli::run_service("enricher", enricher::run).await
}
