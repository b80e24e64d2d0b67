//! Dead letters: the envelope with its failure, and headers a person can read with any
//! Kafka tool (reason class, reason, error, failing stage, attempts, original coordinates).

use crate::error::Reason;
use rdkafka::message::OwnedHeaders;

use crate::envelope::{Envelope, Failure, Outcome};
use crate::error::RecordError;
use crate::headers::{self, header_text};
use crate::trace_context::TraceContext;

/// The most payload (and source headers) a DLQ record carries: a Kafka record must stay
/// under the broker's `message.max.bytes` (1 MB by default) whatever came in.
pub const MAX_DLQ_PAYLOAD: usize = 256 * 1024;

/// Marks `envelope` as failed by `stage` and returns it with the DLQ record's headers.
/// A record rejected as `too_large` keeps at most [`MAX_DLQ_PAYLOAD`] bytes of payload
/// (and no source headers when they are that large): the cut is recorded in the failure
/// and a header, and the original stays at its source coordinates. Every other record
/// already fits (ingest let it in), so it is carried whole.
pub fn dead_letter(
    mut envelope: Envelope,
    error: &RecordError,
    stage: &str,
    trace: &TraceContext,
) -> (Envelope, OwnedHeaders) {
    let original_len = envelope.payload.len();
    let mut truncated_from = 0u64;
    let oversized = error.reason == Reason::TooLarge;
    if oversized && original_len > MAX_DLQ_PAYLOAD {
        envelope.payload.truncate(MAX_DLQ_PAYLOAD);
        truncated_from = original_len as u64;
    }
    let header_bytes: usize = envelope.headers.iter().map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len)).sum();
    if oversized && header_bytes > MAX_DLQ_PAYLOAD {
        envelope.headers.clear();
    }
    envelope.outcome = Some(Outcome::Failure(Failure {
        reason_class: error.class.as_str().to_string(),
        reason: error.reason.to_string(),
        message: error.message.clone(),
        stage: stage.to_string(),
        payload_truncated_from: truncated_from,
    }));
    let h = dlq_headers(&envelope, trace);
    (envelope, h)
}

/// The DLQ record's headers for a dead envelope (one `dead_letter` made), built from its
/// failure: the same headers whenever the record is written again.
pub fn dlq_headers(envelope: &Envelope, trace: &TraceContext) -> OwnedHeaders {
    let failure = envelope.failure().cloned().unwrap_or_default();
    let source = envelope.source.clone().unwrap_or_default();
    let attempts = envelope.attempt.to_string();
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let pairs = [
        (headers::IDEMPOTENCY_KEY, envelope.idempotency_key.as_str()),
        (headers::DLQ_REASON_CLASS, failure.reason_class.as_str()),
        (headers::DLQ_REASON, failure.reason.as_str()),
        (headers::DLQ_ERROR, header_text(&failure.message)),
        (headers::DLQ_STAGE, failure.stage.as_str()),
        (headers::DLQ_ATTEMPTS, attempts.as_str()),
        (headers::DLQ_ORIGINAL_TOPIC, source.topic.as_str()),
        (headers::DLQ_ORIGINAL_PARTITION, partition.as_str()),
        (headers::DLQ_ORIGINAL_OFFSET, offset.as_str()),
    ];
    let mut h = trace.inject(headers::owned(&pairs));
    if failure.payload_truncated_from > 0 {
        let len = failure.payload_truncated_from.to_string();
        h = h.insert(rdkafka::message::Header { key: headers::DLQ_PAYLOAD_TRUNCATED, value: Some(len.as_bytes()) });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SourceCoordinates;
    use crate::headers::{collect, find};

    #[test]
    fn headers_name_reason_stage_and_origin() {
        let envelope = Envelope {
            idempotency_key: "p:7".into(),
            attempt: 2,
            source: Some(SourceCoordinates {
                topic: "events.raw".into(),
                partition: 3,
                offset: 99,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = RecordError::invalid(Reason::InvalidJson, "expected value at line 1 column 1");
        let trace = TraceContext::new_root();
        let (env, h) = dead_letter(envelope, &err, "ingest-dedup", &trace);
        let pairs = collect(Some(&h));
        assert_eq!(find(&pairs, headers::DLQ_REASON_CLASS), Some("invalid_input"));
        assert_eq!(find(&pairs, headers::DLQ_REASON), Some("invalid_json"));
        assert_eq!(find(&pairs, headers::DLQ_ERROR), Some("expected value at line 1 column 1"));
        assert_eq!(find(&pairs, headers::DLQ_STAGE), Some("ingest-dedup"));
        assert_eq!(find(&pairs, headers::DLQ_ATTEMPTS), Some("2"));
        assert_eq!(find(&pairs, headers::DLQ_ORIGINAL_TOPIC), Some("events.raw"));
        assert_eq!(find(&pairs, headers::DLQ_ORIGINAL_PARTITION), Some("3"));
        assert_eq!(find(&pairs, headers::DLQ_ORIGINAL_OFFSET), Some("99"));
        assert_eq!(find(&pairs, headers::IDEMPOTENCY_KEY), Some("p:7"));
        assert_eq!(TraceContext::extract(&pairs), Some(trace));
        assert_eq!(env.failure().unwrap().reason, "invalid_json");
        assert!(find(&pairs, headers::DLQ_PAYLOAD_TRUNCATED).is_none());
    }

    #[test]
    fn a_huge_payload_is_cut_to_fit_a_kafka_record() {
        let envelope = Envelope { payload: vec![b'x'; 10 * 1024 * 1024], ..Default::default() };
        let err = RecordError::invalid(Reason::TooLarge, "the value is 10485760 bytes");
        let (env, h) = dead_letter(envelope, &err, "ingest-dedup", &TraceContext::new_root());
        assert_eq!(env.payload.len(), MAX_DLQ_PAYLOAD);
        assert_eq!(env.failure().unwrap().payload_truncated_from, 10 * 1024 * 1024);
        assert_eq!(find(&collect(Some(&h)), headers::DLQ_PAYLOAD_TRUNCATED), Some("10485760"));
        assert!(env.encode_to_bytes().len() < 300 * 1024);
    }
}
