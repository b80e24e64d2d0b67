//! The byte budget of a source record. Ingest forwards a record as an envelope on
//! `enrich.requests`, which carries its value, its headers and a second copy of its key,
//! plus fields and headers of its own; librdkafka refuses to produce a record over
//! `message.max.bytes`. A record is accepted only when that envelope can be produced:
//! its weight (below) must stay within the smaller of `pipeline.max_record_bytes` and
//! `message.max.bytes` less the envelope's fixed overhead. Anything heavier is
//! dead-lettered `too_large` at ingest (its DLQ copy is cut to fit by the sink).

use enrich_common::Settings;

use crate::inspect::MAX_KEY_BYTES;

/// The most bytes a varint of a 32-bit (64-bit) length or number takes.
const VARINT32: usize = 5;
const VARINT64: usize = 10;
/// One protobuf field of `len` bytes, at most: its tag, its length, its bytes.
const fn field(len: usize) -> usize {
    1 + VARINT32 + len
}
/// One record header on the wire, at most (librdkafka's count: name, value, two varints).
const fn record_header(name: &str, value_len: usize) -> usize {
    name.len() + value_len + 2 * VARINT32
}
/// librdkafka's framing of one record (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length,
/// attributes, timestamp delta, offset delta, key length, value length, header count).
const RECORD_FRAMING: usize = VARINT32 + 1 + VARINT64 + VARINT32 + VARINT32 + VARINT32 + VARINT32;
/// What one source header costs beyond its name and value bytes: its entry in the
/// envelope (the entry's tag and length, the name's tag and length, the value's tag and
/// length). An empty header costs this much too, so a record cannot pass a flood of
/// them as weightless.
pub const HEADER_OVERHEAD: usize = 3 * (1 + VARINT32);
/// The longest topic name Kafka allows.
const MAX_TOPIC_CHARS: usize = 249;
/// W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
const TRACEPARENT_LEN: usize = 55;

/// The weight limit of a source record, and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// A record weighing more is dead-lettered `too_large`.
    pub max_bytes: usize,
    /// `message.max.bytes` less [`fixed_overhead`]: the other bound.
    pub producer_bytes: usize,
    pub max_record_bytes: usize,
}

impl Budget {
    pub fn new(settings: &Settings) -> Self {
        let producer_bytes = settings.kafka.message_max_bytes().saturating_sub(fixed_overhead(settings));
        let max_record_bytes = settings.pipeline.max_record_bytes;
        Self { max_bytes: max_record_bytes.min(producer_bytes), producer_bytes, max_record_bytes }
    }

    /// The limit and the setting it comes from, for a dead letter's message.
    pub fn describe(&self) -> String {
        if self.max_bytes < self.max_record_bytes {
            format!(
                "{} (kafka.client.message.max.bytes less the envelope's overhead; pipeline.max_record_bytes is {})",
                self.max_bytes, self.max_record_bytes
            )
        } else {
            format!("{} (pipeline.max_record_bytes)", self.max_bytes)
        }
    }
}

/// The weight of a source record: what of it the forwarded envelope's record carries,
/// each header counted with [`HEADER_OVERHEAD`], the key twice (the record's key and the
/// envelope's copy), and `tracestate` once more (it is also a header of the forwarded
/// record).
pub fn weight(value: usize, key: usize, headers: &[(String, Option<Vec<u8>>)]) -> usize {
    let header_bytes: usize =
        headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + HEADER_OVERHEAD).sum();
    let tracestate = enrich_common::headers::find(headers, enrich_common::headers::TRACESTATE).map_or(0, str::len);
    value + 2 * key + header_bytes + tracestate
}

/// What the forwarded record takes beyond the source record's weight, at most: the
/// record's framing, its `idempotency-key`, `traceparent` and `tracestate` headers (the
/// value of the last is in the weight), and the envelope's own fields (schema,
/// pipeline, idempotency key, source coordinates, the framing of payload, key and
/// headers, attempt). About 1.7 KB for the default pipeline name.
pub fn fixed_overhead(settings: &Settings) -> usize {
    use enrich_common::headers::{IDEMPOTENCY_KEY, TRACEPARENT, TRACESTATE};
    let topic = settings.pipeline.sources.iter().map(|s| s.topic.len()).max().unwrap_or(0).max(MAX_TOPIC_CHARS);
    let record = RECORD_FRAMING
        + record_header(IDEMPOTENCY_KEY, MAX_KEY_BYTES)
        + record_header(TRACEPARENT, TRACEPARENT_LEN)
        + record_header(TRACESTATE, 0);
    let source = field(field(topic) + 3 * (1 + VARINT64) + field(0));
    let envelope = field(enrich_common::envelope::SCHEMA.len())
        + field(settings.pipeline.name.len())
        + field(MAX_KEY_BYTES)
        + source
        + field(0)
        + 1
        + VARINT32;
    record + envelope
}

#[cfg(test)]
mod tests {
    use super::*;
    use enrich_common::envelope::{Envelope, Header, SourceCoordinates};

    fn settings(client: &[(&str, &str)], max_record_bytes: usize) -> Settings {
        let mut s = Settings::from_toml(include_str!("../../../config/pipeline.toml"), Vec::new()).unwrap();
        s.kafka.client = client.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        s.pipeline.max_record_bytes = max_record_bytes;
        s
    }

    #[test]
    fn the_limit_is_the_smaller_of_the_two_settings() {
        let b = Budget::new(&settings(&[], 1024 * 1024));
        assert_eq!(b.max_bytes, 1_000_000 - fixed_overhead(&settings(&[], 1)));
        assert!(b.describe().contains("message.max.bytes"), "{}", b.describe());
        let b = Budget::new(&settings(&[], 64 * 1024));
        assert_eq!(b.max_bytes, 64 * 1024);
        assert!(b.describe().contains("(pipeline.max_record_bytes)"), "{}", b.describe());
        let b = Budget::new(&settings(&[("message.max.bytes", "16777216")], 1024 * 1024));
        assert_eq!(b.max_bytes, 1024 * 1024);
    }

    /// The worst forwarded record of a source record at the limit still fits
    /// `message.max.bytes`, as librdkafka counts it.
    #[test]
    fn a_record_of_the_limits_weight_fits_the_producer() {
        let s = settings(&[], 1024 * 1024);
        let budget = Budget::new(&s);
        let key = vec![b'k'; 1000];
        let tracestate = "a=".to_string() + &"b".repeat(500);
        let headers: Vec<(String, Option<Vec<u8>>)> = vec![
            ("tracestate".into(), Some(tracestate.clone().into_bytes())),
            ("x".into(), None),
            ("".into(), Some(Vec::new())),
            ("big".into(), Some(vec![b'h'; 300_000])),
        ];
        let value_len = budget.max_bytes - weight(0, key.len(), &headers);
        assert_eq!(weight(value_len, key.len(), &headers), budget.max_bytes);
        let envelope = Envelope {
            schema: enrich_common::envelope::SCHEMA.into(),
            pipeline: s.pipeline.name.clone(),
            idempotency_key: "k".repeat(MAX_KEY_BYTES),
            source: Some(SourceCoordinates {
                topic: "t".repeat(249),
                partition: i32::MAX,
                offset: i64::MAX,
                timestamp_ms: i64::MAX,
                key: Some(key.clone()),
            }),
            payload: vec![b'v'; value_len],
            headers: headers.iter().map(|(k, v)| Header { key: k.clone(), value: v.clone() }).collect(),
            attempt: u32::MAX,
            outcome: None,
        };
        let record_headers = record_header("idempotency-key", MAX_KEY_BYTES)
            + record_header("traceparent", TRACEPARENT_LEN)
            + record_header("tracestate", tracestate.len());
        let wire = RECORD_FRAMING + key.len() + envelope.encode_to_bytes().len() + record_headers;
        assert!(wire <= s.kafka.message_max_bytes(), "{wire} bytes on the wire");
    }

    #[test]
    fn empty_headers_are_not_weightless() {
        let many: Vec<(String, Option<Vec<u8>>)> = (0..100_000).map(|_| (String::new(), None)).collect();
        assert_eq!(weight(10, 0, &many), 10 + 100_000 * HEADER_OVERHEAD);
        assert!(weight(10, 0, &many) > Budget::new(&settings(&[], 1024 * 1024)).max_bytes);
    }
}
