//! What every stage does the same way: serve its operating endpoints, connect to the
//! database, create its topics, count what it consumes and dead-letters, and retry a
//! failed batch with backoff until it succeeds or the service stops.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Settings, Stage};
use crate::error::chain;
use crate::http::{self, ServiceState};
use crate::shutdown::Shutdown;
use crate::{db, kafka};

pub type Labels = Vec<(&'static str, String)>;

/// Metrics every stage has.
#[derive(Clone, Default)]
pub struct StageMetrics {
    /// Records read from Kafka, per topic.
    pub consumed: Family<Labels, Counter>,
    /// Records written to Kafka and acknowledged, per topic.
    pub produced: Family<Labels, Counter>,
    /// Records between the consumer's position and the end of each assigned partition.
    pub consumer_lag: Family<Labels, prometheus_client::metrics::gauge::Gauge>,
    /// Records sent to the DLQ, per reason.
    pub dead_letters: Family<Labels, Counter>,
    /// Batches that failed and were retried.
    pub batch_retries: Counter,
    /// 1 while the DLQ limit holds records back.
    pub dlq_limit_tripped: prometheus_client::metrics::gauge::Gauge,
}

impl StageMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("enrich_records_consumed", "Records read from Kafka, per topic", m.consumed.clone());
        registry.register("enrich_records_produced", "Records written to Kafka, per topic", m.produced.clone());
        registry.register(
            "enrich_consumer_lag",
            "Records from the consumer's position to the end of the partition",
            m.consumer_lag.clone(),
        );
        registry.register("enrich_dead_letters", "Records sent to the DLQ, by reason", m.dead_letters.clone());
        registry.register("enrich_batch_retries", "Batches that failed and were retried", m.batch_retries.clone());
        registry.register(
            "enrich_dlq_limit_tripped",
            "1 while the DLQ limit holds records back",
            m.dlq_limit_tripped.clone(),
        );
        m
    }

    pub fn consumed(&self, topic: &str) {
        inc(&self.consumed, "topic", topic);
    }

    pub fn produced(&self, topic: &str, n: u64) {
        if n > 0 {
            self.produced.get_or_create(&vec![("topic", topic.to_string())]).inc_by(n);
        }
    }

    pub fn dead_lettered(&self, reason: &str) {
        inc(&self.dead_letters, "reason", reason);
    }
}

/// Adds one to the series of `family` labelled `label=value`.
pub fn inc(family: &Family<Labels, Counter>, label: &'static str, value: &str) {
    family.get_or_create(&vec![(label, value.to_string())]).inc();
}

/// A started stage: endpoints up, database connected (and migrated), topics present.
pub struct StageRuntime {
    pub stage: Stage,
    pub state: Arc<ServiceState>,
    pub pool: PgPool,
    pub metrics: StageMetrics,
    /// Where the health and metrics endpoints listen (the port is this process's own).
    pub addr: std::net::SocketAddr,
    http: tokio::task::JoinHandle<()>,
}

impl StageRuntime {
    /// `register` adds the stage's own metrics to the registry and returns them.
    pub async fn start<M>(
        settings: &Settings,
        stage: Stage,
        port: u16,
        topics: &[&str],
        shutdown: &Shutdown,
        register: impl FnOnce(&mut Registry) -> M,
    ) -> anyhow::Result<(Self, M)> {
        let mut registry = Registry::default();
        let metrics = StageMetrics::register(&mut registry);
        let own = register(&mut registry);
        let state = ServiceState::new(stage.as_str(), registry);
        let (addr, http) =
            http::serve("0.0.0.0", port, http::router(state.clone()), settings.http, shutdown.clone()).await?;
        tracing::info!(%addr, "health and metrics endpoints listening");
        let pool = db::connect(&settings.database, stage.as_str()).await?;
        kafka::ensure_topics(settings, topics).await?;
        Ok((Self { stage, state, pool, metrics, addr, http }, own))
    }

    /// See [`until_done`].
    pub async fn until_done<F, Fut>(&self, shutdown: &Shutdown, max_backoff: Duration, attempt: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        until_done(&self.state, &self.metrics, shutdown, max_backoff, attempt).await
    }

    /// Stops the endpoints and waits for them.
    pub async fn finish(self, shutdown: &Shutdown) {
        shutdown.cancel();
        let _ = self.http.await;
    }
}

/// Runs `attempt` until it succeeds (true) or shutdown is requested (false). Between
/// failures the stage reports not-ready with the cause and backs off, doubling up to
/// `max_backoff`. `attempt` must be idempotent: it may run again from the start.
pub async fn until_done<F, Fut>(
    state: &ServiceState,
    metrics: &StageMetrics,
    shutdown: &Shutdown,
    max_backoff: Duration,
    mut attempt: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(()) => {
                state.set_ready();
                return true;
            }
            Err(e) => {
                let cause = chain(e.as_ref());
                if shutdown.is_cancelled() {
                    tracing::info!(error = %cause, "work left unfinished at shutdown; it will be read again");
                    return false;
                }
                metrics.batch_retries.inc();
                tracing::error!(error = %cause, retry_in_ms = backoff.as_millis() as u64, "work failed; retrying");
                state.set_not_ready(format!("failing: {cause}"));
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}
