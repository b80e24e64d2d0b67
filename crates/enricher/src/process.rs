//! The per-record logic of the enricher, separate from the consumer loop: one request
//! in, one result (or dead letter) out, and at most one paid call per key.

use enrich_common::dead_letter_sink::DeadLetterSink;
use enrich_common::envelope::{EnrichmentResult, Envelope, Outcome};
use enrich_common::error::RecordError;
use enrich_common::http::ServiceState;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::{ErrorClass, TraceContext, headers};
use rdkafka::Message;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{Admission, Breaker, Transition};
use crate::cache::ResponseCache;
use crate::llm::{Completion, LlmClient, LlmError};
use crate::metrics::EnricherMetrics;
use crate::policy::{self, Next};
use crate::prompt::{Prompt, PromptTemplate, Repair};
use crate::store::{Gate, KeyState, Step, Store, StoredResult};
use crate::strict::BlockCheck;
use crate::validate::OutputValidator;
use enrich_common::spans::{RecordSpan, attr};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tracing::Instrument;

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
        let decoded =
            Envelope::decode_from(message.payload().unwrap_or_default()).map_err(|e| e.to_string()).and_then(|e| {
                // Text PostgreSQL cannot hold would fail every batch the record joins.
                let topic = e.source.as_ref().map(|s| s.topic.as_str()).unwrap_or_default();
                if e.idempotency_key.contains('\0') || topic.contains('\0') {
                    Err("the envelope's idempotency key or source topic holds a NUL character".to_string())
                } else {
                    Ok(e)
                }
            });
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

    /// Handles one request; says whether the record held its Kafka key's block
    /// (`strict-key`), so the records parked behind it may be released.
    async fn handle_envelope(
        &self,
        envelope: Envelope,
        record_key: &[u8],
        span: &RecordSpan,
        retries: u32,
    ) -> anyhow::Result<(Handled, bool)> {
        let record_key = record_key.to_vec();
        let key = envelope.idempotency_key.clone();
        // One record per idempotency key at a time in this process (two requests for one
        // key can arrive under different Kafka keys, e.g. after a replay).
        let _key_guard = loop {
            if let Some(guard) = KeyGuard::enter(&self.keys_in_progress, &key) {
                break guard;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} is in progress here"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        };
        let mut own_block = false;
        if let Some(blocks) = &self.strict {
            match blocks.check(&record_key, &envelope, &span.ids().traceparent()).await? {
                BlockCheck::Free => {}
                BlockCheck::Own => own_block = true,
                BlockCheck::Parked { blocker } => {
                    let why = format!("parked behind {blocker} (ordering = strict-key)");
                    self.store.record_run(&envelope, 0, "parked", &span.ids().trace_id_hex(), Some(&why)).await?;
                    self.metrics.parked.inc();
                    self.metrics.outcome("parked");
                    tracing::info!(idempotency_key = %key, %blocker, "parked behind an earlier record of its key");
                    return Ok((Handled::Parked, false));
                }
            }
        }
        let handled = |h: Handled| Ok((h, own_block));
        let mut backoff = Duration::from_millis(200);
        let mut isolated = None;
        // Attempts made in this delivery: the first plus `quick_retries` run here, the
        // next go through the retry topic.
        let mut tries = 0u32;
        loop {
            // No call starts while the operator has paused enrichment.
            if !self.kill_switch.wait_open(&self.shutdown).await {
                anyhow::bail!("shutting down while enrichment is paused");
            }
            // No call starts while the endpoint's breaker is open: the record waits here,
            // before its attempt is counted.
            let Some(admission) = self.breaker.admit(&self.shutdown).await else {
                anyhow::bail!("shutting down while the LLM breaker is open");
            };
            let state = match self.store.acquire(&envelope, isolated.is_some()).await {
                Ok(state) => state,
                Err(e) => {
                    self.breaker.unused(admission);
                    return Err(e);
                }
            };
            let attempt = match state {
                KeyState::Suspect => {
                    // The previous attempt died with its process. Run this record alone, so
                    // if it is the one that crashes the process, it is the only one charged.
                    self.breaker.unused(admission);
                    if isolated.is_none() {
                        tracing::warn!(idempotency_key = %key, "previous attempt never finished: retrying it in isolation");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} waits to run in isolation"),
                            permit = self.isolation.acquire() => isolated = Some(permit.map_err(anyhow::Error::from)?),
                        }
                    }
                    continue;
                }
                KeyState::Acquired { attempt } => {
                    tries += 1;
                    attempt
                }
                other => {
                    self.breaker.unused(admission);
                    match other {
                        KeyState::Published => {
                            // Its output is committed: a copy on the results topic would
                            // only be refused by the publisher.
                            tracing::debug!(idempotency_key = %key, "already published; nothing to emit");
                            self.store
                                .record_run(&envelope, 0, "already_published", &span.ids().trace_id_hex(), None)
                                .await?;
                            self.metrics.outcome("already_published");
                            return handled(Handled::AlreadyPublished);
                        }
                        KeyState::Enriched(stored) => {
                            self.emit(&envelope, &record_key, &stored, Answer::default(), span).await?;
                            self.store.record_run(&envelope, 0, "reused", &span.ids().trace_id_hex(), None).await?;
                            self.metrics.outcome("reused");
                            return handled(Handled::Reused);
                        }
                        KeyState::DeadLettered => {
                            if self.finish_pending_dead_letter(&envelope, &record_key).await? {
                                return handled(Handled::DeadLettered);
                            }
                            tracing::debug!(idempotency_key = %key, "already dead-lettered; skipping");
                            return handled(Handled::Skipped);
                        }
                        KeyState::AttemptsExhausted { attempts } => {
                            let err = RecordError::new(
                                ErrorClass::Permanent,
                                "max_attempts",
                                format!("{attempts} attempts already made (llm.max_attempts); not calling again"),
                            );
                            return handled(self.give_up(envelope, &record_key, &err, attempts, span).await?);
                        }
                        KeyState::Leased { remaining } => {
                            // Another live replica is calling the LLM for this key: wait for
                            // it, without holding the isolation permit meanwhile.
                            isolated = None;
                            let wait = remaining.min(Duration::from_secs(5));
                            tokio::select! {
                                _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} is leased elsewhere"),
                                _ = tokio::time::sleep(wait) => continue,
                            }
                        }
                        KeyState::Adopted | KeyState::Acquired { .. } | KeyState::Suspect => continue,
                    }
                }
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
            let e = match outcome {
                Ok((stored, tokens, cached)) => {
                    self.breaker_success(admission);
                    if cached {
                        span.set([KeyValue::new("enrich.cache_hit", true)]);
                    }
                    let answer = Answer { attempt, tokens, cached };
                    self.emit(&envelope, &record_key, &stored, answer, span).await?;
                    self.metrics.outcome("enriched");
                    self.dead_letters.recorded(0, 1);
                    return handled(Handled::Enriched);
                }
                Err(AttemptError::Fenced) => {
                    // Another replica holds the key now (this lease expired while the record
                    // waited): its answer will be the key's. Ask the store again.
                    self.breaker.unused(admission);
                    if !paid {
                        tries = tries.saturating_sub(1);
                    }
                    tracing::warn!(idempotency_key = %key, attempt, "the lease was lost before the call; not calling");
                    self.metrics.outcome("fenced");
                    continue;
                }
                Err(AttemptError::Db(e)) => {
                    self.breaker.unused(admission);
                    if paid {
                        // The database refuses what a paid call produced: calling again
                        // would pay again for the same refusal. The record goes to the DLQ
                        // with the reason; a replay runs it again once the cause is fixed.
                        let err = RecordError::new(
                            ErrorClass::Permanent,
                            "storage_refused",
                            format!("the database refused the attempt's writes: {e:#}"),
                        );
                        return handled(self.give_up(envelope, &record_key, &err, attempt, span).await?);
                    }
                    let _ = self.store.release(&key, attempt, true).await;
                    return Err(e);
                }
                Err(AttemptError::Superseded) => {
                    self.breaker_success(admission);
                    tracing::warn!(idempotency_key = %key, attempt, "the key was dead-lettered while this attempt ran; its answer is dropped");
                    self.metrics.outcome("superseded");
                    return handled(Handled::Skipped);
                }
                Err(AttemptError::Stopped) => {
                    // Unless a call of this attempt was paid, the attempt and the lease go
                    // back, so the record runs normally after the restart (not as a
                    // suspect, in isolation).
                    self.breaker.unused(admission);
                    self.store.release(&key, attempt, !paid).await?;
                    anyhow::bail!("shutting down while {key} waited for its LLM call");
                }
                Err(AttemptError::Budget(wait)) => {
                    // The call was not made: give the attempt back (unless an earlier call
                    // of it was paid) and wait for the next window (the record keeps its
                    // place; nothing is dead-lettered).
                    self.breaker.unused(admission);
                    self.store.release(&key, attempt, !paid).await?;
                    if !paid {
                        tries = tries.saturating_sub(1);
                    }
                    self.metrics.budget_exhausted.set(1);
                    self.state.set_condition(
                        "budget",
                        Some(format!("the LLM budget is spent; calls resume in {} s", wait.as_secs())),
                    );
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while the LLM budget is spent"),
                        _ = tokio::time::sleep(wait.min(Duration::from_secs(5))) => continue,
                    }
                }
                Err(AttemptError::Llm(e)) => e,
            };
            // The breaker hears how the endpoint did: down, or up (it answered, or no
            // call was made).
            match e.error.class {
                ErrorClass::InvalidInput => self.breaker.unused(admission),
                ErrorClass::Permanent => self.breaker_success(admission),
                _ if e.endpoint_down() => self.breaker_failure(admission, &e.error),
                _ => self.breaker_success(admission),
            }
            let limits =
                policy::Limits { max_attempts: self.store.max_attempts, quick_retries: self.retry.quick_retries };
            match policy::decide(&e, attempt, tries, self.breaker.is_open(), limits) {
                Next::WaitForEndpoint => {
                    // Give the attempt back (unless a call of it was paid) and wait for the
                    // endpoint (the breaker, or the 429's Retry-After).
                    self.store.release(&key, attempt, !paid).await?;
                    if !paid {
                        tries = tries.saturating_sub(1);
                    }
                    if !self.breaker.is_open() {
                        let wait = e.retry_after.unwrap_or_else(|| jitter(backoff));
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        tokio::select! {
                            _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while the LLM endpoint is unavailable"),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Next::RetryLater => {
                    self.schedule_retry(&envelope, &record_key, attempt, retries + 1, &e, span).await?;
                    return handled(Handled::RetryScheduled);
                }
                Next::RetryHere => {
                    let wait = e.retry_after.unwrap_or_else(|| jitter(backoff));
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    tracing::warn!(idempotency_key = %key, attempt, error = %e, wait_ms = wait.as_millis() as u64, "transient LLM failure; retrying");
                    // Give the lease back (the attempt stays spent): a lease left set
                    // marks an attempt that died with its process.
                    self.store.release(&key, attempt, false).await?;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("shutting down during the backoff of {key}"),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Next::DeadLetter(error) => {
                    return handled(self.give_up(envelope, &record_key, &error, attempt, span).await?);
                }
            }
        }
    }

    fn breaker_success(&self, admission: Admission) {
        if self.breaker.success(admission) == Some(Transition::Closed) {
            tracing::info!("LLM circuit breaker closed: the endpoint answers again; consumption resumes");
            self.metrics.breaker_open.set(0);
            self.state.set_condition("llm_breaker", None);
        }
    }

    fn breaker_failure(&self, admission: Admission, error: &RecordError) {
        if self.breaker.failure(admission) == Some(Transition::Opened) {
            tracing::error!(error = %error, "LLM circuit breaker opened: calls paused, offsets kept, nothing dead-lettered");
            self.metrics.breaker_open.set(1);
            self.state.set_condition("llm_breaker", Some(format!("LLM circuit breaker open; last error: {error}")));
        }
    }

    /// One attempt: render, call, validate, store. Returns the stored result, the tokens
    /// its calls used and whether the cache answered; and, beside it, whether one of its
    /// calls was paid (such an attempt is never refunded).
    async fn attempt(
        &self,
        envelope: &Envelope,
        attempt: i32,
        span: &RecordSpan,
    ) -> (Result<(StoredResult, (u32, u32), bool), AttemptError>, bool) {
        let mut steps: Vec<Step> = Vec::with_capacity(4);
        let outcome = self.attempt_steps(envelope, attempt, span, &mut steps).await;
        let paid = steps.iter().any(Step::paid);
        if paid && matches!(outcome, Err(AttemptError::Fenced | AttemptError::Stopped | AttemptError::Budget(_))) {
            // The audit keeps the paid call the attempt ends without (best effort).
            if let Err(e) = self.store.record_steps(&envelope.idempotency_key, &steps).await {
                tracing::warn!(idempotency_key = %envelope.idempotency_key, error = %e, "cannot record the steps of an abandoned attempt");
            }
        }
        (outcome, paid)
    }

    async fn attempt_steps(
        &self,
        envelope: &Envelope,
        attempt: i32,
        span: &RecordSpan,
        steps: &mut Vec<Step>,
    ) -> Result<(StoredResult, (u32, u32), bool), AttemptError> {
        let key = &envelope.idempotency_key;
        let record: serde_json::Value = serde_json::from_slice(&envelope.payload).map_err(|e| {
            AttemptError::Llm(LlmError {
                error: RecordError::invalid("invalid_json", format!("the payload is not JSON: {e}")),
                retry_after: None,
            })
        })?;
        let mut prompt =
            self.prompt.render(&record).map_err(|error| AttemptError::Llm(LlmError { error, retry_after: None }))?;
        let mut tokens = (0u32, 0u32);
        // The response cache: the same input answered before (for any key) is answered
        // again without a call; concurrent records with one input wait for the first.
        let cache_key = self
            .cache
            .as_ref()
            .map(|_| ResponseCache::key(self.llm.provider(), self.llm.model(), self.prompt.version(), &prompt));
        let _turn = match (&self.cache, &cache_key) {
            (Some(cache), Some(k)) => Some(cache.turn(k).await),
            _ => None,
        };
        let mut hit = None;
        if let (Some(cache), Some(k)) = (&self.cache, &cache_key) {
            self.metrics.cache_lookups.inc();
            match cache.get(k).await {
                Ok(Some((json, model))) => hit = self.validator.validate(&json).ok().map(|v| (v, model)),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "response cache unavailable; calling the LLM"),
            }
        }
        let cached = hit.is_some();
        // Output that is not JSON or breaks the schema gets one repair call that shows the
        // model the validation error; a second failure dead-letters the record.
        let (value, model) = if let Some((value, model)) = hit {
            self.metrics.cache_hits.inc();
            steps.push(Step::llm_call(attempt, Duration::ZERO, &model).named("cache_hit").tokens(0, 0));
            (value, model)
        } else {
            let mut backoff = Duration::from_millis(200);
            loop {
                let repairing = prompt.repair.is_some();
                let step_name = if repairing { "llm_repair" } else { "llm_call" };
                let called = match self.call(&prompt, span, key, attempt, step_name, steps).await {
                    // The first call is paid: a repair that cannot be made now (a spent
                    // budget, a 429, an outage) waits, under the renewed lease, rather
                    // than ending the attempt.
                    Err(AttemptError::Budget(wait)) if repairing => Err(wait),
                    Ok(Err(e)) if repairing && (e.error.reason == "rate_limited" || e.endpoint_down()) => {
                        let wait = e.retry_after.unwrap_or_else(|| jitter(backoff));
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        Err(wait)
                    }
                    other => Ok(other?),
                };
                let called = match called {
                    Ok(called) => called,
                    Err(wait) => {
                        tracing::warn!(idempotency_key = %key, wait_ms = wait.as_millis() as u64, "the repair call must wait");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return Err(AttemptError::Stopped),
                            _ = tokio::time::sleep(wait.min(Duration::from_secs(10))) => continue,
                        }
                    }
                };
                let (completion, model) = match called {
                    Ok(answered) => answered,
                    Err(e) => {
                        let done: &[Step] = steps;
                        self.until_written("store the steps of a failed call", key, || {
                            self.store.record_steps(key, done)
                        })
                        .await?;
                        return Err(AttemptError::Llm(e));
                    }
                };
                tokens = (tokens.0 + completion.input_tokens, tokens.1 + completion.output_tokens);
                match self.validator.validate(&completion.content) {
                    Ok(v) => {
                        steps.push(Step::validation(attempt));
                        break (v, model);
                    }
                    Err(error) => {
                        steps.push(Step::validation(attempt).failed(error.to_string()));
                        if repairing {
                            let done: &[Step] = steps;
                            self.until_written("store the steps of a failed repair", key, || {
                                self.store.record_steps(key, done)
                            })
                            .await?;
                            return Err(AttemptError::Llm(LlmError { error, retry_after: None }));
                        }
                        tracing::info!(idempotency_key = %key, reason = error.reason, "invalid output; one repair call");
                        prompt.repair = Some(Repair { previous: completion.content, error: error.message });
                    }
                }
            }
        };
        let json = value.to_string();
        if let (false, Some(cache), Some(k)) = (cached, &self.cache, &cache_key) {
            let shape = (self.llm.provider(), self.llm.model(), self.prompt.version());
            if let Err(e) = cache.put(k, shape, &json, &model).await {
                tracing::warn!(error = %e, "answer not cached");
            }
        }
        let result = StoredResult {
            result_hash: hex::encode(Sha256::digest(json.as_bytes())),
            json,
            model: crate::store::storable(&model),
            prompt_version: self.prompt.version().to_string(),
        };
        // The call is paid: keep trying to store its result rather than paying again.
        let trace_id = span.ids().trace_id_hex();
        let done: &[Step] = steps;
        let stored = self
            .until_written("store a paid result", key, || {
                self.store.finish(envelope, attempt, &result, done, &trace_id)
            })
            .await?;
        match stored {
            Some(stored) => Ok((stored, tokens, cached)),
            None => Err(AttemptError::Superseded),
        }
    }

    /// Runs a database write of the call path until it succeeds: a paid answer, its
    /// settlement and its audit wait for the database rather than being dropped (and the
    /// call paid again); `/readyz` says so meanwhile. An error that is not the database
    /// being unavailable (a statement it refuses) is tried a few times, then fails the
    /// record. After shutdown the write is still tried for a few seconds.
    async fn until_written<T, E, F, Fut>(&self, what: &str, key: &str, mut write: F) -> Result<T, AttemptError>
    where
        E: Into<anyhow::Error>,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut refused = 0;
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let e: anyhow::Error = match write().await {
                Ok(v) => {
                    if backoff > Duration::from_millis(100) {
                        self.state.set_condition("database", None);
                    }
                    return Ok(v);
                }
                Err(e) => e.into(),
            };
            if !enrich_common::db::is_transient(&e) {
                refused += 1;
                if refused >= 3 {
                    tracing::error!(idempotency_key = %key, error = %e, "cannot {what}: the database refuses it");
                    return Err(AttemptError::Db(e));
                }
            }
            tracing::error!(idempotency_key = %key, error = %e, "cannot {what}; retrying");
            self.state.set_condition("database", Some(format!("cannot {what}: {e}")));
            if self.shutdown.is_cancelled() {
                let until = *grace.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(5));
                if tokio::time::Instant::now() >= until {
                    return Err(AttemptError::Stopped);
                }
                tokio::time::sleep(backoff).await;
            } else {
                tokio::select! {
                    _ = self.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// One LLM call for `prompt`, moving on to the next fallback model while a model is
    /// unavailable: flow control's turn (concurrency limit, rate buckets, a 429's hold),
    /// the budget's reservation, the span, the metrics and one step per call. Returns the
    /// answer and the model that gave it; `Err` only when no call could be made.
    async fn call(
        &self,
        prompt: &Prompt,
        span: &RecordSpan,
        key: &str,
        attempt: i32,
        step_name: &'static str,
        steps: &mut Vec<Step>,
    ) -> Result<Result<(Completion, String), LlmError>, AttemptError> {
        let repair_chars = prompt.repair.as_ref().map_or(0, |r| r.previous.len() + r.error.len() + 200);
        let estimated_input = ((prompt.system.len() + prompt.user.len() + repair_chars) / 4 + 16) as u32;
        let models = self.llm.models();
        let mut index = 0;
        loop {
            let model = models[index].as_str();
            // The call's turn: it holds a slot from here to its answer, so storing and
            // producing other records overlaps with calls in flight.
            let wait = |cause: crate::flow::WaitCause| self.metrics.flow_wait(cause.as_str());
            let Some(permit) =
                self.flow.admit(estimated_input + self.llm.max_output_tokens(), &self.shutdown, wait).await
            else {
                return Err(AttemptError::Stopped);
            };
            // The call's estimated cost is reserved in every budget window.
            let reservation = match &self.budgets {
                Some(budgets) => {
                    let estimate = self.llm.cost_usd(index, estimated_input, self.llm.max_output_tokens());
                    match self.until_written("reserve the budget", key, || budgets.reserve(estimate)).await? {
                        Ok(r) => Some(r),
                        Err(wait) => {
                            permit.failed();
                            return Err(AttemptError::Budget(wait));
                        }
                    }
                }
                None => None,
            };
            // Right before the call: the lease must still be ours (and cover the call),
            // and the operator must not have paused enrichment meanwhile.
            let gate = self.until_written("check the lease before a call", key, || self.store.gate(key, attempt)).await;
            let gate = match gate {
                Ok(g) => g,
                Err(e) => {
                    self.unreserve(key, reservation).await;
                    return Err(e);
                }
            };
            match gate {
                Gate::Go => {}
                Gate::Fenced => {
                    permit.failed();
                    self.unreserve(key, reservation).await;
                    return Err(AttemptError::Fenced);
                }
                Gate::Paused => {
                    permit.failed();
                    self.unreserve(key, reservation).await;
                    self.metrics.flow_wait("paused");
                    self.kill_switch.saw_paused();
                    // The gate asks again after a while, should the switch's poller be
                    // slow to read the resume.
                    let open = tokio::time::timeout(Duration::from_secs(5), self.kill_switch.wait_open(&self.shutdown));
                    if let Ok(false) = open.await {
                        return Err(AttemptError::Stopped);
                    }
                    continue;
                }
            }
            if self.metrics.budget_exhausted.get() == 1 {
                self.metrics.budget_exhausted.set(0);
                self.state.set_condition("budget", None);
            }
            let mut call = span.child(
                format!("chat {model}"),
                SpanKind::Client,
                vec![
                    KeyValue::new(attr::GEN_AI_OPERATION, "chat"),
                    KeyValue::new(attr::GEN_AI_PROVIDER, self.llm.provider()),
                    KeyValue::new(attr::GEN_AI_REQUEST_MODEL, model.to_string()),
                    KeyValue::new(attr::IDEMPOTENCY_KEY, key.to_string()),
                    KeyValue::new(attr::ATTEMPT, i64::from(attempt)),
                ],
            );
            if self.capture_content {
                let messages = serde_json::json!([
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.user},
                ]);
                call.set([KeyValue::new(attr::GEN_AI_INPUT_MESSAGES, messages.to_string())]);
            }
            let started = std::time::Instant::now();
            self.metrics.in_flight.inc();
            let (called, declared) = self.llm.complete(prompt, index).instrument(call.log_span()).await;
            self.flow.learn(declared);
            self.metrics.in_flight.dec();
            let elapsed = started.elapsed();
            self.metrics.llm_latency.observe(elapsed.as_secs_f64());
            let cost = called.as_ref().map_or(0.0, |c| self.llm.cost_usd(index, c.input_tokens, c.output_tokens));
            match &called {
                Ok(c) => {
                    permit.answered(c.latency, c.input_tokens + c.output_tokens);
                    call.set([
                        KeyValue::new(attr::GEN_AI_RESPONSE_MODEL, c.model.clone()),
                        KeyValue::new(attr::GEN_AI_INPUT_TOKENS, i64::from(c.input_tokens)),
                        KeyValue::new(attr::GEN_AI_OUTPUT_TOKENS, i64::from(c.output_tokens)),
                        KeyValue::new(attr::COST_USD, cost),
                    ]);
                    if self.capture_content {
                        let messages = serde_json::json!([{"role": "assistant", "content": c.content}]);
                        call.set([KeyValue::new(attr::GEN_AI_OUTPUT_MESSAGES, messages.to_string())]);
                    }
                }
                Err(e) => {
                    if e.error.reason == "rate_limited" {
                        permit.rate_limited(e.retry_after);
                    } else {
                        permit.failed();
                    }
                    call.fail(e.error.to_string());
                }
            }
            drop(call);
            // The paid step is recorded before anything can fail: an attempt whose call
            // was paid is never refunded.
            let answered = match called {
                Ok(c) => {
                    self.metrics.llm_call("ok");
                    self.metrics.tokens(c.input_tokens, c.output_tokens);
                    self.metrics.cost(cost);
                    let answered_by = if c.model.is_empty() { model.to_string() } else { c.model.clone() };
                    steps.push(
                        Step::llm_call(attempt, c.latency, &answered_by)
                            .named(step_name)
                            .tokens(c.input_tokens, c.output_tokens)
                            .cost(cost),
                    );
                    if index > 0 {
                        self.metrics.fallback(model);
                    }
                    crate::failpoints::pass(&self.store.pipeline, crate::failpoints::Instant::AfterPaidCall).await;
                    Ok((c, answered_by))
                }
                Err(e) => {
                    self.metrics.llm_call(e.error.reason);
                    steps.push(Step::llm_call(attempt, elapsed, model).named(step_name).failed(e.error.to_string()));
                    Err(e)
                }
            };
            if let (Some(budgets), Some(r)) = (&self.budgets, reservation) {
                self.until_written("settle the budget", key, || budgets.settle(&r, cost)).await?;
            }
            match answered {
                Ok(answered) => return Ok(Ok(answered)),
                Err(e) => {
                    if e.try_fallback()
                        && let Some(next) = models.get(index + 1)
                    {
                        tracing::warn!(idempotency_key = %key, model, next = %next, error = %e, "model unavailable; trying the next fallback model");
                        index += 1;
                        continue;
                    }
                    return Ok(Err(e));
                }
            }
        }
    }

    /// A reservation whose call was not made is given back (best effort: a reservation
    /// left over only holds budget until its window ends).
    async fn unreserve(&self, key: &str, reservation: Option<crate::budget::Reservation>) {
        if let (Some(budgets), Some(r)) = (&self.budgets, reservation)
            && let Err(e) = budgets.settle(&r, 0.0).await
        {
            tracing::warn!(idempotency_key = %key, error = %e, "cannot give back a budget reservation");
        }
    }

    async fn emit(
        &self,
        envelope: &Envelope,
        record_key: &[u8],
        stored: &StoredResult,
        Answer { attempt, tokens: (input_tokens, output_tokens), cached }: Answer,
        span: &RecordSpan,
    ) -> anyhow::Result<()> {
        let out = Envelope {
            attempt: attempt.max(0) as u32,
            outcome: Some(Outcome::Result(EnrichmentResult {
                json: stored.json.clone(),
                model: stored.model.clone(),
                prompt_version: stored.prompt_version.clone(),
                input_tokens,
                output_tokens,
                result_hash: stored.result_hash.clone(),
                cached,
            })),
            ..envelope.clone()
        };
        let send = span.producer(&self.results_topic);
        let h = send.ids().inject(headers::owned(&[(headers::IDEMPOTENCY_KEY, &envelope.idempotency_key)]));
        self.produce(&self.results_topic, record_key, out.encode_to_bytes(), h).await
    }

    /// Sends the record to the retry topic, due after the policy's delay (or the
    /// endpoint's `Retry-After`, when longer); its attempt stays spent.
    async fn schedule_retry(
        &self,
        envelope: &Envelope,
        record_key: &[u8],
        attempt: i32,
        retry: u32,
        error: &LlmError,
        span: &RecordSpan,
    ) -> anyhow::Result<()> {
        let key = &envelope.idempotency_key;
        // The endpoint's Retry-After when longer, up to the longest delay of the policy
        // (the consumer holds a retry record no longer than that).
        let delay = self.retry.delay_for(retry).max(error.retry_after.unwrap_or_default()).min(self.retry.max_delay);
        let due = crate::consume::now_ms() + delay.as_millis() as i64;
        if let Some(blocks) = &self.strict {
            blocks.block(record_key, key).await?;
        }
        let out = Envelope { attempt: attempt.max(0) as u32, ..envelope.clone() };
        let send = span.producer(&self.retry.topic);
        let h = send.ids().inject(headers::owned(&[
            (headers::IDEMPOTENCY_KEY, key),
            (headers::RETRY_DUE_MS, &due.to_string()),
            (headers::RETRY_COUNT, &retry.to_string()),
        ]));
        self.produce(&self.retry.topic, record_key, out.encode_to_bytes(), h).await?;
        if !self.store.schedule_retry(key, attempt).await? {
            // The lease was taken over meanwhile (this attempt outlived it): the other
            // replica's attempt decides; the retry record, when it comes back, finds it.
            tracing::warn!(idempotency_key = %key, attempt, "the lease was lost before the retry was recorded");
        }
        let detail = format!("delayed retry {retry} due in {} ms; last error: {}", delay.as_millis(), error.error);
        self.store.record_run(envelope, attempt, "retry_scheduled", &span.ids().trace_id_hex(), Some(&detail)).await?;
        self.metrics.retries_scheduled.inc();
        self.metrics.outcome("retry_scheduled");
        tracing::warn!(idempotency_key = %key, attempt, retry, delay_ms = delay.as_millis() as u64, error = %error, "transient LLM failure; delayed retry scheduled");
        Ok(())
    }

    /// Dead-letters the record, never to be called again: first, in one transaction, the
    /// key is marked `dead_lettered` with its dead letter `pending`; then the DLQ record
    /// is written and the dead letter listed. A failure after the first step leaves the
    /// pending dead letter for the record's next handling to write (`DeadLettered`), so a
    /// key is never dead-lettered twice nor paid for again. `Skipped` when the key ended
    /// otherwise meanwhile (another replica stored its result).
    async fn give_up(
        &self,
        mut envelope: Envelope,
        record_key: &[u8],
        error: &RecordError,
        attempts: i32,
        span: &RecordSpan,
    ) -> anyhow::Result<Handled> {
        envelope.attempt = attempts.max(0) as u32;
        let key = envelope.idempotency_key.clone();
        // Past the DLQ limit the record is held here (its offset waits, no new call is made)
        // until the limit allows it again or the stage stops; the stage says why meanwhile.
        self.dead_letters.admit(1, 0, &self.shutdown).await?;
        if let Some(blocks) = &self.strict {
            blocks.block(record_key, &key).await?;
        }
        let snapshot = envelope.clone();
        let send = span.producer(&self.dlq_topic);
        let (dead, h) = self.dead_letters.letter(envelope, error, send.ids());
        let Some(id) = self.store.claim_dead_letter(&dead, send.ids()).await? else {
            tracing::info!(idempotency_key = %key, "the key ended meanwhile; not dead-lettering it");
            return Ok(Handled::Skipped);
        };
        // The claim's lease is renewed until the dead letter is listed.
        let _held = self.store.hold(&key, attempts);
        self.produce(&self.dlq_topic, record_key, dead.encode_to_bytes(), h).await?;
        drop(send);
        crate::failpoints::pass(&self.store.pipeline, crate::failpoints::Instant::AfterDeadLetterProduced).await;
        // Retried here: handled again, the record would write its DLQ record again.
        let pool = &self.store.pool;
        self.until_written("list a dead letter", &key, || enrich_common::dead_letter_store::list_pending(pool, id))
            .await
            .map_err(|_| anyhow::anyhow!("the dead letter of {key} could not be listed"))?;
        self.store.dead_letter_listed(&key).await?;
        self.store
            .record_run(&snapshot, attempts, "dead_lettered", &span.ids().trace_id_hex(), Some(&error.to_string()))
            .await?;
        self.metrics.outcome("dead_lettered");
        self.dead_letters.recorded(1, 0);
        self.metrics.stage.dead_lettered(error.reason);
        tracing::warn!(idempotency_key = %key, reason = error.reason, error = %error.message, attempts, "dead-lettered");
        Ok(Handled::DeadLettered)
    }

    /// The key is `dead_lettered`: a dead letter of it still `pending` (its handling
    /// failed between marking the key and listing the dead letter) is written to the DLQ
    /// topic now, from its stored value, and listed. Whether there was one.
    async fn finish_pending_dead_letter(&self, envelope: &Envelope, record_key: &[u8]) -> anyhow::Result<bool> {
        let key = &envelope.idempotency_key;
        let pool = &self.store.pool;
        let Some((id, value, traceparent)) =
            enrich_common::dead_letter_store::pending_of(pool, &self.store.pipeline, key, STAGE).await?
        else {
            return Ok(false);
        };
        // One replica writes it: the one that takes the key's lease (the claimant's has
        // expired, or is ours from an earlier incarnation).
        if !self.store.take_dead_lettered(key).await? {
            return Ok(false);
        }
        let dead = Envelope::decode_from(&value).map_err(|e| anyhow::anyhow!("pending dead letter {id}: {e}"))?;
        let _held = self.store.hold(key, dead.attempt as i32);
        let trace =
            traceparent.as_deref().and_then(|t| TraceContext::parse(t, None)).unwrap_or_else(TraceContext::new_root);
        let h = enrich_common::dead_letter::dlq_headers(&dead, &trace);
        self.produce(&self.dlq_topic, record_key, value, h).await?;
        self.until_written("list a dead letter", key, || enrich_common::dead_letter_store::list_pending(pool, id))
            .await
            .map_err(|_| anyhow::anyhow!("the dead letter of {key} could not be listed"))?;
        self.store.dead_letter_listed(key).await?;
        let failure = dead.failure().cloned().unwrap_or_default();
        let detail = format!("{}: {} (written after an interrupted dead-lettering)", failure.reason, failure.message);
        self.store
            .record_run(&dead, dead.attempt as i32, "dead_lettered", &trace.trace_id_hex(), Some(&detail))
            .await?;
        self.metrics.outcome("dead_lettered");
        tracing::warn!(idempotency_key = %key, reason = %failure.reason, "pending dead letter written to the DLQ");
        Ok(true)
    }

    /// A record on the requests topic that is not an envelope: dead-letter it as it is.
    async fn reject_foreign(&self, message: &OwnedMessage, span: &RecordSpan, reason: String) -> anyhow::Result<()> {
        self.dead_letters.admit(1, 0, &self.shutdown).await?;
        let envelope = self.dead_letters.foreign(message);
        let error = RecordError::invalid("invalid_envelope", reason);
        let send = span.producer(&self.dlq_topic);
        let record_key = message.key().unwrap_or(envelope.idempotency_key.as_bytes()).to_vec();
        let (dead, h) = self.dead_letters.letter(envelope, &error, send.ids());
        self.produce(&self.dlq_topic, &record_key, dead.encode_to_bytes(), h).await?;
        // Listed and replayable like every other dead letter (the same record read again
        // is recorded once).
        enrich_common::dead_letter_store::record(&self.store.pool, &[(&dead, send.ids())]).await?;
        self.dead_letters.recorded(1, 0);
        self.metrics.stage.dead_lettered(error.reason);
        tracing::warn!(topic = message.topic(), offset = message.offset(), error = %error, "foreign record dead-lettered");
        Ok(())
    }

    async fn produce(&self, topic: &str, key: &[u8], payload: Vec<u8>, headers: OwnedHeaders) -> anyhow::Result<()> {
        self.producer
            .send(FutureRecord::to(topic).key(key).payload(&payload).headers(headers), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("cannot produce to {topic}: {e}"))?;
        self.metrics.stage.produced(topic, 1);
        Ok(())
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
            delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(100),
        };
        let delays: Vec<u64> = (1..=4).map(|n| p.delay_for(n).as_secs()).collect();
        assert_eq!(delays, vec![30, 60, 100, 100]);
        assert_eq!(p.delay_for(1000), Duration::from_secs(100), "no overflow on a long retry history");
    }
}
