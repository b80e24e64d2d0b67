//! Properties over arbitrary input: decoding an envelope, deriving an idempotency key and
//! reading headers never panic, and every input is classified.

use enrich_common::envelope::Envelope;
use enrich_common::headers;
use enrich_common::idempotency::RecordView;
use enrich_common::{ErrorClass, KeyStrategy};
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders};

fn strategies() -> Vec<KeyStrategy> {
    vec![
        KeyStrategy::Header { name: headers::IDEMPOTENCY_KEY.to_string() },
        KeyStrategy::JsonPointer { pointers: vec!["/id".into()] },
        KeyStrategy::JsonPointer { pointers: vec!["/a".into(), "/b/0".into()] },
        KeyStrategy::Hash,
    ]
}

fn header_pairs() -> impl Strategy<Value = Vec<(String, Option<Vec<u8>>)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(headers::IDEMPOTENCY_KEY.to_string()), any::<String>()],
            prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        ),
        0..6,
    )
}

/// JSON documents with ids of every kind (strings, integers of any length, decimals,
/// booleans, nulls, objects), beside arbitrary bytes.
fn payloads() -> impl Strategy<Value = Vec<u8>> {
    let id = prop_oneof![
        any::<String>().prop_map(|s| serde_json::Value::String(s).to_string()),
        "[1-9][0-9]{0,60}",
        "-?[0-9]{1,20}\\.[0-9]{1,20}(e[+-]?[0-9]{1,3})?",
        Just("true".to_string()),
        Just("null".to_string()),
        Just("{\"x\":1}".to_string()),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (id.clone(), id).prop_map(|(a, b)| format!(r#"{{"id": {a}, "a": {b}, "b": [{a}]}}"#).into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_any_bytes_as_an_envelope_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(envelope) = Envelope::decode_from(&bytes) {
            // What decodes encodes back to an envelope that decodes the same.
            prop_assert_eq!(Envelope::decode_from(&envelope.encode_to_bytes()).ok(), Some(envelope));
        }
    }

    #[test]
    fn every_record_gets_a_key_or_an_invalid_input_error(
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        value in prop::option::of(payloads()),
        pairs in header_pairs(),
    ) {
        let json: Option<serde_json::Value> = value.as_deref().and_then(|v| serde_json::from_slice(v).ok());
        let view = RecordView { key: key.as_deref(), headers: &pairs, json: json.as_ref(), value: value.as_deref() };
        for strategy in strategies() {
            match strategy.derive("p", &view) {
                Ok(k) => {
                    prop_assert!(k.as_str().starts_with("p:"), "{:?}", k);
                    prop_assert!(k.as_str().len() > 2, "an empty key: {:?}", k);
                }
                Err(e) => {
                    prop_assert_eq!(e.class, ErrorClass::InvalidInput);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }

    #[test]
    fn distinct_ids_make_distinct_keys(a in "[1-9][0-9]{0,60}", b in "[1-9][0-9]{0,60}") {
        let strategy = KeyStrategy::JsonPointer { pointers: vec!["/id".into()] };
        let key = |id: &str| {
            let json: serde_json::Value = serde_json::from_str(&format!(r#"{{"id": {id}}}"#)).unwrap();
            let view = RecordView { key: None, headers: &[], json: Some(&json), value: None };
            strategy.derive("p", &view).unwrap()
        };
        let ka = key(&a);
        prop_assert_eq!(ka.as_str(), format!("p:{a}"));
        if a != b {
            prop_assert_ne!(key(&a), key(&b));
        }
    }

    #[test]
    fn headers_are_read_whatever_their_bytes(pairs in header_pairs()) {
        let mut owned = OwnedHeaders::new();
        for (name, value) in &pairs {
            owned = owned.insert(Header { key: name, value: value.as_deref() });
        }
        let collected = headers::collect_checked(Some(&owned));
        prop_assert_eq!(collected.invalid_names, 0);
        prop_assert_eq!(collected.pairs, pairs);
    }
}
