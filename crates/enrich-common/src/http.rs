//! The operating surface every service serves on its own port: `/healthz` (the process
//! runs), `/readyz` (it is doing its job; 503 with the reason otherwise) and `/metrics`
//! (Prometheus text format).
//!
//! Every HTTP server of the product goes through [`serve`], which holds each client to
//! `[http]`: a whole request head within `header_read_timeout_ms` (or the connection is
//! closed), an answer within `request_timeout_ms` (or 503), at most `max_connections`
//! connections at once (more wait in the listen backlog).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;

/// Shared between a service's work loop and its HTTP endpoints.
///
/// Readiness is a set of named conditions, each with its reason: the stage is ready when
/// none holds. Separate causes (work failing, an open circuit breaker, the DLQ limit)
/// come and go independently, so one clearing never hides another.
pub struct ServiceState {
    pub service: &'static str,
    registry: Registry,
    not_ready: RwLock<BTreeMap<Condition, String>>,
}

/// A cause of unreadiness; each holds with its own reason, and clears on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    /// The stage has not finished starting.
    Starting,
    /// The stage's work fails (`set_not_ready`): a batch, a transaction, a commit.
    Work,
    /// The operator paused enrichment (kill switch).
    Paused,
    /// The LLM endpoint's circuit breaker is open.
    LlmBreaker,
    /// A database write of the call path is being retried.
    Database,
    /// An LLM budget window is spent.
    Budget,
    /// The DLQ limit is reached: dead letters are held.
    DlqLimit,
}

impl ServiceState {
    pub fn new(service: &'static str, registry: Registry) -> Arc<Self> {
        let not_ready = BTreeMap::from([(Condition::Starting, "starting".to_string())]);
        Arc::new(Self { service, registry, not_ready: RwLock::new(not_ready) })
    }

    /// Started, and the work succeeds (again).
    pub fn set_ready(&self) {
        if let Ok(mut r) = self.not_ready.write()
            && !r.is_empty()
        {
            r.remove(&Condition::Starting);
            r.remove(&Condition::Work);
        }
    }

    /// The work fails, for this reason.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.set_condition(Condition::Work, Some(reason.into()));
    }

    /// Sets (Some) or clears (None) a named cause of unreadiness.
    pub fn set_condition(&self, name: Condition, reason: Option<String>) {
        if let Ok(mut r) = self.not_ready.write() {
            match reason {
                Some(reason) => {
                    r.insert(name, reason);
                }
                None => {
                    r.remove(&name);
                }
            }
        }
    }

    /// None when ready; otherwise every reason, "; "-separated.
    pub fn not_ready_reason(&self) -> Option<String> {
        match self.not_ready.read() {
            Ok(r) if r.is_empty() => None,
            Ok(r) => Some(r.values().cloned().collect::<Vec<_>>().join("; ")),
            Err(_) => Some("poisoned".into()),
        }
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

/// Binds `bind` on `port` (0 picks a free one) and serves `router` until `shutdown`,
/// within `limits`. Returns the bound address.
pub async fn serve(
    bind: &str,
    port: u16,
    router: Router,
    limits: HttpSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind((bind, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve_on(listener, router, limits, shutdown))))
}

/// Serves `router` on `listener` within `limits` until `shutdown`; then stops accepting,
/// lets each connection finish the request it is answering, and returns once all are
/// closed.
pub async fn serve_on(listener: TcpListener, router: Router, limits: HttpSettings, shutdown: CancellationToken) {
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let router = router.layer(axum::middleware::from_fn(move |request, next: axum::middleware::Next| async move {
        match tokio::time::timeout(request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response(),
        }
    }));
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms));
    loop {
        // A free slot first: at the limit, new connections wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slot else { break };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: pass, without spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    // Every slot back: every connection has closed.
    let _ = slots.acquire_many(max as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cause_clearing_does_not_hide_another() {
        let s = ServiceState::new("t", Registry::default());
        assert_eq!(s.not_ready_reason().as_deref(), Some("starting"));
        s.set_ready();
        assert_eq!(s.not_ready_reason(), None);
        s.set_condition(Condition::LlmBreaker, Some("breaker open".into()));
        s.set_not_ready("database down");
        s.set_ready();
        assert_eq!(s.not_ready_reason().as_deref(), Some("breaker open"), "work recovered, the breaker is still open");
        s.set_condition(Condition::LlmBreaker, None);
        assert_eq!(s.not_ready_reason(), None);
    }
}
