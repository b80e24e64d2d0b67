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

impl enrich_common::failpoints::Point for Instant {
    fn name(self) -> &'static str {
        match self {
            Instant::BeforeKafkaCommit => "publisher.before_kafka_commit",
            Instant::AfterKafkaCommit => "publisher.after_kafka_commit",
        }
    }
}

#[cfg(feature = "failpoints")]
pub use enrich_common::failpoints::{Hook, set};

pub(crate) use enrich_common::failpoints::pass;
