//! What becomes of an attempt: its answer emitted, or, by the policy's decision on its
//! error, a wait for the endpoint, a retry here or through the retry topic, or the DLQ;
//! and the writes to Kafka that go with each (results, retry topic, DLQ).

use enrich_common::envelope::{EnrichmentResult, Envelope, Outcome};
use enrich_common::error::{Reason, RecordError};
use enrich_common::http::Condition;
use enrich_common::spans::RecordSpan;
use enrich_common::{ErrorClass, TraceContext, headers};
use rdkafka::Message;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use std::time::Duration;

use super::{Answer, AttemptError, Enricher, Handled, Run, STAGE, jitter};
use crate::breaker::Admission;
use crate::llm::LlmError;
use crate::policy::{self, Next};
use crate::store::StoredResult;

/// Which key states a dead letter may be claimed from.
#[derive(Debug, Clone, Copy)]
enum Claim {
    /// Not ended: the attempt's failure.
    Unfinished,
    /// `enriched`: a stored result that cannot be emitted.
    Stored,
}

/// The attempt this outcome belongs to.
pub(super) struct Attempted {
    pub attempt: i32,
    pub admission: Admission,
    /// One of its calls was paid: it is never refunded.
    pub paid: bool,
}

impl Enricher {
    /// Concludes an attempt: `Some` when the record is handled, `None` to go round the
    /// gate again.
    pub(super) async fn conclude(
        &self,
        envelope: &Envelope,
        record_key: &[u8],
        span: &RecordSpan,
        Attempted { attempt, admission, paid }: Attempted,
        outcome: Result<(StoredResult, (u32, u32), bool), AttemptError>,
        run: &mut Run<'_>,
    ) -> anyhow::Result<Option<Handled>> {
        let key = &envelope.idempotency_key;
        let e = match outcome {
            Ok((stored, tokens, cached)) => {
                self.breaker_success(admission);
                if cached {
                    span.set([opentelemetry::KeyValue::new("enrich.cache_hit", true)]);
                }
                let answer = Answer { attempt, tokens, cached };
                if let Some(handled) = self.emit(envelope, record_key, &stored, answer, span).await? {
                    return Ok(Some(handled));
                }
                self.metrics.outcome("enriched");
                self.dead_letters.recorded(0, 1);
                return Ok(Some(Handled::Enriched));
            }
            Err(AttemptError::Fenced) => {
                // Another replica holds the key now (this lease expired while the record
                // waited): its answer will be the key's. Ask the store again.
                self.breaker.unused(admission);
                if !paid {
                    run.tries = run.tries.saturating_sub(1);
                }
                tracing::warn!(idempotency_key = %key, attempt, "the lease was lost before the call; not calling");
                self.metrics.outcome("fenced");
                return Ok(None);
            }
            Err(AttemptError::Db(e)) => {
                self.breaker.unused(admission);
                if paid {
                    // The database refuses what a paid call produced: calling again would
                    // pay again for the same refusal. The record goes to the DLQ with the
                    // reason; a replay runs it again once the cause is fixed.
                    let err = RecordError::new(
                        ErrorClass::Permanent,
                        Reason::StorageRefused,
                        format!("the database refused the attempt's writes: {e:#}"),
                    );
                    return Ok(Some(self.give_up(envelope.clone(), record_key, &err, attempt, span).await?));
                }
                let _ = self.give_back(key, attempt, true).await;
                return Err(e);
            }
            Err(AttemptError::Superseded) => {
                self.breaker_success(admission);
                tracing::warn!(idempotency_key = %key, attempt, "the key was dead-lettered while this attempt ran; its answer is dropped");
                self.metrics.outcome("superseded");
                return Ok(Some(Handled::Skipped));
            }
            Err(AttemptError::Stopped) => {
                // Unless a call of this attempt was paid, the attempt and the lease go
                // back, so the record runs normally after the restart (not as a suspect,
                // in isolation).
                self.breaker.unused(admission);
                self.give_back(key, attempt, !paid).await?;
                anyhow::bail!("shutting down while {key} waited for its LLM call");
            }
            Err(AttemptError::Budget(wait)) => {
                // The call was not made: give the attempt back (unless an earlier call of
                // it was paid) and wait for the next window (the record keeps its place;
                // nothing is dead-lettered).
                self.breaker.unused(admission);
                self.give_back(key, attempt, !paid).await?;
                if !paid {
                    run.tries = run.tries.saturating_sub(1);
                }
                self.metrics.budget_exhausted.set(1);
                self.state.set_condition(
                    Condition::Budget,
                    Some(format!("the LLM budget is spent; calls resume in {} s", wait.as_secs())),
                );
                tokio::select! {
                    _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while the LLM budget is spent"),
                    _ = tokio::time::sleep(wait.min(Duration::from_secs(5))) => return Ok(None),
                }
            }
            Err(AttemptError::Llm(e)) => e,
        };
        // The breaker hears how the endpoint did: down, or up (it answered, or no call
        // was made).
        match e.error.class {
            ErrorClass::InvalidInput => self.breaker.unused(admission),
            ErrorClass::Permanent => self.breaker_success(admission),
            _ if e.endpoint_down() => self.breaker_failure(admission, &e.error),
            _ => self.breaker_success(admission),
        }
        if e.error.reason == Reason::RateLimited {
            // Since the record's previous 429: the other calls answered and refused (this
            // 429 is counted in the tally already).
            let now = self.flow.tally();
            if let Some(before) = run.last_429 {
                let answered = now.answered.saturating_sub(before.answered);
                let refused = now.refused.saturating_sub(before.refused).saturating_sub(1);
                if policy::charged(answered, refused) {
                    run.rate_limited += 1;
                    tracing::warn!(
                        idempotency_key = %key, attempt, charged = run.rate_limited, budget = self.retry.max_rate_limited,
                        answered, refused, "429 while the endpoint answers other calls: charged to the record"
                    );
                }
            }
            run.last_429 = Some(now);
        }
        let limits = policy::Limits {
            max_attempts: self.store.max_attempts,
            quick_retries: self.retry.quick_retries,
            max_rate_limited: self.retry.max_rate_limited,
        };
        let tries = policy::Tries { attempts: run.tries, rate_limited: run.rate_limited };
        match policy::decide(&e, attempt, tries, self.breaker.is_open(), limits) {
            Next::WaitForEndpoint => {
                // Give the attempt back (unless a call of it was paid) and wait for the
                // endpoint (the breaker, or the 429's Retry-After).
                crate::failpoints::pass(&self.store.pipeline, crate::failpoints::Instant::BeforeGiveBack).await;
                self.give_back(key, attempt, !paid).await?;
                if !paid {
                    run.tries = run.tries.saturating_sub(1);
                }
                if !self.breaker.is_open() {
                    let wait = e.retry_after.unwrap_or_else(|| jitter(run.backoff));
                    run.backoff = (run.backoff * 2).min(Duration::from_secs(10));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while the LLM endpoint is unavailable"),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Ok(None)
            }
            Next::RetryLater => {
                self.schedule_retry(envelope, record_key, attempt, run.retries + 1, &e, span).await?;
                Ok(Some(Handled::RetryScheduled))
            }
            Next::RetryHere => {
                let wait = e.retry_after.unwrap_or_else(|| jitter(run.backoff));
                run.backoff = (run.backoff * 2).min(Duration::from_secs(10));
                tracing::warn!(idempotency_key = %key, attempt, error = %e, wait_ms = wait.as_millis() as u64, "transient LLM failure; retrying");
                // Give the lease back (the attempt stays spent): a lease left set marks an
                // attempt that died with its process.
                self.give_back(key, attempt, false).await?;
                tokio::select! {
                    _ = self.shutdown.cancelled() => anyhow::bail!("shutting down during the backoff of {key}"),
                    _ = tokio::time::sleep(wait) => {}
                }
                Ok(None)
            }
            Next::DeadLetter(error) => {
                Ok(Some(self.give_up(envelope.clone(), record_key, &error, attempt, span).await?))
            }
        }
    }

    /// Gives the lease back (and the attempt, with `refund`), retried like a paid
    /// answer's writes: a release lost to a database error would leave this process's own
    /// lease on the key, and the record handled again would take it for one that died
    /// with its process and spend another attempt (during an LLM outage, a healthy record
    /// could reach the DLQ that way).
    async fn give_back(&self, key: &str, attempt: i32, refund: bool) -> anyhow::Result<()> {
        self.until_written("give the lease back", key, || self.store.release(key, attempt, refund))
            .await
            .map_err(|_| anyhow::anyhow!("the lease of {key} could not be given back"))
    }

    /// Writes the stored result to the results topic. A result the producer refuses as
    /// too large (at enqueue or at delivery) can never be written: the key is
    /// dead-lettered `too_large` instead (its result stays stored) and that outcome is
    /// returned; `None` when the result was written.
    pub(super) async fn emit(
        &self,
        envelope: &Envelope,
        record_key: &[u8],
        stored: &StoredResult,
        Answer { attempt, tokens: (input_tokens, output_tokens), cached }: Answer,
        span: &RecordSpan,
    ) -> anyhow::Result<Option<Handled>> {
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
        let value = out.encode_to_bytes();
        let size = value.len() + record_key.len();
        match self.produce(&self.results_topic, record_key, value, h).await {
            Ok(()) => Ok(None),
            Err(e) if enrich_common::kafka::is_too_large(&e) => {
                drop(send);
                let error = RecordError::new(
                    ErrorClass::Permanent,
                    Reason::TooLarge,
                    format!(
                        "the enrichment result ({} bytes of JSON) makes a record of {size} bytes, which the producer refuses for {} (message.max.bytes is {}): {e:#}",
                        stored.json.len(),
                        self.results_topic,
                        self.message_max_bytes
                    ),
                );
                let attempts = attempt.max(envelope.attempt as i32);
                Ok(Some(self.give_up_as(envelope.clone(), record_key, &error, attempts, span, Claim::Stored).await?))
            }
            Err(e) => Err(e),
        }
    }

    /// Sends the record to the retry topic, due after the policy's delay (or the
    /// endpoint's `Retry-After`, when longer); its attempt stays spent.
    pub(super) async fn schedule_retry(
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
        crate::failpoints::pass(&self.store.pipeline, crate::failpoints::Instant::AfterRetryProduced).await;
        // Retried here, not by handling the record again: handled again, it would find its
        // own lease left set, take it for an attempt that died with its process and call
        // at once, without the delay (and the retry record would come back as well).
        let marked = self.until_written("mark a delayed retry", key, || self.store.schedule_retry(key, attempt)).await;
        let marked = marked.map_err(|_| anyhow::anyhow!("the delayed retry of {key} could not be recorded"))?;
        if !marked {
            // The lease was taken over meanwhile (this attempt outlived it): the other
            // replica's attempt decides; the retry record, when it comes back, finds it.
            tracing::warn!(idempotency_key = %key, attempt, "the lease was lost before the retry was recorded");
        }
        let detail = format!("delayed retry {retry} due in {} ms; last error: {}", delay.as_millis(), error.error);
        let trace_id = span.ids().trace_id_hex();
        // The retry is recorded in the key's state: a run row the database will not take
        // is only audit lost, not a reason to handle the record again (taken again at
        // once, without the delay, beside the retry record).
        let ran = self.until_written("record a delayed retry's run", key, || {
            self.store.record_run(envelope, attempt, "retry_scheduled", &trace_id, Some(&detail))
        });
        if ran.await.is_err() {
            tracing::error!(idempotency_key = %key, attempt, "the run of a delayed retry was not recorded; the retry stands");
        }
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
    pub(super) async fn give_up(
        &self,
        envelope: Envelope,
        record_key: &[u8],
        error: &RecordError,
        attempts: i32,
        span: &RecordSpan,
    ) -> anyhow::Result<Handled> {
        self.give_up_as(envelope, record_key, error, attempts, span, Claim::Unfinished).await
    }

    /// [`Self::give_up`], from the state `from` says.
    async fn give_up_as(
        &self,
        mut envelope: Envelope,
        record_key: &[u8],
        error: &RecordError,
        attempts: i32,
        span: &RecordSpan,
        from: Claim,
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
        let claimed = match from {
            Claim::Unfinished => self.store.claim_dead_letter(&dead, send.ids()).await?,
            Claim::Stored => self.store.claim_stored_dead_letter(&dead, send.ids()).await?,
        };
        let Some((id, held_attempt)) = claimed else {
            tracing::info!(idempotency_key = %key, "the key ended meanwhile; not dead-lettering it");
            return Ok(Handled::Skipped);
        };
        // The claim's lease is renewed until the dead letter is listed (under the row's
        // attempt count: a claim that took over an expired lease keeps its owner's).
        let _held = self.store.hold(&key, held_attempt);
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
        self.metrics.stage.dead_lettered(error.reason.as_str());
        tracing::warn!(idempotency_key = %key, reason = %error.reason, error = %error.message, attempts, "dead-lettered");
        Ok(Handled::DeadLettered)
    }

    /// The key is `dead_lettered`: a dead letter of it still `pending` (its handling
    /// failed between marking the key and listing the dead letter) is written to the DLQ
    /// topic now, from its stored value, and listed. Whether there was one.
    pub(super) async fn finish_pending_dead_letter(
        &self,
        envelope: &Envelope,
        record_key: &[u8],
    ) -> anyhow::Result<bool> {
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
    pub(super) async fn reject_foreign(
        &self,
        message: &OwnedMessage,
        span: &RecordSpan,
        reason: String,
    ) -> anyhow::Result<()> {
        self.dead_letters.admit(1, 0, &self.shutdown).await?;
        let envelope = self.dead_letters.foreign(message);
        let error = RecordError::invalid(Reason::InvalidEnvelope, reason);
        let send = span.producer(&self.dlq_topic);
        let record_key = message.key().unwrap_or(envelope.idempotency_key.as_bytes()).to_vec();
        let (dead, h) = self.dead_letters.letter(envelope, &error, send.ids());
        self.produce(&self.dlq_topic, &record_key, dead.encode_to_bytes(), h).await?;
        // Listed and replayable like every other dead letter (the same record read again
        // is recorded once).
        enrich_common::dead_letter_store::record(&self.store.pool, &[(&dead, send.ids())]).await?;
        self.dead_letters.recorded(1, 0);
        self.metrics.stage.dead_lettered(error.reason.as_str());
        tracing::warn!(topic = message.topic(), offset = message.offset(), error = %error, "foreign record dead-lettered");
        Ok(())
    }

    pub(super) async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        payload: Vec<u8>,
        headers: OwnedHeaders,
    ) -> anyhow::Result<()> {
        self.producer
            .send(FutureRecord::to(topic).key(key).payload(&payload).headers(headers), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::Error::new(e).context(format!("cannot produce to {topic}")))?;
        self.metrics.stage.produced(topic, 1);
        Ok(())
    }
}
