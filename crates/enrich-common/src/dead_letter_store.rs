//! Dead letters recorded in PostgreSQL beside the DLQ topic, for the dlq-replayer.

use sqlx::{PgExecutor, PgPool};

use crate::TraceContext;
use crate::envelope::Envelope;

/// Records dead letters (envelopes carrying their failure), in one statement. A
/// malformed source record redelivered to ingest is recorded once.
/// `trace` is the context of the span that produced the DLQ record.
pub async fn record(pool: &PgPool, dead: &[(&Envelope, &TraceContext)]) -> sqlx::Result<()> {
    let rows: Vec<_> = dead.iter().map(|(e, t)| (*e, *t, None)).collect();
    insert(pool, &rows, "dead").await
}

/// Records the publisher's dead letters as `pending` before the Kafka transaction that
/// writes their DLQ records, each with the coordinates (partition, offset) of the results
/// record it comes from; they turn `dead` once that transaction has committed. A record
/// read again after an aborted transaction is recorded once.
pub async fn record_pending<'e>(
    db: impl PgExecutor<'e>,
    dead: &[(&Envelope, &TraceContext, (i32, i64))],
) -> sqlx::Result<()> {
    let rows: Vec<_> = dead.iter().map(|(e, t, at)| (*e, *t, Some(*at))).collect();
    insert(db, &rows, "pending").await
}

/// Drops the publisher's pending dead letters at these results records (partition,
/// offset): left by an earlier round of the same records whose Kafka transaction aborted,
/// they are void; the round binding them again records its own. (A round that committed
/// moved the offsets past its records, which are never bound again.)
pub async fn drop_pending_at<'e>(db: impl PgExecutor<'e>, pipeline: &str, at: &[(i32, i64)]) -> sqlx::Result<()> {
    if at.is_empty() {
        return Ok(());
    }
    let (partitions, offsets): (Vec<i32>, Vec<i64>) = at.iter().copied().unzip();
    sqlx::query(
        "DELETE FROM dead_letters d USING UNNEST($2::int[], $3::bigint[]) AS r(p, o)
          WHERE d.pipeline = $1 AND d.status = 'pending' AND d.publish_partition = r.p AND d.publish_offset = r.o",
    )
    .bind(pipeline)
    .bind(&partitions)
    .bind(&offsets)
    .execute(db)
    .await?;
    Ok(())
}

/// Records one dead letter as `pending` before its DLQ record is written (the enricher
/// does, in the transaction that marks the key `dead_lettered`): a record handled again
/// after a failure finds it and writes its DLQ record, instead of making a second dead
/// letter. Returns its id.
pub async fn insert_pending_one<'e>(
    db: impl PgExecutor<'e>,
    dead: &Envelope,
    trace: &TraceContext,
) -> sqlx::Result<i64> {
    let failure = dead.failure().cloned().unwrap_or_default();
    let src = dead.source.clone().unwrap_or_default();
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO dead_letters (pipeline, idempotency_key, stage, reason_class, reason, error, attempts,
                                   source_topic, source_partition, source_offset, trace_id, envelope, traceparent, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'pending')
         RETURNING id",
    )
    .bind(&dead.pipeline)
    .bind(&dead.idempotency_key)
    .bind(&failure.stage)
    .bind(&failure.reason_class)
    .bind(&failure.reason)
    .bind(&failure.message)
    .bind(dead.attempt as i32)
    .bind(&src.topic)
    .bind(src.partition)
    .bind(src.offset)
    .bind(trace.trace_id_hex())
    .bind(dead.encode_to_bytes())
    .bind(trace.traceparent())
    .fetch_one(db)
    .await?;
    Ok(id)
}

/// A pending dead letter of `stage` for `key`, not yet in the DLQ topic as far as the
/// database knows: its id, its DLQ record's value and the traceparent of its span.
pub async fn pending_of(
    pool: &PgPool,
    pipeline: &str,
    key: &str,
    stage: &str,
) -> sqlx::Result<Option<(i64, Vec<u8>, Option<String>)>> {
    sqlx::query_as(
        "SELECT id, envelope, traceparent FROM dead_letters
          WHERE pipeline = $1 AND idempotency_key = $2 AND stage = $3 AND status = 'pending'
            AND publish_partition IS NULL
          ORDER BY id LIMIT 1",
    )
    .bind(pipeline)
    .bind(key)
    .bind(stage)
    .fetch_optional(pool)
    .await
}

/// The DLQ record of pending dead letter `id` is written: it is listed (`dead`), unless
/// its key has one listed already (then it is dropped; its DLQ record stays).
/// Idempotent.
///
/// The key's listed dead letter is read `FOR SHARE`: a replay holds the one it replays
/// locked until it marks it replayed, and the key can be dead-lettered again before that
/// (the replayed request failing at once). Read without the lock, the replay's dead
/// letter still looks listed, this one is dropped, and the key is left dead-lettered with
/// nothing listed; with it, this waits for the replay's mark and is listed.
pub async fn list_pending(pool: &PgPool, id: i64) -> sqlx::Result<()> {
    sqlx::query(
        "WITH listed AS (
             UPDATE dead_letters d SET status = 'dead', updated_at = now()
              WHERE d.id = $1 AND d.status = 'pending'
                AND NOT EXISTS (SELECT 1 FROM dead_letters w
                                 WHERE w.pipeline = d.pipeline AND w.idempotency_key = d.idempotency_key
                                   AND w.status = 'dead' AND w.stage <> 'ingest-dedup'
                                   FOR SHARE)
             RETURNING 1)
         DELETE FROM dead_letters d WHERE d.id = $1 AND d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM listed)",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// A dead letter, the span context that wrote it, and (for the publisher's) the results
/// record it comes from.
type Row<'a> = (&'a Envelope, &'a TraceContext, Option<(i32, i64)>);

async fn insert<'e>(db: impl PgExecutor<'e>, dead: &[Row<'_>], status: &str) -> sqlx::Result<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let mut pipeline = Vec::new();
    let mut key = Vec::new();
    let mut stage = Vec::new();
    let mut class = Vec::new();
    let mut reason = Vec::new();
    let mut error = Vec::new();
    let mut attempts = Vec::new();
    let mut topic = Vec::new();
    let mut partition = Vec::new();
    let mut offset = Vec::new();
    let mut trace = Vec::new();
    let mut traceparent = Vec::new();
    let mut bytes = Vec::new();
    let mut publish_partition = Vec::new();
    let mut publish_offset = Vec::new();
    for (envelope, context, at) in dead {
        let failure = envelope.failure().cloned().unwrap_or_default();
        let src = envelope.source.clone().unwrap_or_default();
        pipeline.push(envelope.pipeline.clone());
        key.push(envelope.idempotency_key.clone());
        stage.push(failure.stage);
        class.push(failure.reason_class);
        reason.push(failure.reason);
        error.push(failure.message);
        attempts.push(envelope.attempt as i32);
        topic.push(src.topic);
        partition.push(src.partition);
        offset.push(src.offset);
        trace.push(context.trace_id_hex());
        traceparent.push(context.traceparent());
        bytes.push(envelope.encode_to_bytes());
        publish_partition.push(at.map(|(p, _)| p));
        publish_offset.push(at.map(|(_, o)| o));
    }
    sqlx::query(
        "INSERT INTO dead_letters (pipeline, idempotency_key, stage, reason_class, reason, error, attempts,
                                   source_topic, source_partition, source_offset, trace_id, envelope, traceparent,
                                   publish_partition, publish_offset, status)
         SELECT u.*, $16 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[],
                              $8::text[], $9::int[], $10::bigint[], $11::text[], $12::bytea[], $13::text[],
                              $14::int[], $15::bigint[]) AS u
         ON CONFLICT DO NOTHING",
    )
    .bind(&pipeline)
    .bind(&key)
    .bind(&stage)
    .bind(&class)
    .bind(&reason)
    .bind(&error)
    .bind(&attempts)
    .bind(&topic)
    .bind(&partition)
    .bind(&offset)
    .bind(&trace)
    .bind(&bytes)
    .bind(&traceparent)
    .bind(&publish_partition)
    .bind(&publish_offset)
    .bind(status)
    .execute(db)
    .await?;
    Ok(())
}
