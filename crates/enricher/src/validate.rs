//! Local validation of the LLM's answer against the pipeline's output JSON schema,
//! whatever the provider promised.

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
                "invalid_json",
                format!("the answer is not JSON: {e}"),
            )
        })?;
        let errors: Vec<String> =
            self.validator.iter_errors(&value).take(5).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(RecordError::new(enrich_common::ErrorClass::Permanent, "schema_violation", errors.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"object","required":["category"],"additionalProperties":false,
        "properties":{"category":{"type":"string","enum":["billing","other"]},"summary":{"type":"string","maxLength":5}}}"#;

    #[test]
    fn accepts_conforming_output() {
        let v = OutputValidator::new(SCHEMA).unwrap();
        assert_eq!(v.validate(r#" {"category":"billing"} "#).unwrap()["category"], "billing");
    }

    #[test]
    fn rejects_bad_json_and_schema_violations_with_reasons() {
        let v = OutputValidator::new(SCHEMA).unwrap();
        assert_eq!(v.validate("Sure! {category: billing}").unwrap_err().reason, "invalid_json");
        let e = v.validate(r#"{"category":"food","summary":"too long"}"#).unwrap_err();
        assert_eq!(e.reason, "schema_violation");
        assert!(e.message.contains("food"), "{}", e.message);
        assert_eq!(v.validate(r#"{"extra":1}"#).unwrap_err().reason, "schema_violation");
    }

    #[test]
    fn an_invalid_schema_is_a_configuration_error() {
        let err = OutputValidator::new(r#"{"type": 12}"#).err().unwrap();
        assert!(err.to_string().contains("llm.output_schema"));
    }
}
