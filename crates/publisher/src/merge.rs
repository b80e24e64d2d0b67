//! The output record: the source JSON object with the enrichment added under
//! `enrichment`.

use enrich_common::envelope::Envelope;
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use serde_json::Value;

pub const FIELD: &str = "enrichment";

pub fn merge_output(envelope: &Envelope) -> Result<Vec<u8>, RecordError> {
    let result =
        envelope.result().ok_or_else(|| RecordError::invalid(Reason::NoResult, "the envelope carries no result"))?;
    let mut source: Value = serde_json::from_slice(&envelope.payload)
        .map_err(|e| RecordError::invalid(Reason::InvalidJson, format!("the source payload is not JSON: {e}")))?;
    let enrichment: Value = serde_json::from_str(&result.json)
        .map_err(|e| RecordError::invalid(Reason::InvalidJson, format!("the stored result is not JSON: {e}")))?;
    let object = source
        .as_object_mut()
        .ok_or_else(|| RecordError::invalid(Reason::NotAnObject, "the source payload is not a JSON object"))?;
    object.insert(FIELD.to_string(), enrichment);
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
    fn adds_the_enrichment_and_keeps_every_source_field() {
        let out = merge_output(&envelope(r#"{"id":"1","body":"ü","n":[1,2]}"#, r#"{"category":"billing"}"#)).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], "1");
        assert_eq!(v["body"], "ü");
        assert_eq!(v["n"], serde_json::json!([1, 2]));
        assert_eq!(v["enrichment"]["category"], "billing");
    }

    #[test]
    fn refuses_non_objects_and_missing_results() {
        assert_eq!(merge_output(&envelope("[1]", "{}")).unwrap_err().reason, Reason::NotAnObject);
        let bare = Envelope { payload: b"{}".to_vec(), ..Default::default() };
        assert_eq!(merge_output(&bare).unwrap_err().reason, Reason::NoResult);
    }
}
