//! The per-record logic of ingest, with no I/O: is the record valid, what is its
//! idempotency key, what envelope goes downstream.

use enrich_common::IdempotencyKey;
use enrich_common::config::PipelineSettings;
use enrich_common::envelope::{self, Envelope, Header, SourceCoordinates};
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use enrich_common::headers;
use enrich_common::idempotency::{RecordView, fallback_key};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use crate::budget::{self, Budget};

/// A valid record, ready to be claimed and forwarded.
#[derive(Debug)]
pub struct Sighting {
    pub key: IdempotencyKey,
    pub envelope: Envelope,
}

/// What ingest makes of one source record.
#[derive(Debug)]
pub enum Inspected {
    Valid(Sighting),
    /// Dead-lettered at once: the key is the configured one when it could be derived,
    /// else the content hash.
    Invalid {
        key: IdempotencyKey,
        envelope: Envelope,
        error: RecordError,
    },
}

impl Inspected {
    pub fn key(&self) -> &IdempotencyKey {
        match self {
            Inspected::Valid(s) => &s.key,
            Inspected::Invalid { key, .. } => key,
        }
    }
}

pub use enrich_common::idempotency::MAX_KEY_BYTES;

/// `headers` are the message's, collected once by the caller (it reads the trace
/// context from them too). `budget` bounds the record's weight (see [`budget`]).
pub fn inspect(
    pipeline: &PipelineSettings,
    budget: &Budget,
    message: &OwnedMessage,
    collected: &headers::Collected,
) -> Inspected {
    let headers = collected.pairs.as_slice();
    let value = message.payload();
    let key_bytes = message.key();
    let envelope = Envelope {
        schema: envelope::SCHEMA.into(),
        pipeline: pipeline.name.clone(),
        idempotency_key: String::new(),
        source: Some(SourceCoordinates {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
            key: key_bytes.map(<[u8]>::to_vec),
        }),
        payload: value.map(<[u8]>::to_vec).unwrap_or_default(),
        headers: headers.iter().map(|(k, v)| Header { key: k.clone(), value: v.clone() }).collect(),
        attempt: 0,
        outcome: None,
    };

    let parsed = validate_payload(budget, value).and_then(|json| {
        if collected.unreadable {
            return Err(RecordError::invalid(
                Reason::UnreadableHeaders,
                "the record's headers cannot be read (more than the 100,000 librdkafka reads, or malformed); \
                 the original record is at its coordinates",
            ));
        }
        if collected.invalid_names > 0 {
            return Err(RecordError::invalid(
                Reason::InvalidHeaderName,
                format!(
                    "{} header name(s) are not UTF-8 (left out of this copy; the original record is at its coordinates)",
                    collected.invalid_names
                ),
            ));
        }
        let weight = budget::weight(value.map_or(0, <[u8]>::len), key_bytes.map_or(0, <[u8]>::len), headers);
        if weight > budget.max_bytes {
            return Err(RecordError::invalid(
                Reason::TooLarge,
                format!(
                    "the record weighs {weight} bytes with its key and {} headers (each counted with {} bytes of framing); the limit is {}",
                    headers.len(),
                    budget::HEADER_OVERHEAD,
                    budget.describe()
                ),
            ));
        }
        Ok(json)
    });
    let strategy = pipeline.sources.iter().find(|s| s.topic == message.topic()).map(|s| &s.key);
    let derived = match (&parsed, strategy) {
        (_, None) => Err(RecordError::invalid(
            Reason::UnknownSource,
            format!("topic {} is not a configured source", message.topic()),
        )),
        (Err(e), _) => Err(e.clone()),
        (Ok(json), Some(strategy)) => {
            let view = RecordView { key: key_bytes, headers, json: Some(json), value };
            strategy.derive(&pipeline.name, &view)
        }
    };
    // Keys index the state table: a key longer than any sane id is bad input.
    let derived = derived.and_then(|key| {
        if key.as_str().contains('\0') {
            return Err(RecordError::invalid(
                Reason::InvalidKey,
                "the idempotency key contains a NUL character, which PostgreSQL text cannot hold",
            ));
        }
        if key.as_str().len() > MAX_KEY_BYTES {
            return Err(RecordError::invalid(
                Reason::KeyTooLong,
                format!("the idempotency key is {} bytes; at most {MAX_KEY_BYTES} are accepted", key.as_str().len()),
            ));
        }
        Ok(key)
    });
    match derived {
        Ok(key) => {
            Inspected::Valid(Sighting { envelope: Envelope { idempotency_key: key.to_string(), ..envelope }, key })
        }
        Err(error) => {
            let key = fallback_key(&pipeline.name, key_bytes, value);
            Inspected::Invalid { envelope: Envelope { idempotency_key: key.to_string(), ..envelope }, key, error }
        }
    }
}

/// The pipeline's format is JSON objects: anything else is invalid input.
fn validate_payload(budget: &Budget, value: Option<&[u8]>) -> Result<serde_json::Value, RecordError> {
    let bytes = match value {
        None => {
            return Err(RecordError::invalid(Reason::EmptyValue, "the record has no value"));
        }
        Some([]) => {
            return Err(RecordError::invalid(Reason::EmptyValue, "the record value is empty"));
        }
        Some(b) => b,
    };
    // Not parsed at all when the value alone is over the limit.
    if bytes.len() > budget.max_bytes {
        return Err(RecordError::invalid(
            Reason::TooLarge,
            format!("the value is {} bytes; the limit is {}", bytes.len(), budget.describe()),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| RecordError::invalid(Reason::InvalidUtf8, format!("the value is not UTF-8: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| RecordError::invalid(Reason::InvalidJson, format!("the value is not JSON: {e}")))?;
    if !json.is_object() {
        return Err(RecordError::invalid(Reason::NotAnObject, "the value is JSON but not an object"));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use enrich_common::config::SourceTopic;
    use enrich_common::{KeyStrategy, headers};
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedHeaders;

    fn pipeline() -> PipelineSettings {
        PipelineSettings {
            name: "p".into(),
            sources: vec![SourceTopic {
                topic: "raw".into(),
                key: KeyStrategy::JsonPointer { pointers: vec!["/id".into()] },
            }],
            max_record_bytes: 16 * 1024,
        }
    }

    fn message(value: Option<&[u8]>, headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            Some(b"k".to_vec()),
            "raw".into(),
            Timestamp::CreateTime(1_000),
            2,
            40,
            headers,
        )
    }

    /// Inspects a message as the stage does: its headers collected first.
    fn check(m: &OwnedMessage) -> Inspected {
        let budget = Budget { max_bytes: 16 * 1024, producer_bytes: 1_000_000, max_record_bytes: 16 * 1024 };
        inspect(&pipeline(), &budget, m, &headers::collect_checked(m.headers()))
    }

    fn reason(v: Option<&[u8]>) -> &'static str {
        match check(&message(v, None)) {
            Inspected::Invalid { error, .. } => error.reason.as_str(),
            Inspected::Valid(s) => panic!("valid: {s:?}"),
        }
    }

    #[test]
    fn valid_ticket_becomes_an_envelope() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = headers::owned(&[("traceparent", tp), ("x", "y")]);
        let Inspected::Valid(s) = check(&message(Some(br#"{"id":"T1"}"#), Some(h))) else { panic!("invalid") };
        assert_eq!(s.key.as_str(), "p:T1");
        assert_eq!(s.envelope.idempotency_key, "p:T1");
        let src = s.envelope.source.as_ref().unwrap();
        assert_eq!((src.topic.as_str(), src.partition, src.offset, src.timestamp_ms), ("raw", 2, 40, 1_000));
        assert_eq!(src.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(s.envelope.headers.len(), 2, "the source headers travel in the envelope");
    }

    #[test]
    fn malformed_records_get_readable_reasons() {
        assert_eq!(reason(None), "empty_value");
        assert_eq!(reason(Some(b"")), "empty_value");
        assert_eq!(reason(Some(&[b'{'; 16 * 1024 + 1])), "too_large");
        assert_eq!(reason(Some(&[0xff, 0xfe])), "invalid_utf8");
        assert_eq!(reason(Some(b"{nope")), "invalid_json");
        assert_eq!(reason(Some(b"[1,2]")), "not_an_object");
        assert_eq!(reason(Some(br#"{"subject":"no id"}"#)), "missing_key_field");
        let long_id = format!(r#"{{"id":"{}"}}"#, "x".repeat(10_000));
        assert_eq!(reason(Some(long_id.as_bytes())), "key_too_long");
        assert_eq!(reason(Some(br#"{"id":"a\u0000b"}"#)), "invalid_key");
    }

    #[test]
    fn headers_count_toward_the_size_limit() {
        let big = "h".repeat(16 * 1024);
        let h = headers::owned(&[("big", big.as_str())]);
        let Inspected::Invalid { error, .. } = check(&message(Some(br#"{"id":"T1"}"#), Some(h))) else {
            panic!("valid")
        };
        assert_eq!(error.reason, Reason::TooLarge);
        assert!(error.message.contains("headers"), "{}", error.message);
    }

    #[test]
    fn a_flood_of_empty_headers_is_too_large() {
        let mut h = OwnedHeaders::new();
        for _ in 0..1_000 {
            h = h.insert(rdkafka::message::Header { key: "", value: None::<&[u8]> });
        }
        let Inspected::Invalid { error, .. } = check(&message(Some(br#"{"id":"T1"}"#), Some(h))) else {
            panic!("valid")
        };
        assert_eq!(error.reason, Reason::TooLarge);
        assert!(error.message.contains("1000 headers"), "{}", error.message);
    }

    #[test]
    fn invalid_records_still_get_a_stable_key() {
        let a = check(&message(Some(b"{nope"), None));
        let b = check(&message(Some(b"{nope"), None));
        assert_eq!(a.key(), b.key());
        assert!(a.key().as_str().starts_with("p:sha256:"));
    }
}
