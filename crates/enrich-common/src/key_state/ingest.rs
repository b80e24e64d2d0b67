//! Ingest's transitions: a key's first sighting, and its forwarding.

use sqlx::PgExecutor;

/// A source record as ingest claims its key.
pub struct Arrival<'a> {
    pub key: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub kafka_key: Option<&'a [u8]>,
    /// The span that read it, for the stages after.
    pub traceparent: &'a str,
}

/// (none) → `received`, for each key never seen before; a key already known keeps its
/// row (its first record owns it). When one batch holds a key twice, the earlier record
/// wins.
pub async fn receive<'e>(db: impl PgExecutor<'e>, pipeline: &str, arrivals: &[Arrival<'_>]) -> sqlx::Result<()> {
    let keys: Vec<&str> = arrivals.iter().map(|a| a.key).collect();
    let topics: Vec<&str> = arrivals.iter().map(|a| a.topic).collect();
    let partitions: Vec<i32> = arrivals.iter().map(|a| a.partition).collect();
    let offsets: Vec<i64> = arrivals.iter().map(|a| a.offset).collect();
    let kafka_keys: Vec<Option<&[u8]>> = arrivals.iter().map(|a| a.kafka_key).collect();
    let traceparents: Vec<&str> = arrivals.iter().map(|a| a.traceparent).collect();
    sqlx::query(
        "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset, kafka_key, traceparent)
         SELECT $1, k, 'received', t, p, o, kk, tp
         FROM UNNEST($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[], $7::text[]) WITH ORDINALITY AS u(k, t, p, o, kk, tp, ord)
         ORDER BY ord
         ON CONFLICT (pipeline, idempotency_key) DO NOTHING",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&kafka_keys)
    .bind(&traceparents)
    .execute(db)
    .await?;
    Ok(())
}

/// `received` → `requested`: the keys' requests are on `enrich.requests`.
///
/// A row another session has locked is skipped, not waited for: the only writers of a
/// `received` row are the enricher taking its lease (it moves the key past `requested`
/// from `received` directly) and a dead-lettering claim, both of which end the
/// `received` state; if their statement fails, the enricher tries its own again (its
/// offset is not committed), so the mark adds nothing there. Waiting made every ingest
/// batch queue behind the enricher's lease statements on the same keys, which had the
/// requests already (148 ms per batch at 300 records/s, measured by `make bench`).
pub async fn mark_requested<'e>(db: impl PgExecutor<'e>, pipeline: &str, keys: &[String]) -> sqlx::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE enrich_state s SET state = 'requested', updated_at = now()
          WHERE s.pipeline = $1 AND s.idempotency_key IN (
                SELECT idempotency_key FROM enrich_state
                 WHERE pipeline = $1 AND idempotency_key = ANY($2) AND state = 'received'
                 FOR UPDATE SKIP LOCKED)
            AND s.state = 'received'",
    )
    .bind(pipeline)
    .bind(keys)
    .execute(db)
    .await?;
    Ok(())
}
