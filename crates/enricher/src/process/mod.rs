//! The per-record logic of the enricher, separate from the consumer loop: one request
//! in, one result (or dead letter) out, and at most one paid call per key. A record's
//! path reads in three steps, one module each: `gate` (one record per key here, its
//! turn under `strict-key`, the pause, the breaker, the key's lease and attempt),
//! `attempt` (render, cache, call, validate, repair, store) and `outcome` (emit, or
//! what `policy::decide` says about its error: wait, retry, dead-letter).

mod attempt;
mod gate;
mod outcome;

use enrich_common::dead_letter_sink::DeadLetterSink;
use enrich_common::envelope::Envelope;
use enrich_common::http::ServiceState;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::spans::{RecordSpan, attr};
use enrich_common::{TraceContext, headers};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use crate::breaker::Breaker;
use crate::cache::ResponseCache;
use crate::llm::{LlmClient, LlmError};
use crate::metrics::EnricherMetrics;
use crate::prompt::PromptTemplate;
use crate::store::Store;
use crate::validate::OutputValidator;
use gate::Admit;
use outcome::Attempted;

const STAGE: &str = "enricher";
/// See `enricher.failpoints`.
const ABORT_MARKER: &[u8] = b"[[enricher:abort]]";

pub struct Enricher {
    pub store: Store,
    pub llm: LlmClient,
    pub prompt: PromptTemplate,
    pub validator: OutputValidator,
    pub producer: FutureProducer,
    pub results_topic: String,
    /// The producer's `message.max.bytes`, for the message of a result too large to emit.
    pub message_max_bytes: usize,
    pub dlq_topic: String,
    pub metrics: EnricherMetrics,
    /// Flow control of the LLM calls: the adaptive concurrency limit (at most
    /// `enricher.max_in_flight`), the rate buckets, a 429's hold.
    pub flow: crate::flow::Flow,
    pub breaker: Breaker,
    /// `enricher.failpoints`: testing only.
    pub failpoints: bool,
    /// One permit: records whose previous attempt died with its process run one at a time.
    pub isolation: tokio::sync::Semaphore,
    /// The DLQ limit, and dead letters built to fit.
    pub dead_letters: DeadLetterSink,
    /// Idempotency keys being handled in this process.
    pub keys_in_progress: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Readiness, reported not-ready while the breaker is open.
    pub state: Arc<ServiceState>,
    /// The operator's pause: no new call starts while it is on.
    pub kill_switch: Arc<crate::kill_switch::KillSwitch>,
    /// `llm.budgets`: spend limits per window.
    pub budgets: Option<crate::budget::Budgets>,
    /// `llm.cache_ttl_secs` > 0: the response cache.
    pub cache: Option<ResponseCache>,
    pub shutdown: CancellationToken,
    pub retry: RetryPolicy,
    /// The consumer group, for the spans.
    pub group: String,
    /// `telemetry.capture_content`: prompts and completions go on the LLM call's span.
    pub capture_content: bool,
    /// `ordering = "strict-key"`: the blocks and parked records.
    pub strict: Option<crate::strict::Blocks>,
}

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Enriched,
    /// Enriched earlier: the stored result was emitted again.
    Reused,
    DeadLettered,
    /// Sent to the retry topic, due later.
    RetryScheduled,
    /// Parked behind an earlier record of its Kafka key (`strict-key`).
    Parked,
    /// Dead-lettered earlier: nothing to do.
    Skipped,
    /// Published earlier: nothing to emit again.
    AlreadyPublished,
}

impl Handled {
    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Enriched => "enriched",
            Handled::Reused => "reused",
            Handled::DeadLettered => "dead_lettered",
            Handled::RetryScheduled => "retry_scheduled",
            Handled::Parked => "parked",
            Handled::Skipped => "skipped",
            Handled::AlreadyPublished => "already_published",
        }
    }

    /// The record has its result: records parked behind it may go.
    fn resolved(self) -> bool {
        matches!(self, Handled::Enriched | Handled::Reused | Handled::AlreadyPublished)
    }
}

/// How this record's answer came about: the attempt, the tokens it used (none when
/// re-emitted), whether the response cache gave it.
#[derive(Debug, Default, Clone, Copy)]
struct Answer {
    attempt: i32,
    tokens: (u32, u32),
    cached: bool,
}

/// Delayed retries through the retry topic.
pub struct RetryPolicy {
    pub topic: String,
    /// In-process retries within one delivery before the retry topic.
    pub quick_retries: u32,
    /// `llm.max_rate_limited`: 429s charged to a record in one delivery before its
    /// attempts count.
    pub max_rate_limited: u32,
    pub delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The delay before delayed retry number `n` (1-based): doubled each time, capped.
    pub fn delay_for(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
        self.delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// What one delivery of a record carries from one round of its gate to the next.
struct Run<'a> {
    /// Attempts made in this delivery: the first plus `quick_retries` run here, the next
    /// go through the retry topic.
    tries: u32,
    /// The wait before an in-process retry, doubled each time.
    backoff: Duration,
    /// The isolation permit, while the record runs alone (its previous attempt died with
    /// its process).
    isolated: Option<tokio::sync::SemaphorePermit<'a>>,
    /// Delayed retries the record has been through.
    retries: u32,
    /// 429s charged to the record in this delivery (`policy::charged`).
    rate_limited: u32,
    /// The endpoint's tally at the record's latest 429.
    last_429: Option<crate::flow::Tally>,
}

/// Why an attempt did not produce a stored result. Whether one of its calls was paid is
/// said beside it (see `attempt`): an attempt whose call was paid is never refunded.
enum AttemptError {
    Llm(LlmError),
    /// A budget window is spent: the call was not made; try again after this long.
    Budget(Duration),
    /// The stage stopped while the call waited for its turn (or for the database).
    Stopped,
    /// The lease was no longer ours when the call was to start (it expired and another
    /// replica took the key, or the key ended): the call was not made.
    Fenced,
    /// The key was dead-lettered while this attempt ran (its lease had expired): the
    /// answer is not stored, and the key is not published.
    Superseded,
    /// The database refused a write of the attempt (not an outage): the record fails.
    Db(anyhow::Error),
}

impl Enricher {
    /// Handles one request. `Err` means the infrastructure (database, Kafka) failed or
    /// the LLM endpoint is down: the record was not finished and must be read again.
    pub async fn handle(&self, message: &OwnedMessage) -> anyhow::Result<Handled> {
        let headers = headers::collect(message.headers());
        let incoming = TraceContext::extract(&headers);
        let span = RecordSpan::consume(STAGE, &self.group, message, incoming.as_ref());
        let record_key = message.key().map(<[u8]>::to_vec);
        let decoded = Envelope::decode_internal(message.payload().unwrap_or_default());
        let envelope = match decoded {
            Ok(e) => e,
            Err(e) => {
                self.reject_foreign(message, &span, e).await?;
                return Ok(Handled::DeadLettered);
            }
        };
        let record_key = record_key.unwrap_or_else(|| envelope.idempotency_key.as_bytes().to_vec());
        let retries: u32 = headers::find(&headers, headers::RETRY_COUNT).and_then(|v| v.parse().ok()).unwrap_or(0);
        let key = envelope.idempotency_key.clone();
        span.set([KeyValue::new(attr::IDEMPOTENCY_KEY, key.clone())]);
        let log = span.log_span();
        let (handled, own_block) =
            self.handle_envelope(envelope, &record_key, &span, retries).instrument(log.clone()).await?;
        span.set([KeyValue::new(attr::OUTCOME, handled.as_str())]);
        if handled == Handled::DeadLettered {
            span.fail("dead-lettered");
        }
        drop(span);
        if own_block && handled.resolved() {
            self.release_parked(&record_key, key).instrument(log).await?;
        }
        Ok(handled)
    }

    /// Runs the records parked behind `blocker` (now resolved), one at a time in arrival
    /// order, until one of them has to wait in its turn or none is left.
    pub async fn release_parked(&self, kafka_key: &[u8], mut blocker: String) -> anyhow::Result<()> {
        let Some(blocks) = &self.strict else { return Ok(()) };
        while let Some(next) = blocks.advance(kafka_key, &blocker).await? {
            let key = next.envelope.idempotency_key.clone();
            tracing::info!(idempotency_key = %key, after = %blocker, "released from parking");
            let incoming = next.traceparent.as_deref().and_then(|t| TraceContext::parse(t, None));
            let span = RecordSpan::resume(STAGE, "process parked", SpanKind::Consumer, incoming.as_ref());
            span.set([KeyValue::new(attr::IDEMPOTENCY_KEY, key.clone())]);
            let (handled, _) = Box::pin(self.handle_envelope(next.envelope, kafka_key, &span, 0)).await?;
            if !handled.resolved() {
                break; // it waits for a retry or sits in the DLQ: the key stays blocked by it
            }
            blocker = key;
        }
        Ok(())
    }

    /// A released record whose process died before it finished: run it again (its key
    /// state makes this idempotent), then the records behind it.
    pub async fn rerun_parked(&self, kafka_key: &[u8], blocker: &str) -> anyhow::Result<()> {
        let Some(blocks) = &self.strict else { return Ok(()) };
        let Some(parked) = blocks.parked(kafka_key, blocker).await? else { return Ok(()) };
        let incoming = parked.traceparent.as_deref().and_then(|t| TraceContext::parse(t, None));
        let span = RecordSpan::resume(STAGE, "process parked", SpanKind::Consumer, incoming.as_ref());
        let (handled, own_block) = Box::pin(self.handle_envelope(parked.envelope, kafka_key, &span, 0)).await?;
        if own_block && handled.resolved() {
            self.release_parked(kafka_key, blocker.to_string()).await?;
        }
        Ok(())
    }

    /// Handles one request through its steps (the gate, the attempt, its outcome); says
    /// whether the record held its Kafka key's block (`strict-key`), so the records parked
    /// behind it may be released.
    async fn handle_envelope(
        &self,
        envelope: Envelope,
        record_key: &[u8],
        span: &RecordSpan,
        retries: u32,
    ) -> anyhow::Result<(Handled, bool)> {
        let key = envelope.idempotency_key.clone();
        let _key_guard = self.enter_key(&key).await?;
        let Some(own_block) = self.take_turn(record_key, &envelope, span).await? else {
            return Ok((Handled::Parked, false));
        };
        let mut run = Run {
            tries: 0,
            backoff: Duration::from_millis(200),
            isolated: None,
            retries,
            rate_limited: 0,
            last_429: None,
        };
        loop {
            let (attempt, admission) = match self.admit_record(&envelope, record_key, span, &mut run).await? {
                Admit::Run { attempt, admission } => (attempt, admission),
                Admit::Done(handled) => return Ok((handled, own_block)),
                Admit::Again => continue,
            };
            if self.failpoints && envelope.payload.windows(ABORT_MARKER.len()).any(|w| w == ABORT_MARKER) {
                tracing::error!(idempotency_key = %key, attempt, "failpoint: aborting the process (enricher.failpoints)");
                std::process::abort();
            }
            // The lease is renewed while the record waits and calls; each call checks it
            // again right before it starts.
            let _held = self.store.hold(&key, attempt);
            span.set([KeyValue::new(attr::ATTEMPT, i64::from(attempt))]);
            let (outcome, paid) = self.attempt(&envelope, attempt, span).await;
            let attempted = Attempted { attempt, admission, paid };
            if let Some(handled) = self.conclude(&envelope, record_key, span, attempted, outcome, &mut run).await? {
                return Ok((handled, own_block));
            }
        }
    }
}

/// Holds a key in `keys_in_progress` until dropped.
struct KeyGuard<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    key: String,
}

impl<'a> KeyGuard<'a> {
    fn enter(set: &'a std::sync::Mutex<std::collections::HashSet<String>>, key: &str) -> Option<Self> {
        let inserted = set.lock().map(|mut s| s.insert(key.to_string())).unwrap_or(true);
        inserted.then(|| Self { set, key: key.to_string() })
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.key);
        }
    }
}

/// Full jitter: a random wait between zero and `cap`.
fn jitter(cap: Duration) -> Duration {
    cap.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::RetryPolicy;
    use std::time::Duration;

    #[test]
    fn delayed_retries_double_up_to_the_cap() {
        let p = RetryPolicy {
            topic: "retry".into(),
            quick_retries: 1,
            max_rate_limited: 5,
            delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(100),
        };
        let delays: Vec<u64> = (1..=4).map(|n| p.delay_for(n).as_secs()).collect();
        assert_eq!(delays, vec![30, 60, 100, 100]);
        assert_eq!(p.delay_for(1000), Duration::from_secs(100), "no overflow on a long retry history");
    }
}
