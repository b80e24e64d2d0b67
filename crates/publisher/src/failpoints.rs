//! The publisher's test-only instants (see `enrich_common::failpoints`): hooks exist
//! only with the cargo feature `failpoints`.

/// The instants a hook can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instant {
    /// Right before `commit_transaction`: the outputs are written and the offsets sent.
    BeforeKafkaCommit,
    /// Right after `commit_transaction` returned success, before anything is written
    /// to PostgreSQL about the batch.
    AfterKafkaCommit,
}

impl Instant {
    fn name(self) -> &'static str {
        match self {
            Instant::BeforeKafkaCommit => "publisher.before_kafka_commit",
            Instant::AfterKafkaCommit => "publisher.after_kafka_commit",
        }
    }
}

#[cfg(feature = "failpoints")]
pub use enrich_common::failpoints::Hook;

/// Runs `hook` (and waits for it) each time the publisher of `pipeline` passes `at`.
#[cfg(feature = "failpoints")]
pub fn set(pipeline: &str, at: Instant, hook: Hook) {
    enrich_common::failpoints::set(pipeline, at.name(), hook);
}

/// Where the publish path passes `at`: a no-op without the `failpoints` feature.
pub(crate) async fn pass(pipeline: &str, at: Instant) {
    enrich_common::failpoints::pass(pipeline, at.name()).await;
}
