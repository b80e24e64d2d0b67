//! Test-only hooks that land a fault at an exact instant of a stage's path. They exist
//! only with the cargo feature `failpoints` (the end-to-end tests enable it through the
//! stages' own `failpoints` features; release and debug builds of the binaries do not),
//! and are keyed by pipeline name and instant, so tests running side by side in one
//! process never see each other's hooks. Each stage names its instants (an enum that
//! implements [`Point`]) and calls `pass` where they are.

/// An instant of a stage's path a hook can be attached to.
pub trait Point: Copy {
    /// Unique across stages, e.g. `publisher.after_kafka_commit`.
    fn name(self) -> &'static str;
}

#[cfg(feature = "failpoints")]
mod hooks {
    use super::Point;
    use std::collections::HashMap;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    pub type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

    static HOOKS: Mutex<Option<HashMap<(String, &'static str), Hook>>> = Mutex::new(None);

    /// Runs `hook` (and waits for it) each time a stage of `pipeline` passes `at`.
    pub fn set(pipeline: &str, at: impl Point, hook: Hook) {
        if let Ok(mut hooks) = HOOKS.lock() {
            hooks.get_or_insert_with(HashMap::new).insert((pipeline.to_string(), at.name()), hook);
        }
    }

    pub async fn pass(pipeline: &str, at: &'static str) {
        let hook = HOOKS.lock().ok().and_then(|h| h.as_ref()?.get(&(pipeline.to_string(), at)).cloned());
        if let Some(hook) = hook {
            hook().await;
        }
    }
}

#[cfg(feature = "failpoints")]
pub use hooks::{Hook, set};

/// Where a stage of `pipeline` passes `at`: a no-op without the `failpoints` feature.
pub async fn pass(_pipeline: &str, _at: impl Point) {
    #[cfg(feature = "failpoints")]
    hooks::pass(_pipeline, _at.name()).await;
}
