//! Test-only hooks that land a fault at an exact instant of the publish path. They exist
//! only with the cargo feature `failpoints` (the end-to-end tests enable it; release and
//! debug builds of the binaries do not), and are keyed by pipeline name so tests running
//! side by side in one process never see each other's hooks.

/// The instants a hook can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instant {
    /// Right before `commit_transaction`: the outputs are written and the offsets sent.
    BeforeKafkaCommit,
    /// Right after `commit_transaction` returned success, before anything is written
    /// to PostgreSQL about the batch.
    AfterKafkaCommit,
}

#[cfg(feature = "failpoints")]
mod hooks {
    use super::Instant;
    use std::collections::HashMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    pub type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

    static HOOKS: Mutex<Option<HashMap<(String, Instant), Hook>>> = Mutex::new(None);

    /// Runs `hook` (and waits for it) each time the publisher of `pipeline` passes `at`.
    pub fn set(pipeline: &str, at: Instant, hook: Hook) {
        if let Ok(mut hooks) = HOOKS.lock() {
            hooks.get_or_insert_with(HashMap::new).insert((pipeline.to_string(), at), hook);
        }
    }

    pub(crate) async fn pass(pipeline: &str, at: Instant) {
        let hook = HOOKS.lock().ok().and_then(|h| h.as_ref()?.get(&(pipeline.to_string(), at)).cloned());
        if let Some(hook) = hook {
            hook().await;
        }
    }
}

#[cfg(feature = "failpoints")]
pub use hooks::{Hook, set};

/// Where the publish path passes `at`: a no-op without the `failpoints` feature.
pub(crate) async fn pass(_pipeline: &str, _at: Instant) {
    #[cfg(feature = "failpoints")]
    hooks::pass(_pipeline, _at).await;
}
