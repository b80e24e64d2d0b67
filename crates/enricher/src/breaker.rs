//! The circuit breaker of the LLM endpoint. After `threshold` consecutive failures of
//! the endpoint (transient or outage classes) it opens: no call starts, records wait
//! (their attempts are refunded, nothing is dead-lettered), partitions fill and pause,
//! offsets stay where they are. After `open_for` one probe call goes through
//! (half-open); its success closes the breaker, its failure opens it again.

use enrich_common::shutdown::Shutdown as CancellationToken;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// What `admit` granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed: call.
    Call,
    /// The breaker is half-open and this is the one probe.
    Probe,
}

/// A change the caller reports to the operator (readiness, logs, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

struct Inner {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold,
            open_for,
            inner: Mutex::new(Inner { consecutive_failures: 0, open_until: None, probing: false }),
        }
    }

    pub fn is_open(&self) -> bool {
        self.inner.lock().map(|i| i.open_until.is_some()).unwrap_or(false)
    }

    /// Waits until a call may start; None if shutdown came first.
    pub async fn admit(&self, shutdown: &CancellationToken) -> Option<Admission> {
        loop {
            let wait = {
                let Ok(mut inner) = self.inner.lock() else { return Some(Admission::Call) };
                match inner.open_until {
                    None => return Some(Admission::Call),
                    Some(until) => {
                        let now = Instant::now();
                        if now >= until && !inner.probing {
                            inner.probing = true;
                            return Some(Admission::Probe);
                        }
                        // Re-check at the end of the open period, or soon while a probe runs.
                        until.saturating_duration_since(now).max(Duration::from_millis(50)).min(Duration::from_secs(1))
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// An admitted call did not happen (the key needed none): frees the probe slot.
    pub fn unused(&self, admission: Admission) {
        if admission == Admission::Probe
            && let Ok(mut inner) = self.inner.lock()
        {
            inner.probing = false;
        }
    }

    /// The endpoint answered (even with a permanent error: it is up). Only the probe's
    /// answer closes an open breaker: a call admitted before it opened may answer after,
    /// and says nothing about the endpoint now.
    pub fn success(&self, admission: Admission) -> Option<Transition> {
        let Ok(mut inner) = self.inner.lock() else { return None };
        inner.consecutive_failures = 0;
        if admission != Admission::Probe {
            return None;
        }
        inner.probing = false;
        inner.open_until.take().map(|_| Transition::Closed)
    }

    /// The endpoint failed (timeout, connection, 429, 5xx, 401/403). Returns Opened when
    /// this failure opened (or re-opened) the breaker.
    pub fn failure(&self, admission: Admission) -> Option<Transition> {
        let Ok(mut inner) = self.inner.lock() else { return None };
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let was_open = inner.open_until.is_some();
        if admission == Admission::Probe {
            inner.probing = false;
            inner.open_until = Some(Instant::now() + self.open_for);
            return None;
        }
        if !was_open && inner.consecutive_failures >= self.threshold {
            inner.open_until = Some(Instant::now() + self.open_for);
            return Some(Transition::Opened);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_once_and_closes_on_success() {
        let b = Breaker::new(3, Duration::from_secs(5));
        let stop = CancellationToken::new();
        assert_eq!(b.failure(Admission::Call), None);
        assert_eq!(b.failure(Admission::Call), None);
        assert_eq!(b.failure(Admission::Call), Some(Transition::Opened));
        assert!(b.is_open());
        // A call admitted before it opened and answering late does not close it.
        assert_eq!(b.success(Admission::Call), None);
        assert!(b.is_open());

        // While open, admission waits for the open period, then lets one probe through.
        let started = tokio::time::Instant::now();
        assert_eq!(b.admit(&stop).await, Some(Admission::Probe));
        assert!(started.elapsed() >= Duration::from_secs(5));
        // A second caller waits while the probe runs.
        let waiting = tokio::time::timeout(Duration::from_secs(2), b.admit(&stop)).await;
        assert!(waiting.is_err(), "only one probe at a time");

        // A failed probe re-opens; a successful one closes.
        assert_eq!(b.failure(Admission::Probe), None);
        assert!(b.is_open());
        assert_eq!(b.admit(&stop).await, Some(Admission::Probe));
        assert_eq!(b.success(Admission::Probe), Some(Transition::Closed));
        assert_eq!(b.admit(&stop).await, Some(Admission::Call));
    }

    #[tokio::test(start_paused = true)]
    async fn successes_reset_the_count_and_shutdown_stops_waiting() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.failure(Admission::Call);
        b.success(Admission::Call);
        assert_eq!(b.failure(Admission::Call), None, "the count restarted");
        assert_eq!(b.failure(Admission::Call), Some(Transition::Opened));
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(b.admit(&stop).await, None);
    }
}
