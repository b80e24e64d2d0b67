//! The operating surface every service serves on its own port: `/healthz` (the process
//! runs), `/readyz` (it is doing its job; 503 with the reason otherwise) and `/metrics`
//! (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio_util::sync::CancellationToken;

/// Shared between a service's work loop and its HTTP endpoints.
pub struct ServiceState {
    pub service: &'static str,
    registry: Registry,
    /// None when ready; otherwise why not.
    not_ready: RwLock<Option<String>>,
}

impl ServiceState {
    pub fn new(service: &'static str, registry: Registry) -> Arc<Self> {
        Arc::new(Self { service, registry, not_ready: RwLock::new(Some("starting".into())) })
    }

    pub fn set_ready(&self) {
        if let Ok(mut r) = self.not_ready.write() {
            *r = None;
        }
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        if let Ok(mut r) = self.not_ready.write() {
            *r = Some(reason.into());
        }
    }

    pub fn not_ready_reason(&self) -> Option<String> {
        self.not_ready.read().map(|r| r.clone()).unwrap_or_else(|_| Some("poisoned".into()))
    }

    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

pub fn router(state: Arc<ServiceState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    match state.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.encode_metrics())
}

/// Binds `127.0.0.1`-or-all on `port` (0 picks a free one) and serves `router` until
/// `shutdown`. Returns the bound address.
pub async fn serve(
    bind: &str,
    port: u16,
    router: Router,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind((bind, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        let result =
            axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((addr, handle))
}
