//! One classification of failures, shared by every stage. A failure is classified once,
//! where it happens; the class decides what the stage does with the record.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The record itself is bad (not the configured format, key field missing, too
    /// large). Dead-lettered at once, no LLM spend.
    InvalidInput,
    /// Worth trying again later: timeouts, connection errors, 429, 5xx.
    Transient,
    /// Will fail the same way every time: 400, refusal, output that violates the schema.
    Permanent,
    /// The dependency is down as a whole (breaker open, budget spent): pause, keep offsets.
    Outage,
    /// The stage cannot go on (bad configuration, fenced producer): stop the process.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidInput => "invalid_input",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Outage => "outage",
            ErrorClass::Fatal => "fatal",
        }
    }

    /// Whether a record failing this way belongs in the DLQ (rather than a retry or a pause).
    pub fn dead_letters(self) -> bool {
        matches!(self, ErrorClass::InvalidInput | ErrorClass::Permanent)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure of one record: a class, a short machine-readable reason, and a
/// message a person can read in the DLQ headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}/{reason}: {message}")]
pub struct RecordError {
    pub class: ErrorClass,
    pub reason: &'static str,
    pub message: String,
}

impl RecordError {
    pub fn new(class: ErrorClass, reason: &'static str, message: impl Into<String>) -> Self {
        Self { class, reason, message: message.into() }
    }

    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::InvalidInput, reason, message)
    }
}

/// Renders an error with its whole cause chain, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bad_records_are_dead_lettered() {
        assert!(ErrorClass::InvalidInput.dead_letters());
        assert!(ErrorClass::Permanent.dead_letters());
        assert!(!ErrorClass::Transient.dead_letters());
        assert!(!ErrorClass::Outage.dead_letters());
        assert!(!ErrorClass::Fatal.dead_letters());
    }

    #[test]
    fn display_names_class_and_reason() {
        let e = RecordError::invalid("invalid_json", "expected value at line 1");
        assert_eq!(e.to_string(), "invalid_input/invalid_json: expected value at line 1");
    }
}
