//! The one dead-letter path every stage takes: the DLQ limit applied the same way (a
//! stage about to dead-letter most of what it reads holds instead, and says why), the
//! dead letter built and cut to fit the producer's limit, and the envelope of a foreign
//! record (bytes on a topic that are not what it carries) built once. How the DLQ record
//! and its `dead_letters` row are written together is each stage's (ingest writes both
//! per batch; the enricher claims the key and a pending row first; the publisher writes
//! pending rows before its Kafka transaction and lists them after it), through
//! `dead_letter_store`.

use rdkafka::Message;
use rdkafka::message::OwnedHeaders;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Settings, Stage};
use crate::dead_letter::{dead_letter, dlq_headers};
use crate::dlq_limit::DlqLimit;
use crate::envelope::{self, Envelope, SourceCoordinates};
use crate::error::RecordError;
use crate::http::Condition;
use crate::http::ServiceState;
use crate::idempotency::fallback_key;
use crate::service::StageMetrics;
use crate::shutdown::Shutdown;
use crate::trace_context::TraceContext;

/// Room kept for a DLQ record's key, headers and framing.
const RECORD_OVERHEAD: usize = 64 * 1024;

pub struct DeadLetterSink {
    stage: Stage,
    pipeline: String,
    limit: Mutex<DlqLimit>,
    metrics: StageMetrics,
    state: Arc<ServiceState>,
    /// The most bytes a DLQ record's value may take.
    max_value_bytes: usize,
}

impl DeadLetterSink {
    pub fn new(settings: &Settings, stage: Stage, metrics: StageMetrics, state: Arc<ServiceState>) -> Self {
        Self {
            stage,
            pipeline: settings.pipeline.name.clone(),
            limit: Mutex::new(DlqLimit::new(settings.dlq_limit.clone())),
            metrics,
            state,
            max_value_bytes: max_value_bytes(settings),
        }
    }

    /// Whether `dead` more dead letters, after `ok` good records, stay within the DLQ
    /// limit. When they do not, the stage says why (`enrich_dlq_limit_tripped`,
    /// `/readyz`, one log line) and the caller holds them: their offsets wait.
    pub fn check(&self, dead: usize, ok: usize) -> Result<(), String> {
        let verdict = match self.limit.lock() {
            Ok(limit) => limit.check(dead, ok),
            Err(_) => Err("DLQ limit lock poisoned".to_string()),
        };
        if let Err(why) = &verdict {
            if self.metrics.dlq_limit_tripped.get() == 0 {
                tracing::error!(reason = %why, "DLQ limit reached: holding dead letters");
            }
            self.metrics.dlq_limit_tripped.set(1);
            self.state.set_condition(Condition::DlqLimit, Some(why.clone()));
        }
        verdict
    }

    /// Waits until `dead` more dead letters fit the limit, looking again every 5 s; Err
    /// when the stage stops first.
    pub async fn admit(&self, dead: usize, ok: usize, shutdown: &Shutdown) -> anyhow::Result<()> {
        loop {
            let Err(why) = self.check(dead, ok) else { return Ok(()) };
            tokio::select! {
                _ = shutdown.cancelled() => anyhow::bail!(why),
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Outcomes that happened: `dead` dead letters and `ok` good records. The hold is
    /// lifted once another dead letter would pass.
    pub fn recorded(&self, dead: usize, ok: usize) {
        let clear = match self.limit.lock() {
            Ok(mut limit) => {
                limit.record(dead, ok);
                limit.check(1, 0).is_ok()
            }
            Err(_) => false,
        };
        if clear && self.metrics.dlq_limit_tripped.get() == 1 {
            self.metrics.dlq_limit_tripped.set(0);
            self.state.set_condition(Condition::DlqLimit, None);
        }
    }

    /// The dead letter of `envelope`, failed with `error`: the envelope carrying its
    /// failure and its DLQ record's headers, its payload (then its source headers) cut
    /// so the record fits the producer's `message.max.bytes`; the cut is recorded in the
    /// failure and a header, and the original stays at its source coordinates.
    pub fn letter(&self, envelope: Envelope, error: &RecordError, trace: &TraceContext) -> (Envelope, OwnedHeaders) {
        let (mut dead, headers) = dead_letter(envelope, error, self.stage.as_str(), trace);
        if !fit(&mut dead, self.max_value_bytes) {
            return (dead, headers);
        }
        let headers = dlq_headers(&dead, trace);
        (dead, headers)
    }

    /// The envelope of a record that is not what its topic carries: its bytes as the
    /// payload, its coordinates as its source, a key derived from them.
    pub fn foreign(&self, message: &impl Message) -> Envelope {
        Envelope {
            schema: envelope::SCHEMA.into(),
            pipeline: self.pipeline.clone(),
            idempotency_key: fallback_key(&self.pipeline, message.key(), message.payload()).to_string(),
            payload: message.payload().unwrap_or_default().to_vec(),
            source: Some(SourceCoordinates {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
                key: message.key().map(<[u8]>::to_vec),
            }),
            ..Default::default()
        }
    }
}

/// The producer's `message.max.bytes` (a `kafka.client` override, else librdkafka's
/// default) less the room for headers and framing.
fn max_value_bytes(settings: &Settings) -> usize {
    settings.kafka.message_max_bytes().saturating_sub(RECORD_OVERHEAD).max(4 * 1024)
}

/// Cuts `dead` so its DLQ record (the source key as the record's key, the value, the
/// headers) fits in `max` bytes: the failure's message first, then the payload, then the
/// source headers, then the copy of an oversized source key. Whether anything was cut.
fn fit(dead: &mut Envelope, max: usize) -> bool {
    let key_len = |d: &Envelope| d.source.as_ref().and_then(|s| s.key.as_ref()).map_or(0, Vec::len);
    let size = |d: &Envelope| d.encode_to_bytes().len() + key_len(d);
    if size(dead) <= max {
        return false;
    }
    let original = dead.payload.len();
    if let Some(envelope::Outcome::Failure(f)) = &mut dead.outcome
        && f.message.len() > 4096
    {
        let mut end = 4096;
        while !f.message.is_char_boundary(end) {
            end -= 1;
        }
        f.message.truncate(end);
    }
    let over = size(dead).saturating_sub(max);
    if over > 0 {
        dead.payload.truncate(original.saturating_sub(over + 16));
    }
    let headers_cleared = size(dead) > max && !dead.headers.is_empty();
    if headers_cleared {
        dead.headers.clear();
    }
    if size(dead) > max
        && let Some(src) = &mut dead.source
    {
        src.key = None;
    }
    if let Some(envelope::Outcome::Failure(f)) = &mut dead.outcome
        && f.payload_truncated_from == 0
        && (dead.payload.len() < original || headers_cleared)
    {
        f.payload_truncated_from = original as u64;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MESSAGE_MAX_BYTES;
    use crate::envelope::Header;
    use crate::error::Reason;

    fn settings() -> Settings {
        Settings::from_toml(include_str!("../../../config/pipeline.toml"), Vec::new()).unwrap()
    }

    fn state() -> Arc<ServiceState> {
        ServiceState::new("test", prometheus_client::registry::Registry::default())
    }

    fn sink(client: &[(&str, &str)]) -> DeadLetterSink {
        let mut settings = settings();
        settings.kafka.client = client.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DeadLetterSink::new(&settings, Stage::Enricher, StageMetrics::default(), state())
    }

    #[test]
    fn a_dead_letter_is_cut_to_fit_the_producer_limit() {
        let sink = sink(&[]);
        let big = Envelope {
            payload: vec![b'x'; 990_000],
            headers: vec![Header { key: "h".into(), value: Some(vec![b'y'; 100_000]) }],
            ..Default::default()
        };
        let error = RecordError::invalid(Reason::InvalidOutput, "e".repeat(20_000));
        let (dead, headers) = sink.letter(big, &error, &TraceContext::new_root());
        assert!(dead.encode_to_bytes().len() <= DEFAULT_MESSAGE_MAX_BYTES - RECORD_OVERHEAD);
        let failure = dead.failure().unwrap();
        assert_eq!(failure.payload_truncated_from, 990_000);
        assert!(failure.message.len() <= 4096);
        let pairs = crate::headers::collect(Some(&headers));
        assert_eq!(crate::headers::find(&pairs, crate::headers::DLQ_PAYLOAD_TRUNCATED), Some("990000"));
    }

    #[test]
    fn a_small_dead_letter_is_kept_whole_and_the_limit_follows_the_client_setting() {
        let sink = sink(&[("message.max.bytes", "200000")]);
        let small = Envelope { payload: vec![b'x'; 100_000], ..Default::default() };
        let (dead, _) =
            sink.letter(small.clone(), &RecordError::invalid(Reason::InvalidJson, "m"), &TraceContext::new_root());
        assert_eq!(dead.payload.len(), 100_000);
        let larger = Envelope { payload: vec![b'x'; 190_000], ..small };
        let (dead, _) = sink.letter(larger, &RecordError::invalid(Reason::InvalidJson, "m"), &TraceContext::new_root());
        assert!(dead.encode_to_bytes().len() <= 200_000 - RECORD_OVERHEAD);
    }

    #[test]
    fn the_limit_holds_a_run_of_dead_letters_and_good_records_lift_it() {
        let mut settings = settings();
        settings.dlq_limit.max_consecutive = 2;
        let sink = DeadLetterSink::new(&settings, Stage::Publisher, StageMetrics::default(), state());
        assert!(sink.check(2, 0).is_ok());
        sink.recorded(2, 0);
        assert!(sink.check(1, 0).is_err(), "a third in a row is held");
        assert_eq!(sink.metrics.dlq_limit_tripped.get(), 1);
        assert!(sink.check(1, 5).is_ok(), "after good records it may go");
        sink.recorded(0, 5);
        assert_eq!(sink.metrics.dlq_limit_tripped.get(), 0);
        assert!(sink.check(1, 0).is_ok());
    }
}
