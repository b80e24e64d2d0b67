//! Local validation of the LLM's answer against the pipeline's output JSON schema,
//! whatever the provider promised.

use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use serde_json::Value;

pub struct OutputValidator {
    validator: jsonschema::Validator,
    pub schema: Value,
}

impl OutputValidator {
    pub fn new(schema_text: &str) -> anyhow::Result<Self> {
        let schema: Value = serde_json::from_str(schema_text)
            .map_err(|e| anyhow::anyhow!("invalid configuration: `llm.output_schema`: not JSON: {e}"))?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| anyhow::anyhow!("invalid configuration: `llm.output_schema`: not a valid JSON schema: {e}"))?;
        Ok(Self { validator, schema })
    }

    /// Parses the model's text and checks it against the schema.
    pub fn validate(&self, content: &str) -> Result<Value, RecordError> {
        let value: Value = serde_json::from_str(content.trim()).map_err(|e| {
            RecordError::new(
                enrich_common::ErrorClass::Permanent,
                Reason::InvalidJson,
                format!("the answer is not JSON: {e}"),
            )
        })?;
        // PostgreSQL's jsonb cannot hold U+0000 (the answer could not be stored, and its
        // micro-batch would fail with it): such an answer is invalid output.
        if holds_nul(&value) {
            return Err(RecordError::new(
                enrich_common::ErrorClass::Permanent,
                Reason::SchemaViolation,
                "the answer contains a NUL character (U+0000), which cannot be stored",
            ));
        }
        // Where the answer fails and which rule, never what it holds: the validator's own
        // messages quote the answer's values (personal data, in a listing of dead letters).
        let errors: Vec<String> = self
            .validator
            .iter_errors(&value)
            .take(5)
            .map(|e| {
                let rule = e.schema_path().to_string();
                let keyword = rule.rsplit('/').next().unwrap_or_default().to_string();
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("{at} fails `{keyword}` (schema {rule})").replace('\0', "\\u0000")
            })
            .collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(RecordError::new(enrich_common::ErrorClass::Permanent, Reason::SchemaViolation, errors.join("; ")))
        }
    }
}

/// Whether any string (or property name) of `value` holds U+0000.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"object","required":["category"],"additionalProperties":false,
        "properties":{"category":{"type":"string","enum":["billing","other"]},"summary":{"type":"string","maxLength":5}}}"#;

    #[test]
    fn refuses_an_answer_holding_nul() {
        let v = OutputValidator::new(SCHEMA).unwrap();
        let e = v.validate(r#"{"category":"billing","summary":"a\u0000"}"#).unwrap_err();
        assert!(e.message.contains("NUL"), "{e}");
        assert!(v.validate(r#"{"category":"billing","x\u0000":1}"#).is_err());
    }

    #[test]
    fn accepts_conforming_output() {
        let v = OutputValidator::new(SCHEMA).unwrap();
        assert_eq!(v.validate(r#" {"category":"billing"} "#).unwrap()["category"], "billing");
    }

    #[test]
    fn rejects_bad_json_and_schema_violations_with_reasons() {
        let v = OutputValidator::new(SCHEMA).unwrap();
        assert_eq!(v.validate("Sure! {category: billing}").unwrap_err().reason, Reason::InvalidJson);
        let e = v.validate(r#"{"category":"food","summary":"too long"}"#).unwrap_err();
        assert_eq!(e.reason, Reason::SchemaViolation);
        // Where and which rule, not the answer's values (they end up in DLQ listings).
        assert!(
            e.message.contains("/category fails `enum`") && e.message.contains("/summary fails `maxLength`"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("food") && !e.message.contains("too long"), "{}", e.message);
        let e = v.validate(r#"{"extra-4111111111111111":1}"#).unwrap_err();
        assert_eq!(e.reason, Reason::SchemaViolation);
        assert!(!e.message.contains("4111111111111111"), "{}", e.message);
    }

    #[test]
    fn an_invalid_schema_is_a_configuration_error() {
        let err = OutputValidator::new(r#"{"type": 12}"#).err().unwrap();
        assert!(err.to_string().contains("llm.output_schema"));
    }
}
