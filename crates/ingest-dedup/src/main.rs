#[tokio::main]
async fn main() -> std::process::ExitCode {
    enrich_common::cli::run_service("ingest-dedup", ingest_dedup::run).await
}
