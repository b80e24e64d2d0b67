//! Dead letters: the envelope with its failure, and headers a person can read with any
//! Kafka tool (reason class, reason, error, failing stage, attempts, original coordinates).

use rdkafka::message::OwnedHeaders;

use crate::envelope::{Envelope, Failure, Outcome};
use crate::error::RecordError;
use crate::headers::{self, header_text};
use crate::trace_context::TraceContext;

/// Marks `envelope` as failed by `stage` and returns it with the DLQ record's headers.
pub fn dead_letter(
    mut envelope: Envelope,
    error: &RecordError,
    stage: &str,
    trace: &TraceContext,
) -> (Envelope, OwnedHeaders) {
    envelope.outcome = Some(Outcome::Failure(Failure {
        reason_class: error.class.as_str().to_string(),
        reason: error.reason.to_string(),
        message: error.message.clone(),
        stage: stage.to_string(),
    }));
    let source = envelope.source.clone().unwrap_or_default();
    let attempts = envelope.attempt.to_string();
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let pairs = [
        (headers::IDEMPOTENCY_KEY, envelope.idempotency_key.as_str()),
        (headers::DLQ_REASON_CLASS, error.class.as_str()),
        (headers::DLQ_REASON, error.reason),
        (headers::DLQ_ERROR, header_text(&error.message)),
        (headers::DLQ_STAGE, stage),
        (headers::DLQ_ATTEMPTS, attempts.as_str()),
        (headers::DLQ_ORIGINAL_TOPIC, source.topic.as_str()),
        (headers::DLQ_ORIGINAL_PARTITION, partition.as_str()),
        (headers::DLQ_ORIGINAL_OFFSET, offset.as_str()),
    ];
    let h = trace.inject(headers::owned(&pairs));
    (envelope, h)
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
        let err = RecordError::invalid("invalid_json", "expected value at line 1 column 1");
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
    }
}
