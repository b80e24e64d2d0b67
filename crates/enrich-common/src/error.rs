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

/// Why a record failed: a short machine-readable name (`as_str`), in the DLQ headers,
/// the `dead_letters` table and the metrics' labels. One list for every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payload (or the model's output) is not JSON.
    InvalidJson,
    /// The idempotency key's field is missing from the record.
    MissingKeyField,
    /// The idempotency key cannot be derived (empty, not text).
    InvalidKey,
    /// The record's Kafka key is longer than allowed.
    KeyTooLong,
    /// A header name is not UTF-8.
    InvalidHeaderName,
    /// The record's headers cannot be read (more than librdkafka's 100,000, or
    /// malformed).
    UnreadableHeaders,
    /// The record's topic is not a configured source.
    UnknownSource,
    /// The record has no value.
    EmptyValue,
    /// The value is not UTF-8.
    InvalidUtf8,
    /// The record is larger than the stage accepts.
    TooLarge,
    /// A record on an internal topic is not an envelope.
    InvalidEnvelope,
    /// The prompt template cannot render this record.
    TemplateError,
    /// The rendered prompt is longer than `llm.max_input_chars`.
    InputTooLong,
    /// The LLM call timed out.
    Timeout,
    /// The LLM endpoint could not be reached.
    Connection,
    /// The LLM request failed below HTTP.
    Http,
    /// The endpoint answered 429.
    RateLimited,
    /// The endpoint answered 5xx.
    ServerError,
    /// The endpoint or model is unavailable (503, overloaded).
    Unavailable,
    /// The endpoint refused the credentials (401, 403).
    Unauthorized,
    /// The account's quota is spent.
    QuotaExceeded,
    /// The endpoint does not know the model.
    ModelNotFound,
    /// The endpoint refused the request (400).
    BadRequest,
    /// The prompt does not fit the model's context.
    ContextTooLong,
    /// The endpoint's answer is not a completion.
    BadResponse,
    /// The completion is empty.
    EmptyOutput,
    /// The completion was cut at the output token limit.
    OutputTruncated,
    /// The model refused to answer.
    Refusal,
    /// The output breaks the configured JSON schema.
    SchemaViolation,
    /// The output is invalid after its repair call.
    InvalidOutput,
    /// The key's attempts (`llm.max_attempts`) are used up.
    MaxAttempts,
    /// The database refused what a paid call produced.
    StorageRefused,
    /// The source record is not a JSON object, so no output can be merged.
    NotAnObject,
    /// The results record carries no result.
    NoResult,
}

impl Reason {
    pub const ALL: [Reason; 34] = [
        Reason::InvalidJson,
        Reason::MissingKeyField,
        Reason::InvalidKey,
        Reason::KeyTooLong,
        Reason::InvalidHeaderName,
        Reason::UnreadableHeaders,
        Reason::UnknownSource,
        Reason::EmptyValue,
        Reason::InvalidUtf8,
        Reason::TooLarge,
        Reason::InvalidEnvelope,
        Reason::TemplateError,
        Reason::InputTooLong,
        Reason::Timeout,
        Reason::Connection,
        Reason::Http,
        Reason::RateLimited,
        Reason::ServerError,
        Reason::Unavailable,
        Reason::Unauthorized,
        Reason::QuotaExceeded,
        Reason::ModelNotFound,
        Reason::BadRequest,
        Reason::ContextTooLong,
        Reason::BadResponse,
        Reason::EmptyOutput,
        Reason::OutputTruncated,
        Reason::Refusal,
        Reason::SchemaViolation,
        Reason::InvalidOutput,
        Reason::MaxAttempts,
        Reason::StorageRefused,
        Reason::NotAnObject,
        Reason::NoResult,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::MissingKeyField => "missing_key_field",
            Reason::InvalidKey => "invalid_key",
            Reason::KeyTooLong => "key_too_long",
            Reason::InvalidHeaderName => "invalid_header_name",
            Reason::UnreadableHeaders => "unreadable_headers",
            Reason::UnknownSource => "unknown_source",
            Reason::EmptyValue => "empty_value",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::TooLarge => "too_large",
            Reason::InvalidEnvelope => "invalid_envelope",
            Reason::TemplateError => "template_error",
            Reason::InputTooLong => "input_too_long",
            Reason::Timeout => "timeout",
            Reason::Connection => "connection",
            Reason::Http => "http",
            Reason::RateLimited => "rate_limited",
            Reason::ServerError => "server_error",
            Reason::Unavailable => "unavailable",
            Reason::Unauthorized => "unauthorized",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::ModelNotFound => "model_not_found",
            Reason::BadRequest => "bad_request",
            Reason::ContextTooLong => "context_too_long",
            Reason::BadResponse => "bad_response",
            Reason::EmptyOutput => "empty_output",
            Reason::OutputTruncated => "output_truncated",
            Reason::Refusal => "refusal",
            Reason::SchemaViolation => "schema_violation",
            Reason::InvalidOutput => "invalid_output",
            Reason::MaxAttempts => "max_attempts",
            Reason::StorageRefused => "storage_refused",
            Reason::NotAnObject => "not_an_object",
            Reason::NoResult => "no_result",
        }
    }
}

impl fmt::Display for Reason {
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
    pub reason: Reason,
    pub message: String,
}

impl RecordError {
    pub fn new(class: ErrorClass, reason: Reason, message: impl Into<String>) -> Self {
        Self { class, reason, message: message.into() }
    }

    pub fn invalid(reason: Reason, message: impl Into<String>) -> Self {
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
    fn reasons_have_one_snake_case_name_each() {
        let names: std::collections::HashSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }

    #[test]
    fn display_names_class_and_reason() {
        let e = RecordError::invalid(Reason::InvalidJson, "expected value at line 1");
        assert_eq!(e.to_string(), "invalid_input/invalid_json: expected value at line 1");
    }
}
