//! The output record: the source JSON object with the key's stored enrichment added
//! under `enrichment`.

use enrich_common::envelope::Envelope;
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use serde_json::{Map, Value};

pub const FIELD: &str = "enrichment";

/// The source record a results record carries, as the JSON object its output is built
/// on (checked before the key is bound: a source that is no object dead-letters it).
pub fn source_of(envelope: &Envelope) -> Result<Map<String, Value>, RecordError> {
    if envelope.result().is_none() {
        return Err(RecordError::invalid(Reason::NoResult, "the envelope carries no result"));
    }
    match serde_json::from_slice(&envelope.payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(RecordError::invalid(Reason::NotAnObject, "the source payload is not a JSON object")),
        Err(e) => Err(RecordError::invalid(Reason::InvalidJson, format!("the source payload is not JSON: {e}"))),
    }
}

/// The output: `source` with `enrichment`, the result stored for the key.
pub fn merge_output(mut source: Map<String, Value>, enrichment: Value) -> Result<Vec<u8>, RecordError> {
    source.insert(FIELD.to_string(), enrichment);
    serde_json::to_vec(&source).map_err(|e| RecordError::invalid(Reason::InvalidJson, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use enrich_common::envelope::{EnrichmentResult, Outcome};

    fn envelope(payload: &str, result: &str) -> Envelope {
        Envelope {
            payload: payload.as_bytes().to_vec(),
            outcome: Some(Outcome::Result(EnrichmentResult { json: result.into(), ..Default::default() })),
            ..Default::default()
        }
    }

    #[test]
    fn adds_the_stored_enrichment_and_keeps_every_source_field() {
        // The record carries one result; the output has the stored one.
        let source = source_of(&envelope(r#"{"id":"1","body":"ü","n":[1,2]}"#, r#"{"category":"forged"}"#)).unwrap();
        let out = merge_output(source, serde_json::json!({"category": "billing"})).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], "1");
        assert_eq!(v["body"], "ü");
        assert_eq!(v["n"], serde_json::json!([1, 2]));
        assert_eq!(v["enrichment"]["category"], "billing");
    }

    #[test]
    fn refuses_non_objects_and_missing_results() {
        assert_eq!(source_of(&envelope("[1]", "{}")).unwrap_err().reason, Reason::NotAnObject);
        assert_eq!(source_of(&envelope("{", "{}")).unwrap_err().reason, Reason::InvalidJson);
        let bare = Envelope { payload: b"{}".to_vec(), ..Default::default() };
        assert_eq!(source_of(&bare).unwrap_err().reason, Reason::NoResult);
    }
}
