//! dlq-replayer: the operator's tool for dead letters. An admin HTTP API (list, show with
//! the key's history, replay by id or filter with a dry run, discard; bearer tokens for
//! reads and mutating calls) served beside `/healthz`, `/readyz` and `/metrics`; a CLI that talks to
//! it (`dlq-replayer list|show|replay|discard`); and `dlq-replayer setup`, which prepares
//! a deployment (migrations, topics) and exits. The operator's console (`console`) is
//! served under `/ui` on the same port.

pub mod access;
pub mod api;
pub mod cli;
pub mod console;
pub mod grpc;
pub mod incoming;
pub mod replay;
pub mod retention;

use enrich_common::Settings;
use enrich_common::http::{self, ServiceState};
use enrich_common::shutdown::Shutdown;
use std::sync::Arc;

pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = prometheus_client::registry::Registry::default();
    let state = ServiceState::new("dlq-replayer", registry);
    let pool = enrich_common::db::connect(&settings.database, "dlq-replayer").await?;
    let producer = enrich_common::kafka::producer(&settings, "dlq-replayer")?;
    let access = access::Access::from_settings(&settings.dlq_replayer);
    access.announce();
    retention::spawn(
        pool.clone(),
        settings.pipeline.name.clone(),
        settings.audit.retention_days,
        std::time::Duration::from_secs(settings.audit.retention_interval_secs.max(1)),
        shutdown.clone(),
    );
    let port = settings.dlq_replayer.http_port;
    let grpc_port = settings.dlq_replayer.grpc_port;
    let http_limits = settings.http;
    let api_console_enabled = settings.ui.enabled;
    let api = Arc::new(api::Api { replayer: Arc::new(replay::Replayer { settings, pool, producer }), access });
    let grpc_listener = tokio::net::TcpListener::bind(("0.0.0.0", grpc_port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 0.0.0.0:{grpc_port} (dlq_replayer.grpc_port): {e}"))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let mut router = http::router(state.clone()).merge(api::routes(api.clone()));
    if api.replayer.settings.ui.enabled {
        router = router.merge(console::routes(api.clone(), shutdown.clone()));
    }
    let (addr, task) = http::serve("0.0.0.0", port, router, http_limits, shutdown.clone()).await?;
    let connections = incoming::incoming(grpc_listener, http_limits, shutdown.clone());
    let grpc = tonic::transport::Server::builder()
        .timeout(std::time::Duration::from_millis(http_limits.request_timeout_ms))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(grpc::service(api))
        .serve_with_incoming_shutdown(connections, async move { shutdown.cancelled().await });
    tracing::info!(%addr, %grpc_addr, "admin API (HTTP and gRPC) and health endpoints listening");
    if api_console_enabled {
        tracing::info!(console = %format!("http://{addr}/ui"), "operator's console listening");
    }
    state.set_ready();
    let (served, grpc_served) = tokio::join!(task, grpc);
    served?;
    grpc_served.map_err(|e| anyhow::anyhow!("gRPC admin API: {e}"))?;
    Ok(())
}

/// `dlq-replayer setup`: applies the migrations and creates every topic of the pipeline
/// (sources included, when `kafka.create_topics` is on), then returns. Idempotent.
pub async fn setup(settings: Settings) -> anyhow::Result<()> {
    let pool = enrich_common::db::connect(&settings.database, "dlq-replayer").await?;
    enrich_common::db::migrate(&pool).await?;
    let t = &settings.topics;
    let mut topics = settings.source_topics();
    topics.extend([t.requests.as_str(), t.retry.as_str(), t.results.as_str(), t.output.as_str(), t.dlq.as_str()]);
    enrich_common::kafka::ensure_topics(&settings, &topics).await?;
    tracing::info!(?topics, "database migrated and topics present");
    Ok(())
}
