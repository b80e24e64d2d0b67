//! The protobuf envelope (`proto/enrichment/v1/envelope.proto`).

use prost::Message;

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/enrichment.v1.rs"));
}

pub use generated::envelope::Outcome;
pub use generated::{EnrichmentResult, Envelope, Failure, Header, SourceCoordinates};

/// The schema tag every envelope carries.
pub const SCHEMA: &str = "enrichment.v1";

/// An envelope that could not be decoded; the record goes to the DLQ with this reason.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an enrichment envelope: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("unsupported envelope schema {0:?} (expected {SCHEMA:?})")]
    Schema(String),
}

impl Envelope {
    pub fn encode_to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn decode_from(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope = Envelope::decode(bytes)?;
        if envelope.schema != SCHEMA {
            return Err(EnvelopeError::Schema(envelope.schema));
        }
        Ok(envelope)
    }

    /// Decodes an envelope read from an internal topic, which trusts nothing: beside the
    /// schema, its idempotency key and source topic must be text PostgreSQL can hold (no
    /// NUL) and a key no longer than [`crate::idempotency::MAX_KEY_BYTES`], or every
    /// batch the record joins, and its dead letter, would fail. Err: why, for the DLQ.
    pub fn decode_internal(bytes: &[u8]) -> Result<Self, String> {
        let envelope = Self::decode_from(bytes).map_err(|e| e.to_string())?;
        let key = &envelope.idempotency_key;
        let topic = envelope.source.as_ref().map(|s| s.topic.as_str()).unwrap_or_default();
        let max = crate::idempotency::MAX_KEY_BYTES;
        if key.len() > max {
            Err(format!("the envelope's idempotency key is {} bytes; at most {max} are accepted", key.len()))
        } else if key.contains('\0') || topic.contains('\0') {
            Err("the envelope's idempotency key or source topic holds a NUL character".to_string())
        } else {
            Ok(envelope)
        }
    }

    pub fn result(&self) -> Option<&EnrichmentResult> {
        match &self.outcome {
            Some(Outcome::Result(r)) => Some(r),
            _ => None,
        }
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.outcome {
            Some(Outcome::Failure(f)) => Some(f),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let envelope = Envelope {
            schema: SCHEMA.into(),
            pipeline: "support".into(),
            idempotency_key: "support:42".into(),
            source: Some(SourceCoordinates {
                topic: "events.raw".into(),
                partition: 3,
                offset: 1234,
                timestamp_ms: 1_700_000_000_000,
                key: Some(b"customer-7".to_vec()),
            }),
            payload: br#"{"id":"42"}"#.to_vec(),
            headers: vec![Header { key: "h".into(), value: Some(vec![0, 159, 146, 150]) }],
            attempt: 2,
            outcome: Some(Outcome::Result(EnrichmentResult {
                json: r#"{"category":"billing"}"#.into(),
                model: "m".into(),
                prompt_version: "p1".into(),
                input_tokens: 10,
                output_tokens: 5,
                result_hash: "ab".into(),
                cached: true,
            })),
        };
        let decoded = Envelope::decode_from(&envelope.encode_to_bytes()).unwrap();
        assert_eq!(decoded, envelope);
        assert_eq!(decoded.result().unwrap().input_tokens, 10);
        assert!(decoded.failure().is_none());
    }

    #[test]
    fn rejects_garbage_and_foreign_schema() {
        assert!(matches!(Envelope::decode_from(b"\xff\xff\xff"), Err(EnvelopeError::Decode(_))));
        let other = Envelope { schema: "enrichment.v9".into(), ..Default::default() };
        assert!(matches!(
            Envelope::decode_from(&other.encode_to_bytes()),
            Err(EnvelopeError::Schema(s)) if s == "enrichment.v9"
        ));
    }
}
