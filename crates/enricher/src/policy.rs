//! What becomes of a record after an attempt failed: a pure decision from the error,
//! the attempt number and the record's tries in this delivery, so the rules can be
//! read (and tested) in one place. The caller carries it out (the lease, the breaker,
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
}

/// Decides after `error` ended attempt number `attempt`, the `tries`-th of this
/// delivery; `breaker_open`: the endpoint's breaker is open now.
pub fn decide(error: &LlmError, attempt: i32, tries: u32, breaker_open: bool, limits: Limits) -> Next {
    match error.error.class {
        ErrorClass::Transient | ErrorClass::Outage | ErrorClass::Fatal => {
            // A 429 slows the record down without spending its attempts.
            if (error.endpoint_down() && breaker_open)
                || error.error.reason == Reason::RateLimited
                || matches!(error.error.class, ErrorClass::Outage | ErrorClass::Fatal)
            {
                Next::WaitForEndpoint
            } else if attempt < limits.max_attempts && tries > limits.quick_retries {
                Next::RetryLater
            } else if attempt < limits.max_attempts {
                Next::RetryHere
            } else {
                Next::DeadLetter(RecordError::new(
                    ErrorClass::Transient,
                    Reason::MaxAttempts,
                    format!("gave up after {attempt} attempts; last error: {}", error.error),
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

    const LIMITS: Limits = Limits { max_attempts: 3, quick_retries: 1 };

    fn err(class: ErrorClass, reason: Reason) -> LlmError {
        LlmError { error: RecordError::new(class, reason, "x"), retry_after: None }
    }

    #[test]
    fn a_plain_server_error_is_retried_here_then_later_then_dead_lettered() {
        let e = err(ErrorClass::Transient, Reason::ServerError);
        assert_eq!(decide(&e, 1, 1, false, LIMITS), Next::RetryHere);
        assert_eq!(decide(&e, 2, 2, false, LIMITS), Next::RetryLater);
        match decide(&e, 3, 1, false, LIMITS) {
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
        assert_eq!(decide(&limited, 3, 9, false, LIMITS), Next::WaitForEndpoint, "even at the last attempt");
        assert_eq!(decide(&err(ErrorClass::Outage, Reason::Unavailable), 3, 1, false, LIMITS), Next::WaitForEndpoint);
        assert_eq!(decide(&err(ErrorClass::Fatal, Reason::Unauthorized), 1, 1, false, LIMITS), Next::WaitForEndpoint);
        // A timeout counts against the record until the breaker says the endpoint is down.
        let timeout = err(ErrorClass::Transient, Reason::Timeout);
        assert_eq!(decide(&timeout, 1, 1, false, LIMITS), Next::RetryHere);
        assert_eq!(decide(&timeout, 1, 1, true, LIMITS), Next::WaitForEndpoint);
    }

    #[test]
    fn the_record_s_own_faults_are_dead_lettered_at_once() {
        let refused = err(ErrorClass::Permanent, Reason::InvalidOutput);
        assert_eq!(decide(&refused, 1, 1, false, LIMITS), Next::DeadLetter(refused.error.clone()));
        let bad = err(ErrorClass::InvalidInput, Reason::InvalidJson);
        assert_eq!(decide(&bad, 1, 1, true, LIMITS), Next::DeadLetter(bad.error.clone()));
    }
}
