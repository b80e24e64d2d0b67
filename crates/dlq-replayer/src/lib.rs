//! dlq-replayer: will inspect and replay dead letters through an admin API. For now it
//! starts, serves `/healthz`, `/readyz` and `/metrics`, and stops on SIGTERM; and
//! `dlq-replayer setup` prepares a deployment (migrations, topics) and exits.

use enrich_common::Settings;
use enrich_common::http::{self, ServiceState};
use enrich_common::shutdown::Shutdown;

pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = prometheus_client::registry::Registry::default();
    let state = ServiceState::new("dlq-replayer", registry);
    let (addr, task) =
        http::serve("0.0.0.0", settings.dlq_replayer.http_port, http::router(state.clone()), shutdown).await?;
    tracing::info!(%addr, "health and metrics endpoints listening");
    state.set_ready();
    task.await?;
    Ok(())
}

/// `dlq-replayer setup`: applies the migrations and creates every topic of the pipeline
/// (sources included, when `kafka.create_topics` is on), then returns. Idempotent.
pub async fn setup(settings: Settings) -> anyhow::Result<()> {
    let pool = enrich_common::db::connect(&settings.database).await?;
    enrich_common::db::migrate(&pool).await?;
    let t = &settings.topics;
    let mut topics = settings.source_topics();
    topics.extend([t.requests.as_str(), t.retry.as_str(), t.results.as_str(), t.output.as_str(), t.dlq.as_str()]);
    enrich_common::kafka::ensure_topics(&settings, &topics).await?;
    tracing::info!(?topics, "database migrated and topics present");
    Ok(())
}
