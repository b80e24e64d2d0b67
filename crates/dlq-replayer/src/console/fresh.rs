//! A value the console computes from a scan of the audit or the state table: kept, shown
//! with its age, and computed again in the background (one task at a time, whoever is
//! looking) once it is older than its lifetime. Only the first request waits for it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Console;

pub struct Fresh<T> {
    ttl: Duration,
    latest: Mutex<Option<(Instant, T)>>,
    computing: AtomicBool,
}

impl<T: Clone + Send + 'static> Fresh<T> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, latest: Mutex::new(None), computing: AtomicBool::new(false) }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The latest value and its age. `of` names this cache in the console; `compute`
    /// makes the value.
    pub async fn get<F, Fut>(
        console: &Arc<Console>,
        of: fn(&Console) -> &Self,
        compute: F,
    ) -> sqlx::Result<(Duration, T)>
    where
        F: FnOnce(Arc<Console>) -> Fut + Send + 'static,
        Fut: Future<Output = sqlx::Result<T>> + Send,
    {
        let this = of(console);
        let cached = this.latest.lock().ok().and_then(|l| l.clone());
        if let Some((at, value)) = cached {
            if at.elapsed() >= this.ttl && !this.computing.swap(true, Ordering::AcqRel) {
                let console = console.clone();
                tokio::spawn(async move {
                    let this = of(&console);
                    match compute(console.clone()).await {
                        Ok(value) => this.put(value),
                        Err(err) => tracing::warn!(error = %err, "console: a summary could not be computed"),
                    }
                    this.computing.store(false, Ordering::Release);
                });
            }
            return Ok((at.elapsed(), value));
        }
        let value = compute(console.clone()).await?;
        this.put(value.clone());
        Ok((Duration::ZERO, value))
    }

    fn put(&self, value: T) {
        if let Ok(mut l) = self.latest.lock() {
            *l = Some((Instant::now(), value));
        }
    }
}
