//! The enricher's transitions, made under a lease: a replica takes a key's lease and
//! counts an attempt before its LLM call; the lease's owner and that attempt are the
//! fencing token of every later write on its behalf.

use sqlx::{PgExecutor, PgPool};
use std::collections::HashSet;
use std::time::Duration;

use crate::TraceContext;
use crate::envelope::Envelope;

/// Who writes: this replica, in this pipeline, with leases this long.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub pipeline: &'a str,
    pub owner: &'a str,
    pub lease: Duration,
}

/// A lease held on `key` for attempt `attempt`.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    pub key: &'a str,
    pub attempt: i32,
}

/// `received`, `requested`, `enriching`, `retry_scheduled` → `enriching`, with the
/// attempt counted and the lease taken, for each key whose attempts are not used up and
/// whose lease nobody holds; a lease still set (expired, or ours from an earlier
/// incarnation) means the previous attempt died with its process, and such a key is
/// taken only when its caller runs it alone (`isolated`). Returns the keys taken and the
/// attempt each counted.
pub async fn acquire(
    pool: &PgPool,
    who: Owner<'_>,
    max_attempts: i32,
    keys: &[&str],
    isolated: &[bool],
) -> sqlx::Result<Vec<(String, i32)>> {
    sqlx::query_as(
        "UPDATE enrich_state s
         SET state = 'enriching', attempts = s.attempts + 1, lease_owner = $3,
             lease_until = now() + make_interval(secs => $4), updated_at = now()
         FROM (SELECT k, bool_or(iso) AS iso FROM UNNEST($2::text[], $6::bool[]) AS u(k, iso) GROUP BY k) AS u
         WHERE s.pipeline = $1 AND s.idempotency_key = u.k
           AND s.state IN ('received', 'requested', 'enriching', 'retry_scheduled')
           AND s.attempts < $5
           AND (s.lease_owner IS NULL OR u.iso)
           AND (s.lease_until IS NULL OR s.lease_until < now() OR s.lease_owner = $3)
         RETURNING s.idempotency_key, s.attempts",
    )
    .bind(who.pipeline)
    .bind(keys)
    .bind(who.owner)
    .bind(who.lease.as_secs_f64())
    .bind(max_attempts)
    .bind(isolated)
    .fetch_all(pool)
    .await
}

/// A request for a key ingest never recorded (its row was removed): (none) →
/// `requested`, so it can be acquired.
pub struct Orphan<'a> {
    pub key: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub kafka_key: Option<&'a [u8]>,
}

/// Adopts orphans (a row that exists meanwhile is left alone).
pub async fn adopt(pool: &PgPool, pipeline: &str, orphans: &[Orphan<'_>]) -> sqlx::Result<()> {
    let keys: Vec<&str> = orphans.iter().map(|r| r.key).collect();
    let topics: Vec<&str> = orphans.iter().map(|r| r.topic).collect();
    let partitions: Vec<i32> = orphans.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = orphans.iter().map(|r| r.offset).collect();
    let kafka_keys: Vec<Option<&[u8]>> = orphans.iter().map(|r| r.kafka_key).collect();
    sqlx::query(
        "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset, kafka_key)
         SELECT $1, k, 'requested', t, p, o, kk FROM UNNEST($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[]) AS u(k, t, p, o, kk)
         ON CONFLICT DO NOTHING",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&kafka_keys)
    .execute(pool)
    .await?;
    Ok(())
}

/// Renews the leases `held` (key, attempt) in one statement, while their records wait or
/// call (`enriching`) or write their dead letter (`dead_lettered`). A lease no longer
/// ours (another replica took the key after it expired, or the key moved on) is left
/// alone: the call's gate finds it lost. One that expired but nobody took is still ours:
/// taking a key over and dead-lettering it both change the row under its lock. Returns
/// how many were renewed.
pub async fn renew(pool: &PgPool, who: Owner<'_>, keys: &[String], attempts: &[i32]) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE enrich_state s SET lease_until = now() + make_interval(secs => $5)
         FROM UNNEST($2::text[], $3::int[]) AS u(k, a)
         WHERE s.pipeline = $1 AND s.idempotency_key = u.k AND s.attempts = u.a
           AND s.lease_owner = $4 AND s.state IN ('enriching', 'dead_lettered')",
    )
    .bind(who.pipeline)
    .bind(keys)
    .bind(attempts)
    .bind(who.owner)
    .bind(who.lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Right before LLM calls: which of `tokens` are still ours (`enriching`, this owner,
/// this attempt), each extended to `lease` when less than `call` is left (a live lease of
/// ours cannot be taken meanwhile); and whether the operator's pause is on (then nothing
/// is extended). Returns (paused, keys still ours).
pub async fn gate(
    pool: &PgPool,
    who: Owner<'_>,
    call: Duration,
    keys: &[&str],
    attempts: &[i32],
) -> sqlx::Result<(bool, HashSet<String>)> {
    let (paused, ours): (bool, Vec<String>) = sqlx::query_as(
        "WITH p AS (
           SELECT coalesce((SELECT paused FROM controls WHERE pipeline = $1), false) AS paused
         ), mine AS (
           SELECT s.idempotency_key AS k, s.attempts AS a,
                  s.lease_until < now() + make_interval(secs => $5) AS short
           FROM enrich_state s JOIN UNNEST($2::text[], $3::int[]) AS u(k, a)
             ON s.idempotency_key = u.k AND s.attempts = u.a
           WHERE s.pipeline = $1 AND s.lease_owner = $4 AND s.state = 'enriching'
         ), renewed AS (
           UPDATE enrich_state s SET lease_until = now() + make_interval(secs => $6)
           FROM mine
           WHERE s.pipeline = $1 AND s.idempotency_key = mine.k AND mine.short AND s.attempts = mine.a
             AND s.lease_owner = $4 AND s.state = 'enriching'
             AND NOT (SELECT paused FROM p)
           RETURNING s.idempotency_key
         )
         SELECT (SELECT paused FROM p),
                ARRAY(SELECT k FROM mine WHERE NOT short UNION ALL SELECT idempotency_key FROM renewed)",
    )
    .bind(who.pipeline)
    .bind(keys)
    .bind(attempts)
    .bind(who.owner)
    .bind(call.as_secs_f64())
    .bind(who.lease.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok((paused, ours.into_iter().collect()))
}

/// A result to store, with where its request came from (for the audit row).
pub struct Finished<'a> {
    pub key: &'a str,
    pub attempt: i32,
    pub json: &'a str,
    pub result_hash: &'a str,
    pub model: &'a str,
    pub prompt_version: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub trace_id: &'a str,
}

/// Step outcomes as columns (one entry per step), written with the result.
#[derive(Default)]
pub struct StepRows<'a> {
    pub key: Vec<&'a str>,
    pub step: Vec<&'a str>,
    pub attempt: Vec<i32>,
    pub status: Vec<&'a str>,
    pub duration_ms: Vec<Option<f64>>,
    pub model: Vec<Option<&'a str>>,
    pub input_tokens: Vec<Option<i32>>,
    pub output_tokens: Vec<Option<i32>>,
    pub cost_usd: Vec<Option<f64>>,
    pub error: Vec<Option<&'a str>>,
}

/// Not ended → `enriched`, the result stored, with its steps and run rows, in one
/// statement. Not fenced by the lease, on purpose: an answer that was paid for is kept
/// even when its lease expired during the call, and the first result stored is the
/// key's (an ended key is never overwritten; the caller re-reads it). Returns the keys
/// whose result was stored.
pub async fn finish(
    pool: &PgPool,
    pipeline: &str,
    worker: &str,
    results: &[Finished<'_>],
    steps: &StepRows<'_>,
) -> sqlx::Result<HashSet<String>> {
    let jsons: Vec<&str> = results.iter().map(|r| r.json).collect();
    let hashes: Vec<&str> = results.iter().map(|r| r.result_hash).collect();
    let models: Vec<&str> = results.iter().map(|r| r.model).collect();
    let versions: Vec<&str> = results.iter().map(|r| r.prompt_version).collect();
    let topics: Vec<&str> = results.iter().map(|r| r.topic).collect();
    let traces: Vec<&str> = results.iter().map(|r| r.trace_id).collect();
    let keys: Vec<&str> = results.iter().map(|r| r.key).collect();
    let attempts: Vec<i32> = results.iter().map(|r| r.attempt).collect();
    let partitions: Vec<i32> = results.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = results.iter().map(|r| r.offset).collect();
    let stored: Vec<(String,)> = sqlx::query_as(
        "WITH input AS (
           SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS i(k, result, hash, model, version)
         ), stored AS (
           UPDATE enrich_state s
           SET state = 'enriched', result = i.result::jsonb, result_hash = i.hash, model = i.model,
               prompt_version = i.version, lease_owner = NULL, lease_until = NULL, updated_at = now()
           FROM input i
           WHERE s.pipeline = $1 AND s.idempotency_key = i.k
             AND s.state NOT IN ('enriched', 'published', 'dead_lettered')
           RETURNING s.idempotency_key
         ), steps AS (
           INSERT INTO step_outcomes (pipeline, idempotency_key, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens, error, cost_usd)
           SELECT $1, k, 'enricher', s, a, st, d, m, it, ot, e, c
           FROM UNNEST($7::text[], $8::text[], $9::int[], $10::text[], $11::float8[], $12::text[], $13::int[], $14::int[], $15::text[], $22::float8[])
                AS u(k, s, a, st, d, m, it, ot, e, c)
         ), runs AS (
           INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, source_topic, source_partition, source_offset, trace_id, worker)
           SELECT $1, k, 'enricher', a, 'enriched', t, p, o, tr, $16
           FROM UNNEST($2::text[], $17::int[], $18::text[], $19::int[], $20::bigint[], $21::text[]) AS r(k, a, t, p, o, tr)
         )
         SELECT idempotency_key FROM stored",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&jsons)
    .bind(&hashes)
    .bind(&models)
    .bind(&versions)
    .bind(&steps.key)
    .bind(&steps.step)
    .bind(&steps.attempt)
    .bind(&steps.status)
    .bind(&steps.duration_ms)
    .bind(&steps.model)
    .bind(&steps.input_tokens)
    .bind(&steps.output_tokens)
    .bind(&steps.error)
    .bind(worker)
    .bind(&attempts)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&traces)
    .bind(&steps.cost_usd)
    .fetch_all(pool)
    .await?;
    Ok(stored.into_iter().map(|(k,)| k).collect())
}

/// Gives the lease back, `enriching` kept; the attempt too when `refund` (no call of it
/// was paid). Fenced: false when the lease is no longer ours.
pub async fn release(pool: &PgPool, who: Owner<'_>, token: Token<'_>, refund: bool) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE enrich_state
         SET lease_owner = NULL, lease_until = NULL, updated_at = now(),
             attempts = CASE WHEN $5 THEN GREATEST(attempts - 1, 0) ELSE attempts END
         WHERE pipeline = $1 AND idempotency_key = $2 AND lease_owner = $3 AND attempts = $4 AND state = 'enriching'",
    )
    .bind(who.pipeline)
    .bind(token.key)
    .bind(who.owner)
    .bind(token.attempt)
    .bind(refund)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `enriching` → `retry_scheduled`, the lease given back and the attempt spent: the
/// record is on the retry topic. Fenced: false (nothing changed) when the lease is no
/// longer ours; another replica's live attempt keeps its lease.
pub async fn schedule_retry(pool: &PgPool, who: Owner<'_>, token: Token<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE enrich_state SET state = 'retry_scheduled', lease_owner = NULL, lease_until = NULL, updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND lease_owner = $3 AND attempts = $4 AND state = 'enriching'",
    )
    .bind(who.pipeline)
    .bind(token.key)
    .bind(who.owner)
    .bind(token.attempt)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Not ended → `dead_lettered`, with `dead` recorded as the key's pending dead letter,
/// in one transaction; the lease (ours, or taken when nobody holds a live one) is kept
/// until the dead letter is listed ([`dead_letter_listed`]). None (nothing written) when
/// the key ended otherwise meanwhile, or another replica holds a live lease on it (its
/// attempt decides). Returns the dead letter's id and the row's attempt count, which the
/// lease's renewals must name (a claim that took over another replica's expired lease
/// keeps that replica's count).
pub async fn claim_dead_letter(
    pool: &PgPool,
    who: Owner<'_>,
    dead: &Envelope,
    trace: &TraceContext,
) -> sqlx::Result<Option<(i64, i32)>> {
    claim(pool, who, dead, trace, "state NOT IN ('enriched', 'published', 'dead_lettered')").await
}

/// `enriched` → `dead_lettered`, as [`claim_dead_letter`]: the key's stored result can
/// never be written to the results topic (the producer refuses it as too large), so it
/// would otherwise be emitted again on every delivery. The result stays stored. A key the
/// publisher has bound to a results record (an earlier copy that fitted) is left alone:
/// that copy publishes it (None).
pub async fn claim_stored_dead_letter(
    pool: &PgPool,
    who: Owner<'_>,
    dead: &Envelope,
    trace: &TraceContext,
) -> sqlx::Result<Option<(i64, i32)>> {
    claim(pool, who, dead, trace, "state = 'enriched' AND publish_offset IS NULL").await
}

async fn claim(
    pool: &PgPool,
    who: Owner<'_>,
    dead: &Envelope,
    trace: &TraceContext,
    from: &'static str,
) -> sqlx::Result<Option<(i64, i32)>> {
    let mut tx = pool.begin().await?;
    let claimed: Option<(i32,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE enrich_state SET state = 'dead_lettered', lease_owner = $3,
                lease_until = now() + make_interval(secs => $4), updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND {from}
           AND (lease_owner IS NULL OR lease_owner = $3 OR lease_until IS NULL OR lease_until <= now())
         RETURNING attempts"
    )))
    .bind(who.pipeline)
    .bind(&dead.idempotency_key)
    .bind(who.owner)
    .bind(who.lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((attempts,)) = claimed else {
        tx.rollback().await?;
        return Ok(None);
    };
    let id = crate::dead_letter_store::insert_pending_one(&mut *tx, dead, trace).await?;
    tx.commit().await?;
    Ok(Some((id, attempts)))
}

/// A `dead_lettered` key whose dead letter is still pending (a handling failed before
/// listing it): its lease (expired, or ours) is taken so one replica writes it. False
/// when another replica's lease is live.
pub async fn take_dead_lettered<'e>(db: impl PgExecutor<'e>, who: Owner<'_>, key: &str) -> sqlx::Result<bool> {
    let taken = sqlx::query(
        "UPDATE enrich_state SET lease_owner = $3, lease_until = now() + make_interval(secs => $4), updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND state = 'dead_lettered'
           AND (lease_owner IS NULL OR lease_owner = $3 OR lease_until IS NULL OR lease_until <= now())",
    )
    .bind(who.pipeline)
    .bind(key)
    .bind(who.owner)
    .bind(who.lease.as_secs_f64())
    .execute(db)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// The key's dead letter is listed: its lease goes (`dead_lettered` kept).
pub async fn dead_letter_listed<'e>(db: impl PgExecutor<'e>, who: Owner<'_>, key: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE enrich_state SET lease_owner = NULL, lease_until = NULL, updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND state = 'dead_lettered' AND lease_owner = $3",
    )
    .bind(who.pipeline)
    .bind(key)
    .bind(who.owner)
    .execute(db)
    .await?;
    Ok(())
}
