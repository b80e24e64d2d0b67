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

    /// Stores the result unless another one was stored first; returns the stored one
    /// (so every copy emitted for a key is the same).
    pub async fn store_result(&self, key: &str, result: &StoredResult) -> sqlx::Result<StoredResult> {
        let updated = sqlx::query(
            "UPDATE enrich_state
             SET state = 'enriched', result = $3::jsonb, result_hash = $4, model = $5, prompt_version = $6,
                 lease_owner = NULL, lease_until = NULL, updated_at = now()
             WHERE pipeline = $1 AND idempotency_key = $2 AND state NOT IN ('enriched', 'published')",
        )
        .bind(&self.pipeline)
        .bind(key)
        .bind(&result.json)
        .bind(&result.result_hash)
        .bind(&result.model)
        .bind(&result.prompt_version)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            return Ok(result.clone());
        }
        let (json, hash, model, version): (Option<String>, Option<String>, Option<String>, Option<String>) = sqlx::query_as(
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

    /// Appends one step outcome (llm_call, validation) to the audit.
    pub async fn record_step(&self, key: &str, step: &Step<'_>) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens, error)
             VALUES ($1, $2, 'enricher', $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&self.pipeline)
        .bind(key)
        .bind(step.step)
        .bind(step.attempt)
        .bind(step.status)
        .bind(step.duration_ms)
        .bind(step.model)
        .bind(step.input_tokens)
        .bind(step.output_tokens)
        .bind(step.error)
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
            "INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, source_topic, source_partition, source_offset, trace_id, detail)
             VALUES ($1, $2, 'enricher', $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// One step's outcome.
pub struct Step<'a> {
    pub step: &'a str,
    pub attempt: i32,
    pub status: &'a str,
    pub duration_ms: Option<f64>,
    pub model: Option<&'a str>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    pub error: Option<&'a str>,
}
