//! What becomes of a record after an attempt failed: a pure decision from the error,
//! the attempt number and the record's tries in this delivery (and the 429s charged to
//! it), so the rules can be read (and tested) in one place. The caller carries it out (the lease, the breaker,
//! the waits, the retry topic, the DLQ).

use enrich_common::ErrorClass;
use enrich_common::error::Reason;
use enrich_common::error::RecordError;

use crate::llm::LlmError;

/// What the attempt's failure leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The endpoint is down or throttling, not this record: the attempt is given back
    /// (unless one of its calls was paid) and the record waits, then tries again;
    /// nothing is dead-lettered during an outage.
    WaitForEndpoint,
    /// A transient failure: try again here after a backoff; the attempt stays spent.
    RetryHere,
    /// A transient failure after the quick retries: through the retry topic, due later.
    RetryLater,
    /// The record is the problem, or its attempts are used up.
    DeadLetter(RecordError),
}

/// The limits the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `llm.max_attempts`.
    pub max_attempts: i32,
    /// `llm.quick_retries`: in-process retries in one delivery before the retry topic.
    pub quick_retries: u32,
    /// `llm.max_rate_limited`: 429s charged to one record in one delivery before it
    /// takes the retry path like any other transient failure.
    pub max_rate_limited: u32,
}

/// The record's tries in this delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tries {
    /// Attempts made: the first plus `quick_retries` run here, the next go through the
    /// retry topic.
    pub attempts: u32,
    /// 429s charged to the record (see [`charged`]).
    pub rate_limited: u32,
}

/// Whether a 429 is charged to the record that received it, from the other calls of
/// this replica since the record's previous 429: the endpoint answered more of them
/// (`answered`) than it refused (`refused`), so it refuses this record rather than
/// everyone. A provider-wide throttle refuses most calls and charges nobody: it slows
/// consumption through flow control and dead-letters nothing.
pub fn charged(answered: u64, refused: u64) -> bool {
    answered > refused
}

/// Decides after `error` ended attempt number `attempt`, with the record's `tries` in
/// this delivery (this attempt counted); `breaker_open`: the endpoint's breaker is open
/// now.
pub fn decide(error: &LlmError, attempt: i32, tries: Tries, breaker_open: bool, limits: Limits) -> Next {
    let rate_limited = error.error.reason == Reason::RateLimited;
    // A record the endpoint keeps refusing while it answers others (some providers do,
    // for one oversized request) has spent its 429s: from here on its attempts count.
    let rate_limit_spent = rate_limited && tries.rate_limited > limits.max_rate_limited;
    match error.error.class {
        ErrorClass::Transient | ErrorClass::Outage | ErrorClass::Fatal => {
            // A 429 slows the record down without spending its attempts.
            if (error.endpoint_down() && breaker_open)
                || (rate_limited && !rate_limit_spent)
                || matches!(error.error.class, ErrorClass::Outage | ErrorClass::Fatal)
            {
                Next::WaitForEndpoint
            } else if attempt < limits.max_attempts && (rate_limit_spent || tries.attempts > limits.quick_retries) {
                Next::RetryLater
            } else if attempt < limits.max_attempts {
                Next::RetryHere
            } else {
                let why = if rate_limit_spent {
                    format!(
                        " (answered 429 {} times in its last delivery while the endpoint answered others)",
                        tries.rate_limited
                    )
                } else {
                    String::new()
                };
                Next::DeadLetter(RecordError::new(
                    ErrorClass::Transient,
                    Reason::MaxAttempts,
                    format!("gave up after {attempt} attempts{why}; last error: {}", error.error),
                ))
            }
        }
        // The endpoint answered and refused the record, or no call could be made (the
        // payload could not become a prompt).
        ErrorClass::Permanent | ErrorClass::InvalidInput => Next::DeadLetter(error.error.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: Limits = Limits { max_attempts: 3, quick_retries: 1, max_rate_limited: 5 };

    fn tries(attempts: u32) -> Tries {
        Tries { attempts, rate_limited: 0 }
    }

    fn err(class: ErrorClass, reason: Reason) -> LlmError {
        LlmError { error: RecordError::new(class, reason, "x"), retry_after: None }
    }

    #[test]
    fn a_plain_server_error_is_retried_here_then_later_then_dead_lettered() {
        let e = err(ErrorClass::Transient, Reason::ServerError);
        assert_eq!(decide(&e, 1, tries(1), false, LIMITS), Next::RetryHere);
        assert_eq!(decide(&e, 2, tries(2), false, LIMITS), Next::RetryLater);
        match decide(&e, 3, tries(1), false, LIMITS) {
            Next::DeadLetter(d) => {
                assert_eq!(d.reason, Reason::MaxAttempts);
                assert!(d.message.contains("gave up after 3 attempts"), "{}", d.message);
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn throttling_and_outages_never_spend_the_record() {
        let limited =
            LlmError { retry_after: Some(Duration::from_secs(1)), ..err(ErrorClass::Transient, Reason::RateLimited) };
        assert_eq!(decide(&limited, 3, tries(9), false, LIMITS), Next::WaitForEndpoint, "even at the last attempt");
        assert_eq!(
            decide(&err(ErrorClass::Outage, Reason::Unavailable), 3, tries(1), false, LIMITS),
            Next::WaitForEndpoint
        );
        assert_eq!(
            decide(&err(ErrorClass::Fatal, Reason::Unauthorized), 1, tries(1), false, LIMITS),
            Next::WaitForEndpoint
        );
        // A timeout counts against the record until the breaker says the endpoint is down.
        let timeout = err(ErrorClass::Transient, Reason::Timeout);
        assert_eq!(decide(&timeout, 1, tries(1), false, LIMITS), Next::RetryHere);
        assert_eq!(decide(&timeout, 1, tries(1), true, LIMITS), Next::WaitForEndpoint);
    }

    #[test]
    fn the_record_s_own_faults_are_dead_lettered_at_once() {
        let refused = err(ErrorClass::Permanent, Reason::InvalidOutput);
        assert_eq!(decide(&refused, 1, tries(1), false, LIMITS), Next::DeadLetter(refused.error.clone()));
        let bad = err(ErrorClass::InvalidInput, Reason::InvalidJson);
        assert_eq!(decide(&bad, 1, tries(1), true, LIMITS), Next::DeadLetter(bad.error.clone()));
    }

    #[test]
    fn a_record_refused_while_others_are_answered_spends_its_429s_then_its_attempts() {
        let limited =
            LlmError { retry_after: Some(Duration::from_secs(1)), ..err(ErrorClass::Transient, Reason::RateLimited) };
        let charged_429s = |n| Tries { attempts: 1, rate_limited: n };
        assert_eq!(decide(&limited, 1, charged_429s(5), false, LIMITS), Next::WaitForEndpoint, "within its budget");
        // Past it, the retry topic at once (the quick retries were the 429s), its attempt spent.
        assert_eq!(decide(&limited, 1, charged_429s(6), false, LIMITS), Next::RetryLater);
        assert_eq!(decide(&limited, 2, charged_429s(6), false, LIMITS), Next::RetryLater);
        match decide(&limited, 3, charged_429s(6), false, LIMITS) {
            Next::DeadLetter(d) => {
                assert_eq!(d.reason, Reason::MaxAttempts);
                assert!(d.message.contains("answered 429 6 times"), "{}", d.message);
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
        // Other failures of the record are not hurried by its 429s.
        let e = err(ErrorClass::Transient, Reason::ServerError);
        assert_eq!(decide(&e, 1, charged_429s(9), false, LIMITS), Next::RetryHere);
    }

    #[test]
    fn a_429_is_charged_only_while_the_endpoint_answers_more_calls_than_it_refuses() {
        assert!(charged(20, 0), "one record refused while the others are answered");
        assert!(charged(3, 1), "two records refused among answered calls");
        assert!(!charged(3, 3), "half refused: a throttle, not the record");
        assert!(!charged(0, 40), "every call refused: a provider-wide throttle");
        assert!(!charged(0, 0), "nothing else called: no evidence against the record");
    }
}
