//! The enricher's view of the per-key state: leases, attempts, stored results, audit.

use enrich_common::envelope::Envelope;
use enrich_common::key_state::{State, lease};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::MicroBatcher;

/// What the database says about a key before a call.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    /// Already enriched: re-emit this, never call again.
    Enriched(StoredResult),
    /// Already published: nothing to call or emit.
    Published,
    /// Dead-lettered earlier: nothing more to do.
    DeadLettered,
    /// Attempts are used up: dead-letter without another call.
    AttemptsExhausted { attempts: i32 },
    /// Another live replica holds the lease for this long.
    Leased { remaining: Duration },
    /// The lease is ours; this is attempt number `attempt`.
    Acquired { attempt: i32 },
    /// The key's previous attempt never finished (its process died holding the lease):
    /// this record may be the one that crashed it. Nothing was charged; acquire again
    /// with `isolated` to run it alone.
    Suspect,
    /// The key had no row (removed since ingest); one was made: ask again.
    Adopted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub json: String,
    pub result_hash: String,
    pub model: String,
    pub prompt_version: String,
}

/// What the gate before an LLM call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The lease is ours and covers the call: call now.
    Go,
    /// The operator paused enrichment: the call must not start.
    Paused,
    /// The lease is no longer ours (it expired and another replica took the key, or the
    /// key ended meanwhile): drop the work, never call.
    Fenced,
}

/// What the store needs to talk to PostgreSQL about this replica's keys.
pub struct StoreCore {
    pub pool: PgPool,
    pub pipeline: String,
    pub owner: String,
    pub lease: Duration,
    /// The longest one LLM call can take (`llm.request_timeout_ms`): a call starts only
    /// under a lease that outlasts it.
    pub call_timeout: Duration,
    pub max_attempts: i32,
    /// Leases this process holds (key → attempt), renewed every third of the lease
    /// while their records wait or call.
    pub held: std::sync::Mutex<HashMap<String, i32>>,
}

/// A lease this process holds: renewed while it lives, forgotten when dropped.
pub struct Held<'a> {
    core: &'a StoreCore,
    key: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.core.held.lock() {
            held.remove(&self.key);
        }
    }
}

/// The enricher's per-key state. `acquire` and `finish` run on the hot path and go
/// through micro-batchers: one statement for everything queued.
pub struct Store {
    pub core: Arc<StoreCore>,
    acquire: MicroBatcher<AcquireRequest, KeyState>,
    finish: MicroBatcher<FinishRequest, Option<StoredResult>>,
    gate: MicroBatcher<(String, i32), Gate>,
}

pub struct AcquireRequest {
    key: String,
    /// The caller runs this record alone, so a suspect may be charged.
    isolated: bool,
    topic: String,
    partition: i32,
    offset: i64,
    kafka_key: Option<Vec<u8>>,
}

pub struct FinishRequest {
    key: String,
    attempt: i32,
    result: StoredResult,
    steps: Vec<Step>,
    trace_id: String,
    topic: String,
    partition: i32,
    offset: i64,
}

/// Most records per batched statement.
const MAX_BATCH: usize = 256;
/// Statements of one kind in flight at once.
const WRITERS: usize = 4;

type ResultRow = (String, String, Option<String>, Option<String>, Option<String>, Option<String>);
type StateRow =
    (String, String, i32, Option<String>, Option<String>, Option<String>, Option<String>, Option<f64>, Option<String>);

impl Store {
    pub fn new(core: StoreCore) -> Self {
        let core = Arc::new(core);
        let (a, f, g) = (core.clone(), core.clone(), core.clone());
        Self {
            gate: MicroBatcher::spawn(WRITERS, MAX_BATCH, move |reqs| {
                let core = g.clone();
                async move { core.gate_batch(reqs).await }
            }),
            acquire: MicroBatcher::spawn(WRITERS, MAX_BATCH, move |reqs| {
                let core = a.clone();
                async move { core.acquire_batch(reqs).await }
            }),
            finish: MicroBatcher::spawn(WRITERS, MAX_BATCH, move |reqs| {
                let core = f.clone();
                async move { core.finish_batch(reqs).await }
            }),
            core,
        }
    }

    /// Takes the lease and counts the attempt *before* the call, so a record that crashes
    /// its consumer cannot loop; or says why not.
    pub async fn acquire(&self, envelope: &Envelope, isolated: bool) -> anyhow::Result<KeyState> {
        let src = envelope.source.clone().unwrap_or_default();
        self.acquire
            .call(AcquireRequest {
                key: envelope.idempotency_key.clone(),
                isolated,
                topic: src.topic,
                partition: src.partition,
                offset: src.offset,
                kafka_key: src.key,
            })
            .await
    }

    /// Right before an LLM call: checks in one statement that the lease on `key` is still
    /// ours for this attempt, extends it to cover the call when it would not, and reads
    /// the kill switch. A pause committed before this statement stops the call.
    pub async fn gate(&self, key: &str, attempt: i32) -> anyhow::Result<Gate> {
        self.gate.call((key.to_string(), attempt)).await
    }

    /// Stores the result (unless another was stored first), its steps and the run row;
    /// returns the stored result, so every copy emitted for a key is the same; `None` when
    /// the key was dead-lettered meanwhile (a terminal state is never overwritten: the
    /// answer is not published).
    pub async fn finish(
        &self,
        envelope: &Envelope,
        attempt: i32,
        result: &StoredResult,
        steps: &[Step],
        trace_id: &str,
    ) -> anyhow::Result<Option<StoredResult>> {
        let src = envelope.source.clone().unwrap_or_default();
        self.finish
            .call(FinishRequest {
                key: envelope.idempotency_key.clone(),
                attempt,
                result: result.clone(),
                steps: steps.to_vec(),
                trace_id: trace_id.to_string(),
                topic: src.topic,
                partition: src.partition,
                offset: src.offset,
            })
            .await
    }
}

/// The single-record operations (release, dead-lettering, audit rows) are the core's own.
impl std::ops::Deref for Store {
    type Target = StoreCore;
    fn deref(&self) -> &StoreCore {
        &self.core
    }
}

impl StoreCore {
    /// Registers the lease just acquired on `key`, so it is renewed until dropped.
    pub fn hold(&self, key: &str, attempt: i32) -> Held<'_> {
        if let Ok(mut held) = self.held.lock() {
            held.insert(key.to_string(), attempt);
        }
        Held { core: self, key: key.to_string() }
    }

    /// Renews every lease this process holds, in one statement; a lease that is no
    /// longer ours (taken by another replica after it expired, or its key finished) is
    /// left alone, and the call's gate will find it lost. One that expired but is still
    /// ours is renewed: taking a key over and dead-lettering it both change the row under
    /// its lock. Returns how many were renewed.
    pub async fn renew_held(&self) -> sqlx::Result<u64> {
        let (keys, attempts): (Vec<String>, Vec<i32>) = match self.held.lock() {
            Ok(held) => held.iter().map(|(k, a)| (k.clone(), *a)).unzip(),
            Err(_) => return Ok(0),
        };
        if keys.is_empty() {
            return Ok(0);
        }
        lease::renew(&self.pool, self.who(), &keys, &attempts).await
    }

    /// Renews the held leases every third of the lease until `shutdown`.
    pub fn spawn_renewal(self: &Arc<Self>, shutdown: enrich_common::shutdown::Shutdown) -> tokio::task::JoinHandle<()> {
        let core = self.clone();
        tokio::spawn(async move {
            let every = (core.lease / 3).max(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = core.renew_held().await {
                    tracing::warn!(error = %e, "cannot renew the leases held; each call checks its own before it starts");
                }
            }
        })
    }

    async fn gate_batch(&self, reqs: Vec<(String, i32)>) -> anyhow::Result<Vec<Gate>> {
        let (keys, attempts): (Vec<&str>, Vec<i32>) = reqs.iter().map(|(k, a)| (k.as_str(), *a)).unzip();
        // A lease with less than a call's time left is extended (a live lease of ours
        // cannot be taken meanwhile); one with more is only read. One that expired but
        // nobody took is still ours (a takeover changes owner and attempts under the
        // row's lock, and is seen here).
        // A second of slack for the statement and the request's own start.
        let call = self.call_timeout + Duration::from_secs(1);
        let (paused, ours) = lease::gate(&self.pool, self.who(), call, &keys, &attempts).await?;
        Ok(reqs
            .iter()
            .map(|(k, _)| {
                if paused {
                    Gate::Paused
                } else if ours.contains(k) {
                    Gate::Go
                } else {
                    Gate::Fenced
                }
            })
            .collect())
    }

    async fn acquire_batch(&self, reqs: Vec<AcquireRequest>) -> anyhow::Result<Vec<KeyState>> {
        let keys: Vec<&str> = reqs.iter().map(|r| r.key.as_str()).collect();
        let isolated: Vec<bool> = reqs.iter().map(|r| r.isolated).collect();
        // A lease still set (expired, or ours from a previous incarnation) means the
        // previous attempt died with its process: such a key is charged only when its
        // caller runs it alone.
        let acquired = lease::acquire(&self.pool, self.who(), self.max_attempts, &keys, &isolated).await?;
        let mut acquired: HashMap<String, i32> = acquired.into_iter().collect();

        let others: Vec<&str> = keys.iter().copied().filter(|k| !acquired.contains_key(*k)).collect();
        let mut states: HashMap<String, StateRow> = HashMap::new();
        if !others.is_empty() {
            let rows: Vec<StateRow> = sqlx::query_as(
                "SELECT idempotency_key, state, attempts, result::text, result_hash, model, prompt_version,
                        EXTRACT(EPOCH FROM (lease_until - now()))::float8, lease_owner
                 FROM enrich_state WHERE pipeline = $1 AND idempotency_key = ANY($2)",
            )
            .bind(&self.pipeline)
            .bind(&others)
            .fetch_all(&self.pool)
            .await?;
            states = rows.into_iter().map(|r| (r.0.clone(), r)).collect();
        }

        let mut missing = Vec::new();
        let answers = reqs
            .iter()
            .map(|r| {
                // A key acquired once in this batch goes to its first request only.
                if let Some(attempt) = acquired.remove(&r.key) {
                    return KeyState::Acquired { attempt };
                }
                match states.get(&r.key) {
                    None if keys.iter().filter(|k| **k == r.key).count() > 1 => {
                        KeyState::Leased { remaining: Duration::from_millis(50) }
                    }
                    None => {
                        missing.push(r);
                        KeyState::Adopted
                    }
                    Some((_, state, attempts, json, hash, model, version, lease_left, lease_owner)) => {
                        match State::parse(state) {
                            Some(State::Published) => KeyState::Published,
                            Some(State::Enriched) => KeyState::Enriched(StoredResult {
                                json: json.clone().unwrap_or_default(),
                                result_hash: hash.clone().unwrap_or_default(),
                                model: model.clone().unwrap_or_default(),
                                prompt_version: version.clone().unwrap_or_default(),
                            }),
                            // Being dead-lettered by another replica (its DLQ record is
                            // being written): wait for it.
                            Some(State::DeadLettered)
                                if lease_left.is_some_and(|l| l > 0.0)
                                    && lease_owner.as_deref().is_some_and(|o| o != self.owner) =>
                            {
                                KeyState::Leased {
                                    remaining: Duration::from_secs_f64(lease_left.unwrap_or(0.0).clamp(0.05, 3600.0)),
                                }
                            }
                            Some(State::DeadLettered) => KeyState::DeadLettered,
                            // Another replica's live attempt is waited for before anything
                            // else is decided: a second delivery during a final attempt
                            // must not dead-letter the key under it. (In this process one
                            // record of a key runs at a time, so a live lease of ours is
                            // an earlier incarnation's.)
                            _ if lease_left.is_some_and(|l| l > 0.0)
                                && lease_owner.as_deref().is_some_and(|o| o != self.owner) =>
                            {
                                KeyState::Leased {
                                    remaining: Duration::from_secs_f64(lease_left.unwrap_or(0.0).clamp(0.05, 3600.0)),
                                }
                            }
                            _ if *attempts >= self.max_attempts => KeyState::AttemptsExhausted { attempts: *attempts },
                            // A lease left behind by a dead process (expired, or ours from a
                            // previous incarnation of this replica).
                            _ if lease_owner.as_deref() == Some(self.owner.as_str())
                                || lease_left.is_some_and(|l| l <= 0.0) =>
                            {
                                KeyState::Suspect
                            }
                            _ => KeyState::Leased {
                                remaining: Duration::from_secs_f64(lease_left.unwrap_or(0.0).clamp(0.05, 3600.0)),
                            },
                        }
                    }
                }
            })
            .collect();
        if !missing.is_empty() {
            // Requests for keys ingest never recorded (their rows were removed): adopt them.
            let orphans: Vec<lease::Orphan> = missing
                .iter()
                .map(|r| lease::Orphan {
                    key: &r.key,
                    topic: &r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    kafka_key: r.kafka_key.as_deref(),
                })
                .collect();
            lease::adopt(&self.pool, &self.pipeline, &orphans).await?;
        }
        Ok(answers)
    }

    async fn finish_batch(&self, reqs: Vec<FinishRequest>) -> anyhow::Result<Vec<Option<StoredResult>>> {
        let keys: Vec<&str> = reqs.iter().map(|r| r.key.as_str()).collect();
        let finished: Vec<lease::Finished> = reqs
            .iter()
            .map(|r| lease::Finished {
                key: &r.key,
                attempt: r.attempt,
                json: &r.result.json,
                result_hash: &r.result.result_hash,
                model: &r.result.model,
                prompt_version: &r.result.prompt_version,
                topic: &r.topic,
                partition: r.partition,
                offset: r.offset,
                trace_id: &r.trace_id,
            })
            .collect();
        let mut steps = lease::StepRows::default();
        for r in &reqs {
            step_rows(&mut steps, &r.key, &r.steps);
        }
        let stored = lease::finish(&self.pool, &self.pipeline, &self.owner, &finished, &steps).await?;

        // Keys whose result another attempt stored first: answer with that one. A key
        // dead-lettered meanwhile has none.
        let earlier: Vec<&str> = keys.iter().copied().filter(|k| !stored.contains(*k)).collect();
        let mut existing: HashMap<String, Option<StoredResult>> = HashMap::new();
        if !earlier.is_empty() {
            let rows: Vec<ResultRow> = sqlx::query_as(
                "SELECT idempotency_key, state, result::text, result_hash, model, prompt_version
                     FROM enrich_state WHERE pipeline = $1 AND idempotency_key = ANY($2)",
            )
            .bind(&self.pipeline)
            .bind(&earlier)
            .fetch_all(&self.pool)
            .await?;
            existing = rows
                .into_iter()
                .map(|(k, state, json, hash, model, version)| {
                    let r = (State::parse(&state) != Some(State::DeadLettered)).then(|| StoredResult {
                        json: json.unwrap_or_default(),
                        result_hash: hash.unwrap_or_default(),
                        model: model.unwrap_or_default(),
                        prompt_version: version.unwrap_or_default(),
                    });
                    (k, r)
                })
                .collect();
        }
        Ok(reqs.into_iter().map(|r| existing.remove(&r.key).unwrap_or(Some(r.result))).collect())
    }

    /// This replica as the writer of its leases.
    pub fn who(&self) -> lease::Owner<'_> {
        lease::Owner { pipeline: &self.pipeline, owner: &self.owner, lease: self.lease }
    }

    /// Gives the lease on `key` for `attempt` back, the attempt too when `refund_attempt`
    /// (the endpoint is down, or we are shutting down before the call). Fenced: nothing
    /// happens when the lease is no longer ours.
    pub async fn release(&self, key: &str, attempt: i32, refund_attempt: bool) -> sqlx::Result<()> {
        if !lease::release(&self.pool, self.who(), lease::Token { key, attempt }, refund_attempt).await? {
            tracing::warn!(idempotency_key = %key, attempt, "the lease was no longer ours to give back");
        }
        Ok(())
    }

    /// The record went to the retry topic: its attempt stays spent, its lease is given
    /// back. False when the lease was no longer ours (another replica's attempt decides).
    pub async fn schedule_retry(&self, key: &str, attempt: i32) -> sqlx::Result<bool> {
        lease::schedule_retry(&self.pool, self.who(), lease::Token { key, attempt }).await
    }

    /// See [`lease::claim_dead_letter`].
    pub async fn claim_dead_letter(
        &self,
        dead: &Envelope,
        trace: &enrich_common::TraceContext,
    ) -> sqlx::Result<Option<(i64, i32)>> {
        lease::claim_dead_letter(&self.pool, self.who(), dead, trace).await
    }

    /// See [`lease::claim_stored_dead_letter`].
    pub async fn claim_stored_dead_letter(
        &self,
        dead: &Envelope,
        trace: &enrich_common::TraceContext,
    ) -> sqlx::Result<Option<(i64, i32)>> {
        lease::claim_stored_dead_letter(&self.pool, self.who(), dead, trace).await
    }

    /// See [`lease::take_dead_lettered`].
    pub async fn take_dead_lettered(&self, key: &str) -> sqlx::Result<bool> {
        lease::take_dead_lettered(&self.pool, self.who(), key).await
    }

    /// The key's dead letter is listed: its lease goes.
    pub async fn dead_letter_listed(&self, key: &str) -> sqlx::Result<()> {
        lease::dead_letter_listed(&self.pool, self.who(), key).await
    }

    /// Appends step outcomes (llm_call, validation) to the audit, in one statement.
    pub async fn record_steps(&self, key: &str, steps: &[Step]) -> sqlx::Result<()> {
        let mut cols = lease::StepRows::default();
        step_rows(&mut cols, key, steps);
        sqlx::query(
            "INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens, error, cost_usd)
             SELECT $1, $2, 'enricher', s, a, st, d, m, i, o, e, c
             FROM UNNEST($3::text[], $4::int[], $5::text[], $6::float8[], $7::text[], $8::int[], $9::int[], $10::text[], $11::float8[]) AS u(s, a, st, d, m, i, o, e, c)",
        )
        .bind(&self.pipeline)
        .bind(key)
        .bind(&cols.step)
        .bind(&cols.attempt)
        .bind(&cols.status)
        .bind(&cols.duration_ms)
        .bind(&cols.model)
        .bind(&cols.input_tokens)
        .bind(&cols.output_tokens)
        .bind(&cols.error)
        .bind(&cols.cost_usd)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends the enricher's run-history row for this record.
    pub async fn record_run(
        &self,
        envelope: &Envelope,
        attempt: i32,
        status: &str,
        trace_id: &str,
        detail: Option<&str>,
    ) -> sqlx::Result<()> {
        let src = envelope.source.clone().unwrap_or_default();
        sqlx::query(
            "INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, source_topic, source_partition, source_offset, trace_id, detail, worker)
             VALUES ($1, $2, 'enricher', $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&self.pipeline)
        .bind(&envelope.idempotency_key)
        .bind(attempt)
        .bind(status)
        .bind(&src.topic)
        .bind(src.partition)
        .bind(src.offset)
        .bind(trace_id)
        .bind(detail)
        .bind(&self.owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub step: &'static str,
    pub attempt: i32,
    pub status: &'static str,
    pub duration_ms: Option<f64>,
    pub model: Option<String>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    pub cost_usd: Option<f64>,
    pub error: Option<String>,
}

impl Step {
    pub fn llm_call(attempt: i32, took: Duration, model: &str) -> Self {
        Self {
            step: "llm_call",
            attempt,
            status: "ok",
            duration_ms: Some(took.as_secs_f64() * 1000.0),
            model: Some(storable(model)),
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            error: None,
        }
    }

    pub fn validation(attempt: i32) -> Self {
        Self {
            step: "validation",
            attempt,
            status: "ok",
            duration_ms: None,
            model: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            error: None,
        }
    }

    pub fn named(self, step: &'static str) -> Self {
        Self { step, ..self }
    }

    pub fn tokens(self, input: u32, output: u32) -> Self {
        Self { input_tokens: Some(input as i32), output_tokens: Some(output as i32), ..self }
    }

    pub fn cost(self, usd: f64) -> Self {
        Self { cost_usd: Some(usd), ..self }
    }

    pub fn failed(self, error: String) -> Self {
        Self { status: "failed", error: Some(storable(&error)), ..self }
    }

    /// An LLM call that answered: it was paid for (a cache hit was not).
    pub fn paid(&self) -> bool {
        matches!(self.step, "llm_call" | "llm_repair") && self.status == "ok"
    }
}

/// Text PostgreSQL can store: U+0000 (which a provider's error body or model name may
/// hold) is written as `\u0000`.
pub fn storable(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

/// Appends `steps` of `key` to the columns of a batched insert.
fn step_rows<'a>(rows: &mut lease::StepRows<'a>, key: &'a str, steps: &'a [Step]) {
    for s in steps {
        rows.key.push(key);
        rows.step.push(s.step);
        rows.attempt.push(s.attempt);
        rows.status.push(s.status);
        rows.duration_ms.push(s.duration_ms);
        rows.model.push(s.model.as_deref());
        rows.input_tokens.push(s.input_tokens);
        rows.output_tokens.push(s.output_tokens);
        rows.cost_usd.push(s.cost_usd);
        rows.error.push(s.error.as_deref());
    }
}
