//! Idempotency keys: how a source record is recognised when it is seen again.
//!
//! A key is derived per source topic by a configured strategy and namespaced by the
//! pipeline name (`<pipeline>:<value>`), so two pipelines sharing a database never
//! collide.

use crate::error::Reason;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;

use crate::error::RecordError;

/// How the key of a record is found.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyStrategy {
    /// The value of a Kafka header (UTF-8, not empty).
    Header {
        #[serde(default = "default_header")]
        name: String,
    },
    /// One or more JSON pointers (RFC 6901) into the JSON payload. Each must reach a
    /// string, number or boolean.
    JsonPointer { pointers: Vec<String> },
    /// SHA-256 of the record's Kafka key and value, byte for byte. The payload is not
    /// canonicalised: the same JSON object with its fields in another order is another key.
    Hash,
}

fn default_header() -> String {
    crate::headers::IDEMPOTENCY_KEY.to_string()
}

/// The longest idempotency key accepted (PostgreSQL indexes the keys; a btree entry must
/// stay well under a page). Ingest refuses longer ones; the internal topics treat an
/// envelope with a longer one as foreign.
pub const MAX_KEY_BYTES: usize = 512;

/// The key that identifies one logical event within a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Wraps a key read back from the wire or the database (already namespaced).
    pub fn from_stored(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    fn namespaced(pipeline: &str, value: &str) -> Self {
        Self(format!("{pipeline}:{value}"))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a strategy may look at.
pub struct RecordView<'a> {
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(String, Option<Vec<u8>>)],
    /// The parsed payload, when the pipeline's format is JSON and it parsed.
    pub json: Option<&'a Value>,
    pub value: Option<&'a [u8]>,
}

impl KeyStrategy {
    pub fn derive(&self, pipeline: &str, record: &RecordView<'_>) -> Result<IdempotencyKey, RecordError> {
        match self {
            KeyStrategy::Header { name } => {
                let raw = record.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref()).ok_or_else(
                    || RecordError::invalid(Reason::MissingKeyField, format!("header {name:?} is missing")),
                )?;
                let value = std::str::from_utf8(raw)
                    .map_err(|_| RecordError::invalid(Reason::InvalidKey, format!("header {name:?} is not UTF-8")))?;
                if value.is_empty() {
                    return Err(RecordError::invalid(Reason::MissingKeyField, format!("header {name:?} is empty")));
                }
                Ok(IdempotencyKey::namespaced(pipeline, value))
            }
            KeyStrategy::JsonPointer { pointers } => {
                let json =
                    record.json.ok_or_else(|| RecordError::invalid(Reason::InvalidJson, "the payload is not JSON"))?;
                let mut parts = Vec::with_capacity(pointers.len());
                for pointer in pointers {
                    parts.push(scalar_at(json, pointer)?);
                }
                let value = if parts.len() == 1 {
                    parts.remove(0)
                } else {
                    // A JSON array keeps the parts unambiguous whatever they contain.
                    Value::from(parts).to_string()
                };
                Ok(IdempotencyKey::namespaced(pipeline, &value))
            }
            KeyStrategy::Hash => {
                Ok(IdempotencyKey::namespaced(pipeline, &format!("sha256:{}", content_hash(record.key, record.value))))
            }
        }
    }
}

fn scalar_at(json: &Value, pointer: &str) -> Result<String, RecordError> {
    match json.pointer(pointer) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        None | Some(Value::Null) => {
            Err(RecordError::invalid(Reason::MissingKeyField, format!("key field {pointer} is missing or null")))
        }
        Some(Value::String(_)) => {
            Err(RecordError::invalid(Reason::MissingKeyField, format!("key field {pointer} is empty")))
        }
        Some(_) => Err(RecordError::invalid(
            Reason::InvalidKey,
            format!("key field {pointer} is not a string, number or boolean"),
        )),
    }
}

/// SHA-256 over the key and value with a length prefix, so (key, value) pairs that
/// concatenate to the same bytes still differ.
pub fn content_hash(key: Option<&[u8]>, value: Option<&[u8]>) -> String {
    let mut hasher = Sha256::new();
    for part in [key, value] {
        match part {
            Some(bytes) => {
                hasher.update([1u8]);
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            }
            None => hasher.update([0u8]),
        }
    }
    hex::encode(hasher.finalize())
}

/// The key given to a record whose configured key could not be derived (it is about to
/// be dead-lettered): its content hash, so it can still be found and replayed.
pub fn fallback_key(pipeline: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> IdempotencyKey {
    IdempotencyKey::namespaced(pipeline, &format!("sha256:{}", content_hash(key, value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view<'a>(json: Option<&'a Value>, value: Option<&'a [u8]>) -> RecordView<'a> {
        RecordView { key: None, headers: &[], json, value }
    }

    fn pointers(p: &[&str]) -> KeyStrategy {
        KeyStrategy::JsonPointer { pointers: p.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn json_pointer_single_field_is_namespaced() {
        let doc = json!({"id": "T-1", "n": 7});
        let k = pointers(&["/id"]).derive("support", &view(Some(&doc), None)).unwrap();
        assert_eq!(k.as_str(), "support:T-1");
        let k = pointers(&["/n"]).derive("support", &view(Some(&doc), None)).unwrap();
        assert_eq!(k.as_str(), "support:7");
    }

    #[test]
    fn json_pointer_several_fields_nested_and_unicode() {
        let doc = json!({"order": {"id": "Ω-9"}, "tenant": "zürich|eu"});
        let k = pointers(&["/tenant", "/order/id"]).derive("p", &view(Some(&doc), None)).unwrap();
        assert_eq!(k.as_str(), r#"p:["zürich|eu","Ω-9"]"#);
    }

    #[test]
    fn numeric_ids_keep_their_literal_text() {
        let a: serde_json::Value = serde_json::from_str(r#"{"id": 123456789012345678901234567890}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"id": 123456789012345678901234567891}"#).unwrap();
        let ka = pointers(&["/id"]).derive("p", &view(Some(&a), None)).unwrap();
        let kb = pointers(&["/id"]).derive("p", &view(Some(&b), None)).unwrap();
        assert_eq!(ka.as_str(), "p:123456789012345678901234567890");
        assert_ne!(ka, kb, "two ids beyond u64 made one key");
        // 2^53 + 1 is where f64 stops counting by one.
        let c: serde_json::Value = serde_json::from_str(r#"{"id": 9007199254740993}"#).unwrap();
        assert_eq!(pointers(&["/id"]).derive("p", &view(Some(&c), None)).unwrap().as_str(), "p:9007199254740993");
        let f: serde_json::Value = serde_json::from_str(r#"{"id": 1.50}"#).unwrap();
        assert_eq!(pointers(&["/id"]).derive("p", &view(Some(&f), None)).unwrap().as_str(), "p:1.50");
    }

    #[test]
    fn json_pointer_missing_null_empty_or_composite_field_is_invalid_input() {
        let doc = json!({"id": null, "empty": "", "obj": {"a": 1}});
        for (p, reason) in [
            ("/id", Reason::MissingKeyField),
            ("/nope", Reason::MissingKeyField),
            ("/empty", Reason::MissingKeyField),
            ("/obj", Reason::InvalidKey),
        ] {
            let err = pointers(&[p]).derive("p", &view(Some(&doc), None)).unwrap_err();
            assert_eq!(err.reason, reason, "pointer {p}");
            assert_eq!(err.class, crate::ErrorClass::InvalidInput);
            assert!(err.message.contains(p));
        }
        let err = pointers(&["/id"]).derive("p", &view(None, Some(b"nope"))).unwrap_err();
        assert_eq!(err.reason, Reason::InvalidJson);
    }

    #[test]
    fn header_strategy_reads_named_header() {
        let headers = vec![
            ("other".to_string(), Some(b"x".to_vec())),
            ("idempotency-key".to_string(), Some("ключ-1".as_bytes().to_vec())),
        ];
        let rec = RecordView { key: None, headers: &headers, json: None, value: None };
        let strategy: KeyStrategy = toml::from_str(r#"strategy = "header""#).unwrap();
        assert_eq!(strategy.derive("p", &rec).unwrap().as_str(), "p:ключ-1");

        let missing = KeyStrategy::Header { name: "absent".into() }.derive("p", &rec).unwrap_err();
        assert_eq!(missing.reason, Reason::MissingKeyField);
        let bad = vec![("idempotency-key".to_string(), Some(vec![0xff, 0xfe]))];
        let rec = RecordView { key: None, headers: &bad, json: None, value: None };
        assert_eq!(strategy.derive("p", &rec).unwrap_err().reason, Reason::InvalidKey);
    }

    #[test]
    fn hash_strategy_is_byte_exact_and_covers_key_and_value() {
        let a = br#"{"id":1,"b":2}"#;
        let b = br#"{"b":2,"id":1}"#;
        let derive = |key: Option<&[u8]>, value: &[u8]| {
            KeyStrategy::Hash.derive("p", &RecordView { key, headers: &[], json: None, value: Some(value) }).unwrap()
        };
        // Same bytes, same key; reordered fields are other bytes, so another key (documented).
        assert_eq!(derive(None, a), derive(None, a));
        assert_ne!(derive(None, a), derive(None, b));
        // The Kafka key takes part, and the length prefix keeps the boundary.
        assert_ne!(derive(Some(b"k1"), a), derive(Some(b"k2"), a));
        assert_ne!(derive(Some(b"ab"), b"c"), derive(Some(b"a"), b"bc"));
        assert!(derive(None, a).as_str().starts_with("p:sha256:"));
        assert_eq!(derive(None, a).as_str().len(), "p:sha256:".len() + 64);
    }

    #[test]
    fn strategies_parse_from_toml() {
        let s: KeyStrategy = toml::from_str("strategy = \"json_pointer\"\npointers = [\"/id\"]").unwrap();
        assert_eq!(s, pointers(&["/id"]));
        assert!(toml::from_str::<KeyStrategy>("strategy = \"nope\"").is_err());
    }
}
