//! One attempt at a record: render the prompt, the response cache, the LLM call (flow
//! control's turn, the budget, the lease's gate, fallback models), validation and one
//! repair, then the result stored; the database writes of a paid call are retried
//! rather than dropped.

use enrich_common::ErrorClass;
use enrich_common::envelope::Envelope;
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use enrich_common::http::Condition;
use enrich_common::spans::{RecordSpan, attr};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tracing::Instrument;

use super::{AttemptError, Enricher, jitter};
use crate::cache::ResponseCache;
use crate::llm::{Completion, LlmError};
use crate::prompt::{Prompt, Repair};
use crate::store::{Gate, Step, StoredResult};

impl Enricher {
    /// One attempt: render, call, validate, store. Returns the stored result, the tokens
    /// its calls used and whether the cache answered; and, beside it, whether one of its
    /// calls was paid (such an attempt is never refunded).
    pub(super) async fn attempt(
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

    pub(super) async fn attempt_steps(
        &self,
        envelope: &Envelope,
        attempt: i32,
        span: &RecordSpan,
        steps: &mut Vec<Step>,
    ) -> Result<(StoredResult, (u32, u32), bool), AttemptError> {
        let key = &envelope.idempotency_key;
        let record: serde_json::Value = serde_json::from_slice(&envelope.payload).map_err(|e| {
            AttemptError::Llm(LlmError {
                error: RecordError::invalid(Reason::InvalidJson, format!("the payload is not JSON: {e}")),
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
            // The repair's 429s charged to this record (see `policy::charged`), and the
            // validation error it was to repair: past `llm.max_rate_limited` of them the
            // record is dead-lettered with that error instead of waiting for ever.
            let (mut repair_charged, mut last_429, mut invalid) = (0u32, None, None::<RecordError>);
            loop {
                let repairing = prompt.repair.is_some();
                let step_name = if repairing { "llm_repair" } else { "llm_call" };
                let called = match self.call(&prompt, span, key, attempt, step_name, steps).await {
                    // The first call is paid: a repair that cannot be made now (a spent
                    // budget, a 429, an outage) waits, under the renewed lease, rather
                    // than ending the attempt.
                    Err(AttemptError::Budget(wait)) if repairing => Err(wait),
                    Ok(Err(e)) if repairing && (e.error.reason == Reason::RateLimited || e.endpoint_down()) => {
                        if e.error.reason == Reason::RateLimited {
                            let now = self.flow.tally();
                            if let Some(before) = last_429.replace(now) {
                                let answered = now.answered.saturating_sub(before.answered);
                                let refused = now.refused.saturating_sub(before.refused).saturating_sub(1);
                                repair_charged += u32::from(crate::policy::charged(answered, refused));
                            }
                            if repair_charged > self.retry.max_rate_limited
                                && let Some(invalid) = invalid.take()
                            {
                                let done: &[Step] = steps;
                                self.until_written("store the steps of a refused repair", key, || {
                                    self.store.record_steps(key, done)
                                })
                                .await?;
                                let message = format!(
                                    "{}; its repair call was refused (429) {repair_charged} times while the endpoint answered other calls",
                                    invalid.message
                                );
                                let error = RecordError::new(ErrorClass::Permanent, invalid.reason, message);
                                return Err(AttemptError::Llm(LlmError { error, retry_after: None }));
                            }
                        }
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
                        tracing::info!(idempotency_key = %key, reason = %error.reason, "invalid output; one repair call");
                        prompt.repair = Some(Repair { previous: completion.content, error: error.message.clone() });
                        invalid = Some(error);
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
    pub(super) async fn until_written<T, E, F, Fut>(
        &self,
        what: &str,
        key: &str,
        mut write: F,
    ) -> Result<T, AttemptError>
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
                        self.state.set_condition(Condition::Database, None);
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
            self.state.set_condition(Condition::Database, Some(format!("cannot {what}: {e}")));
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
    pub(super) async fn call(
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
                self.state.set_condition(Condition::Budget, None);
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
                    if e.error.reason == Reason::RateLimited {
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
                    self.metrics.llm_call(e.error.reason.as_str());
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
    pub(super) async fn unreserve(&self, key: &str, reservation: Option<crate::budget::Reservation>) {
        if let (Some(budgets), Some(r)) = (&self.budgets, reservation)
            && let Err(e) = budgets.settle(&r, 0.0).await
        {
            tracing::warn!(idempotency_key = %key, error = %e, "cannot give back a budget reservation");
        }
    }
}
