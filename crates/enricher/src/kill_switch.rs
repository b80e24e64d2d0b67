//! The operator's kill switch: `controls.paused` for the pipeline, set through the
//! dlq-replayer's admin API. Every replica polls it every second, and each LLM call reads
//! it again in the statement that checks the call's lease right before the call starts
//! (`Store::gate`), so no call starts once the pause is committed. While it is on, calls
//! in flight finish, records wait where they are (nothing is dead-lettered), and
//! `/readyz` says why. It starts closed: no call starts before its first read.

use enrich_common::http::Condition;
use enrich_common::http::ServiceState;
use enrich_common::shutdown::Shutdown;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub struct KillSwitch {
    paused: watch::Sender<bool>,
}

impl Default for KillSwitch {
    /// Closed until the control row is first read.
    fn default() -> Self {
        Self { paused: watch::channel(true).0 }
    }
}

impl KillSwitch {
    /// Waits while enrichment is paused; false if shutdown came first.
    pub async fn wait_open(&self, shutdown: &Shutdown) -> bool {
        let mut rx = self.paused.subscribe();
        loop {
            if !*rx.borrow_and_update() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = rx.changed() => if changed.is_err() { return true },
            }
        }
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// A call's gate read the pause before the poller did: close now, so the call waits
    /// in `wait_open` until the poller reads the switch open again.
    pub fn saw_paused(&self) {
        self.paused.send_replace(true);
    }

    /// Polls the control row every `every` until shutdown.
    pub fn spawn(
        self: &Arc<Self>,
        pool: PgPool,
        pipeline: String,
        state: Arc<ServiceState>,
        gauge: prometheus_client::metrics::gauge::Gauge,
        every: Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let switch = self.clone();
        tokio::spawn(async move {
            // Nothing is known before the first read: the switch is closed, silently.
            let mut known: Option<bool> = None;
            loop {
                let row: Result<Option<(bool, Option<String>)>, _> =
                    sqlx::query_as("SELECT paused, reason FROM controls WHERE pipeline = $1")
                        .bind(&pipeline)
                        .fetch_optional(&pool)
                        .await;
                match row {
                    Ok(row) => {
                        let (paused, reason) = row.unwrap_or((false, None));
                        if known.is_none() && !paused {
                            tracing::debug!("kill switch read: enrichment is not paused");
                        } else if Some(paused) != known {
                            let reason = reason.unwrap_or_else(|| "no reason given".into());
                            if paused {
                                tracing::warn!(%reason, "enrichment paused by the operator: no new LLM call starts");
                                state.set_condition(
                                    Condition::Paused,
                                    Some(format!("enrichment paused by the operator: {reason}")),
                                );
                            } else {
                                tracing::info!("enrichment resumed by the operator");
                                state.set_condition(Condition::Paused, None);
                            }
                            gauge.set(i64::from(paused));
                        }
                        known = Some(paused);
                        // Also after a gate closed it (`saw_paused`) and the pause ended.
                        if paused != switch.is_paused() {
                            switch.paused.send_replace(paused);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot read the kill switch; keeping its last state"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
    }
}
