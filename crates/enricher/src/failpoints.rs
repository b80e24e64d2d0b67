//! The enricher's test-only instants (see `enrich_common::failpoints`): hooks exist
//! only with the cargo feature `failpoints`.

/// The instants a hook can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instant {
    /// Right after an LLM call answered (paid), before its cost is settled in the
    /// budgets and its result stored.
    AfterPaidCall,
    /// Right after a dead letter's DLQ record is written, before the dead letter is
    /// listed and its run recorded.
    AfterDeadLetterProduced,
    /// Right before a failed attempt gives its lease (and, unpaid, its attempt) back to
    /// wait for the endpoint.
    BeforeGiveBack,
    /// Right after a delayed retry's record is written to the retry topic, before the
    /// key is marked `retry_scheduled` and the run recorded.
    AfterRetryProduced,
}

impl enrich_common::failpoints::Point for Instant {
    fn name(self) -> &'static str {
        match self {
            Instant::AfterPaidCall => "enricher.after_paid_call",
            Instant::AfterDeadLetterProduced => "enricher.after_dead_letter_produced",
            Instant::BeforeGiveBack => "enricher.before_give_back",
            Instant::AfterRetryProduced => "enricher.after_retry_produced",
        }
    }
}

#[cfg(feature = "failpoints")]
pub use enrich_common::failpoints::{Hook, set};

pub(crate) use enrich_common::failpoints::pass;
