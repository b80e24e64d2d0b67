//! Kafka header names the product writes, and helpers to read and write them.

use rdkafka::message::{Header as KafkaHeader, Headers, OwnedHeaders};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// DLQ headers, readable with any Kafka tool.
pub const DLQ_REASON_CLASS: &str = "dlq.reason.class";
pub const DLQ_REASON: &str = "dlq.reason";
pub const DLQ_ERROR: &str = "dlq.error";
pub const DLQ_STAGE: &str = "dlq.stage";
pub const DLQ_ATTEMPTS: &str = "dlq.attempts";
pub const DLQ_ORIGINAL_TOPIC: &str = "dlq.original.topic";
pub const DLQ_ORIGINAL_PARTITION: &str = "dlq.original.partition";
pub const DLQ_ORIGINAL_OFFSET: &str = "dlq.original.offset";
/// Present when the DLQ record's payload was cut to fit: the original length in bytes.
pub const DLQ_PAYLOAD_TRUNCATED: &str = "dlq.payload.truncated";

/// Delayed retries on the retry topic: when the record is due (Unix milliseconds), and
/// how many delayed retries it has had (this one included).
pub const RETRY_DUE_MS: &str = "retry-due-ms";
pub const RETRY_COUNT: &str = "retry-count";

/// Longest error message put in a header; the full text stays in the envelope.
const MAX_HEADER_TEXT: usize = 1024;

/// A record's headers, copied: the pairs whose names are UTF-8, and how many were not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub pairs: Vec<(String, Option<Vec<u8>>)>,
    /// Headers whose name is not UTF-8 (left out of `pairs`: Kafka allows any bytes,
    /// the product's headers and envelopes hold text).
    pub invalid_names: usize,
    /// librdkafka could not read the record's headers (see [`crate::kafka::detach`]).
    pub unreadable: bool,
}

/// Copies Kafka headers into owned pairs, leaving out (and counting) any whose name is
/// not UTF-8. rdkafka's header reader panics on such a name (it unwraps the UTF-8
/// conversion of librdkafka's C string); the panic is caught here, silently, so one
/// hostile header can never stop a stage.
pub fn collect_checked<H: Headers>(headers: Option<&H>) -> Collected {
    let mut collected = Collected::default();
    let Some(headers) = headers else {
        return collected;
    };
    collected.unreadable = headers.count() == 0;
    for idx in 0..headers.count() {
        match quietly(|| headers.try_get(idx).map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))) {
            Some(Some(pair)) => collected.pairs.push(pair),
            Some(None) => {}
            None => collected.invalid_names += 1,
        }
    }
    collected
}

/// The bytes of a record's headers (names and values), without copying them; a header
/// whose name is not UTF-8 counts nothing (reading it would panic, see
/// [`collect_checked`]).
pub fn size<H: Headers>(headers: Option<&H>) -> usize {
    let Some(headers) = headers else { return 0 };
    (0..headers.count())
        .filter_map(|idx| quietly(|| headers.try_get(idx).map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))))
        .flatten()
        .sum()
}

/// Copies Kafka headers into owned pairs (those with a UTF-8 name; see [`collect_checked`]).
pub fn collect<H: Headers>(headers: Option<&H>) -> Vec<(String, Option<Vec<u8>>)> {
    collect_checked(headers).pairs
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `None` without printing it (the process's panic hook
/// is wrapped once to stay silent while `f` runs on this thread).
fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.ok()
}

/// Looks a header up as UTF-8 text.
pub fn find<'a>(headers: &'a [(String, Option<Vec<u8>>)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref()).and_then(|v| std::str::from_utf8(v).ok())
}

/// Builds headers from text pairs.
pub fn owned(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(OwnedHeaders::new_with_capacity(pairs.len()), |h, (k, v)| {
        h.insert(KafkaHeader { key: k, value: Some(v.as_bytes()) })
    })
}

/// Cuts text to at most `MAX_HEADER_TEXT` bytes on a character boundary.
pub fn header_text(s: &str) -> &str {
    if s.len() <= MAX_HEADER_TEXT {
        return s;
    }
    let mut end = MAX_HEADER_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_headers_read_back() {
        let h = owned(&[(IDEMPOTENCY_KEY, "p:1"), (DLQ_REASON, "too_large")]);
        let pairs = collect(Some(&h));
        assert_eq!(find(&pairs, IDEMPOTENCY_KEY), Some("p:1"));
        assert_eq!(find(&pairs, DLQ_REASON), Some("too_large"));
        assert_eq!(find(&pairs, "absent"), None);
    }

    #[test]
    fn an_empty_header_list_is_unreadable_headers_and_none_is_no_headers() {
        assert!(collect_checked(Some(&owned(&[]))).unreadable, "kafka::detach's mark of headers librdkafka refused");
        assert!(!collect_checked(None::<&OwnedHeaders>).unreadable);
        assert!(!collect_checked(Some(&owned(&[("a", "b")]))).unreadable);
    }

    #[test]
    fn header_text_cuts_on_char_boundary() {
        let long = "é".repeat(600); // 1200 bytes
        let cut = header_text(&long);
        assert!(cut.len() <= MAX_HEADER_TEXT);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(header_text("short"), "short");
    }
}
