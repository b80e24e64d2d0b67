//! dlq-replayer: will inspect and replay dead letters through an admin API. For now it
//! starts, serves `/healthz`, `/readyz` and `/metrics`, and stops on SIGTERM.

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
