//! The per-key state machine, and the only code that writes `enrich_state`.
//!
//! One row per (pipeline, idempotency key) moves through
//! `received → requested → enriching → enriched → published`, with `retry_scheduled`
//! and `dead_lettered` beside. Each stage changes it only through the functions here,
//! one per transition:
//!
//! | transition              | function                         | from → to                                   |
//! |-------------------------|----------------------------------|---------------------------------------------|
//! | first sighting          | [`ingest::receive`]              | (none) → received                           |
//! | forwarded               | [`ingest::mark_requested`]       | received → requested                        |
//! | adopted (row removed)   | [`lease::adopt`]                 | (none) → requested                          |
//! | lease + attempt         | [`lease::acquire`]               | received, requested, enriching, retry_scheduled → enriching |
//! | lease kept              | [`lease::renew`], [`lease::gate`] | enriching, dead_lettered (same state)      |
//! | lease given back        | [`lease::release`]               | enriching (ours, this attempt; same state)  |
//! | result stored           | [`lease::finish`]                | not ended → enriched                        |
//! | retry later             | [`lease::schedule_retry`]        | enriching (ours, this attempt) → retry_scheduled |
//! | dead-lettered           | [`lease::claim_dead_letter`]     | not ended → dead_lettered                   |
//! | result too large to emit | [`lease::claim_stored_dead_letter`] | enriched → dead_lettered                |
//! | pending dead letter     | [`lease::take_dead_lettered`], [`lease::dead_letter_listed`] | dead_lettered (same state: its lease) |
//! | bound to its record     | [`publish::bind`] (returns the stored result it publishes) | enriched (same state)   |
//! | settled                 | [`publish::settle`]              | enriched → published, dead_lettered         |
//! | replayed                | [`replay::reset`]                | dead_lettered → requested (enriched: its result stored) |
//! | replay not produced     | [`replay::undo_reset`]           | requested (untouched since the reset) → dead_lettered |
//!
//! Every transition made on behalf of a lease is fenced by the lease's owner and the
//! attempt it counted (the fencing token): a replica whose lease was taken over gets
//! "nothing changed" back, and drops its work. The database holds the same table
//! ([`State::may_become`]) as a trigger (migration `…_state_transitions.sql`), so a
//! late writer can never overwrite an ended key, whatever code path it comes from.

pub mod ingest;
pub mod lease;
pub mod publish;
pub mod replay;

/// A key's state (the `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Seen by ingest, not yet forwarded to the enricher.
    Received,
    /// Forwarded: waiting for its LLM call.
    Requested,
    /// A replica holds the lease and counted an attempt.
    Enriching,
    /// The result is stored: waiting to be published.
    Enriched,
    /// Its output record is committed. Nothing changes it any more.
    Published,
    /// Sent to the retry topic, due later.
    RetryScheduled,
    /// In the DLQ: only a replay moves it on.
    DeadLettered,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Received,
        State::Requested,
        State::Enriching,
        State::Enriched,
        State::Published,
        State::RetryScheduled,
        State::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Requested => "requested",
            State::Enriching => "enriching",
            State::Enriched => "enriched",
            State::Published => "published",
            State::RetryScheduled => "retry_scheduled",
            State::DeadLettered => "dead_lettered",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The key has ended (published or dead-lettered) or has its answer (enriched): no
    /// attempt may write a result or a retry over it.
    pub fn has_ended(self) -> bool {
        matches!(self, State::Enriched | State::Published | State::DeadLettered)
    }

    /// Whether a row in state `self` may move to `to`. Staying in a state is always
    /// allowed (leases, bindings); the database enforces the same table.
    pub fn may_become(self, to: State) -> bool {
        use State::*;
        if self == to {
            return true;
        }
        match self {
            Received => matches!(to, Requested | Enriching | RetryScheduled | Enriched | DeadLettered),
            Requested | Enriching | RetryScheduled => {
                matches!(to, Enriching | RetryScheduled | Enriched | DeadLettered)
            }
            Enriched => matches!(to, Published | DeadLettered),
            Published => false,
            // A replay: back to the enricher, or, with its result stored, to be published.
            DeadLettered => matches!(to, Requested | Enriched),
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of the trigger's check: an UPDATE that breaks [`State::may_become`] fails
/// with SQLSTATE 23514 (check_violation) and this constraint name.
pub const TRANSITION_CHECK: &str = "enrich_state_transition";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("leased"), None);
    }

    #[test]
    fn ended_keys_only_move_forward() {
        use State::*;
        for to in State::ALL {
            assert_eq!(Published.may_become(to), to == Published, "published -> {to}");
            assert_eq!(
                DeadLettered.may_become(to),
                matches!(to, DeadLettered | Requested | Enriched),
                "dead_lettered -> {to}"
            );
        }
        assert!(!Enriched.may_become(Enriching));
        assert!(!Enriched.may_become(RetryScheduled));
        assert!(Enriched.may_become(Published));
        // Nothing goes back to `received`: only a first sighting makes it.
        for from in State::ALL {
            assert_eq!(from.may_become(Received), from == Received);
        }
    }
}
