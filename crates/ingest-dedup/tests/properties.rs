//! Ingest's inspection over arbitrary records: it never panics, and every record is
//! either forwarded (an envelope under its derived key) or dead-lettered with one of the
//! known reasons, as invalid input.

use enrich_common::config::{PipelineSettings, SourceTopic};
use enrich_common::error::Reason;
use enrich_common::{ErrorClass, KeyStrategy, headers};
use ingest_dedup::budget::Budget;
use ingest_dedup::inspect::{Inspected, inspect};
use proptest::prelude::*;
use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

fn pipeline(key: KeyStrategy) -> PipelineSettings {
    PipelineSettings {
        name: "p".into(),
        sources: vec![SourceTopic { topic: "raw".into(), key }],
        max_record_bytes: 4 * 1024,
    }
}

fn values() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..6000),
        (any::<String>(), any::<String>())
            .prop_map(|(id, body)| serde_json::json!({"id": id, "body": body}).to_string().into_bytes()),
        "[1-9][0-9]{0,40}".prop_map(|id| format!(r#"{{"id": {id}}}"#).into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn every_record_is_forwarded_or_dead_lettered_with_a_known_reason(
        value in prop::option::of(values()),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..600)),
        pairs in prop::collection::vec((any::<String>(), prop::option::of(prop::collection::vec(any::<u8>(), 0..300))), 0..8),
        hash in any::<bool>(),
    ) {
        let strategy =
            if hash { KeyStrategy::Hash } else { KeyStrategy::JsonPointer { pointers: vec!["/id".into()] } };
        let settings = pipeline(strategy);
        let mut owned = OwnedHeaders::new();
        for (name, v) in &pairs {
            owned = owned.insert(Header { key: name, value: v.as_deref() });
        }
        // A record with no headers has none in rdkafka's API (an empty list means
        // librdkafka could not read them: kafka::detach).
        let owned = (!pairs.is_empty()).then_some(owned);
        let message = OwnedMessage::new(value.clone(), key, "raw".into(), Timestamp::CreateTime(1), 0, 7, owned);
        let collected = headers::collect_checked(rdkafka::Message::headers(&message));
        let budget = Budget { max_bytes: 4 * 1024, producer_bytes: 1_000_000, max_record_bytes: 4 * 1024 };
        match inspect(&settings, &budget, &message, &collected) {
            Inspected::Valid(s) => {
                prop_assert_eq!(s.envelope.idempotency_key.as_str(), s.key.as_str());
                prop_assert!(!s.key.as_str().contains('\0'));
                prop_assert_eq!(Some(s.envelope.payload.as_slice()), value.as_deref());
                prop_assert!(std::str::from_utf8(&s.envelope.payload).is_ok());
            }
            Inspected::Invalid { error, envelope, .. } => {
                prop_assert_eq!(error.class, ErrorClass::InvalidInput);
                prop_assert!(Reason::ALL.contains(&error.reason), "{:?}", error.reason);
                prop_assert!(!error.message.is_empty());
                prop_assert!(!envelope.idempotency_key.is_empty());
            }
        }
    }
}
