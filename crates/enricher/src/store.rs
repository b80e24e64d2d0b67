//! The enricher's view of the per-key state: leases, attempts, stored results, audit.

use enrich_common::envelope::Envelope;
use sqlx::PgPool;
use std::time::Duration;

/// What the database says about a key before a call.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    /// Already enriched: re-emit this, never call again.
    Enriched(StoredResult),
    /// Dead-lettered earlier: nothing more to do.
    DeadLettered,
    /// Attempts are used up: dead-letter without another call.
    AttemptsExhausted { attempts: i32 },
    /// Another live replica holds the lease for this long.
    Leased { remaining: Duration },
    /// The lease is ours; this is attempt number `attempt`.
    Acquired { attempt: i32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub json: String,
    pub result_hash: String,
    pub model: String,
    pub prompt_version: String,
}

pub struct Store {
    pub pool: PgPool,
    pub pipeline: String,
    pub owner: String,
    pub lease: Duration,
    pub max_attempts: i32,
}

type StateRow =
    (String, i32, Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, Option<f64>);

impl Store {
    /// Takes the lease and counts the attempt *before* the call, so a record that crashes
    /// its consumer cannot loop; or says why not.
    pub async fn acquire(&self, envelope: &Envelope) -> sqlx::Result<KeyState> {
        let key = &envelope.idempotency_key;
        for _ in 0..2 {
            let acquired: Option<(i32,)> = sqlx::query_as(
                "UPDATE enrich_state
                 SET state = 'enriching', attempts = attempts + 1, lease_owner = $3,
                     lease_until = now() + make_interval(secs => $4), updated_at = now()
                 WHERE pipeline = $1 AND idempotency_key = $2
                   AND state IN ('received', 'requested', 'enriching', 'retry_scheduled')
                   AND attempts < $5
                   AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $3)
                 RETURNING attempts",
            )
            .bind(&self.pipeline)
            .bind(key)
            .bind(&self.owner)
            .bind(self.lease.as_secs_f64())
            .bind(self.max_attempts)
            .fetch_optional(&self.pool)
            .await?;
            if let Some((attempt,)) = acquired {
                return Ok(KeyState::Acquired { attempt });
            }
            let row: Option<StateRow> = sqlx::query_as(
                "SELECT state, attempts, result::text, result_hash, model, prompt_version, lease_owner,
                        EXTRACT(EPOCH FROM (lease_until - now()))::float8
                 FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
            )
            .bind(&self.pipeline)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            let Some((state, attempts, json, hash, model, version, _owner, lease_left)) = row else {
                // A request for a key ingest never recorded (its row was removed): adopt it.
                self.adopt(envelope).await?;
                continue;
            };
            return Ok(match state.as_str() {
                "enriched" | "published" => KeyState::Enriched(StoredResult {
                    json: json.unwrap_or_default(),
                    result_hash: hash.unwrap_or_default(),
                    model: model.unwrap_or_default(),
                    prompt_version: version.unwrap_or_default(),
                }),
                "dead_lettered" => KeyState::DeadLettered,
                _ if attempts >= self.max_attempts => KeyState::AttemptsExhausted { attempts },
                _ => KeyState::Leased { remaining: Duration::from_secs_f64(lease_left.unwrap_or(0.0).max(0.05)) },
            });
        }
        Ok(KeyState::Leased { remaining: Duration::from_millis(100) })
    }

    async fn adopt(&self, envelope: &Envelope) -> sqlx::Result<()> {
        let src = envelope.source.clone().unwrap_or_default();
        sqlx::query(
            "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset, kafka_key)
             VALUES ($1, $2, 'requested', $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(&self.pipeline)
        .bind(&envelope.idempotency_key)
        .bind(&src.topic)
        .bind(src.partition)
        .bind(src.offset)
        .bind(&src.key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives the lease back without spending the attempt (the endpoint is down, or we
    /// are shutting down before the call).
    pub async fn release(&self, key: &str, refund_attempt: bool) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE enrich_state
             SET lease_owner = NULL, lease_until = NULL, updated_at = now(),
                 attempts = CASE WHEN $4 THEN GREATEST(attempts - 1, 0) ELSE attempts END
             WHERE pipeline = $1 AND idempotency_key = $2 AND lease_owner = $3 AND state = 'enriching'",
        )
        .bind(&self.pipeline)
        .bind(key)
        .bind(&self.owner)
        .bind(refund_attempt)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_dead_lettered(&self, key: &str) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE enrich_state SET state = 'dead_lettered', lease_owner = NULL, lease_until = NULL, updated_at = now()
             WHERE pipeline = $1 AND idempotency_key = $2 AND state NOT IN ('enriched', 'published')",
        )
        .bind(&self.pipeline)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends step outcomes (llm_call, validation) to the audit, in one statement.
    pub async fn record_steps(&self, key: &str, steps: &[Step]) -> sqlx::Result<()> {
        let cols = StepColumns::from(steps);
        sqlx::query(
            "INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens, error)
             SELECT $1, $2, 'enricher', s, a, st, d, m, i, o, e
             FROM UNNEST($3::text[], $4::int[], $5::text[], $6::float8[], $7::text[], $8::int[], $9::int[], $10::text[]) AS u(s, a, st, d, m, i, o, e)",
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores the result (unless another was stored first), its steps and the run row in
    /// one round trip; returns the stored result, so every copy emitted for a key is the same.
    pub async fn finish(
        &self,
        envelope: &Envelope,
        attempt: i32,
        result: &StoredResult,
        steps: &[Step],
        trace_id: &str,
    ) -> sqlx::Result<StoredResult> {
        let key = &envelope.idempotency_key;
        let src = envelope.source.clone().unwrap_or_default();
        let cols = StepColumns::from(steps);
        let (stored_now,): (i64,) = sqlx::query_as(
            "WITH stored AS (
               UPDATE enrich_state
               SET state = 'enriched', result = $3::jsonb, result_hash = $4, model = $5, prompt_version = $6,
                   lease_owner = NULL, lease_until = NULL, updated_at = now()
               WHERE pipeline = $1 AND idempotency_key = $2 AND state NOT IN ('enriched', 'published')
               RETURNING 1
             ), steps AS (
               INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens, error)
               SELECT $1, $2, 'enricher', s, a, st, d, m, i, o, e
               FROM UNNEST($7::text[], $8::int[], $9::text[], $10::float8[], $11::text[], $12::int[], $13::int[], $14::text[]) AS u(s, a, st, d, m, i, o, e)
             ), run AS (
               INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, source_topic, source_partition, source_offset, trace_id, worker)
               VALUES ($1, $2, 'enricher', $15, 'enriched', $16, $17, $18, $19, $20)
             )
             SELECT count(*) FROM stored",
        )
        .bind(&self.pipeline)
        .bind(key)
        .bind(&result.json)
        .bind(&result.result_hash)
        .bind(&result.model)
        .bind(&result.prompt_version)
        .bind(&cols.step)
        .bind(&cols.attempt)
        .bind(&cols.status)
        .bind(&cols.duration_ms)
        .bind(&cols.model)
        .bind(&cols.input_tokens)
        .bind(&cols.output_tokens)
        .bind(&cols.error)
        .bind(attempt)
        .bind(&src.topic)
        .bind(src.partition)
        .bind(src.offset)
        .bind(trace_id)
        .bind(&self.owner)
        .fetch_one(&self.pool)
        .await?;
        if stored_now == 1 {
            return Ok(result.clone());
        }
        let (json, hash, model, version): (Option<String>, Option<String>, Option<String>, Option<String>) =
            sqlx::query_as(
                "SELECT result::text, result_hash, model, prompt_version FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
            )
            .bind(&self.pipeline)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok(StoredResult {
            json: json.unwrap_or_default(),
            result_hash: hash.unwrap_or_default(),
            model: model.unwrap_or_default(),
            prompt_version: version.unwrap_or_default(),
        })
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
    pub error: Option<String>,
}

impl Step {
    pub fn llm_call(attempt: i32, took: Duration, model: &str) -> Self {
        Self {
            step: "llm_call",
            attempt,
            status: "ok",
            duration_ms: Some(took.as_secs_f64() * 1000.0),
            model: Some(model.to_string()),
            input_tokens: None,
            output_tokens: None,
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
            error: None,
        }
    }

    pub fn tokens(self, input: u32, output: u32) -> Self {
        Self { input_tokens: Some(input as i32), output_tokens: Some(output as i32), ..self }
    }

    pub fn failed(self, error: String) -> Self {
        Self { status: "failed", error: Some(error), ..self }
    }
}

/// Steps as columns, for UNNEST.
struct StepColumns<'a> {
    step: Vec<&'a str>,
    attempt: Vec<i32>,
    status: Vec<&'a str>,
    duration_ms: Vec<Option<f64>>,
    model: Vec<Option<&'a str>>,
    input_tokens: Vec<Option<i32>>,
    output_tokens: Vec<Option<i32>>,
    error: Vec<Option<&'a str>>,
}

impl<'a> From<&'a [Step]> for StepColumns<'a> {
    fn from(steps: &'a [Step]) -> Self {
        Self {
            step: steps.iter().map(|s| s.step).collect(),
            attempt: steps.iter().map(|s| s.attempt).collect(),
            status: steps.iter().map(|s| s.status).collect(),
            duration_ms: steps.iter().map(|s| s.duration_ms).collect(),
            model: steps.iter().map(|s| s.model.as_deref()).collect(),
            input_tokens: steps.iter().map(|s| s.input_tokens).collect(),
            output_tokens: steps.iter().map(|s| s.output_tokens).collect(),
            error: steps.iter().map(|s| s.error.as_deref()).collect(),
        }
    }
}
