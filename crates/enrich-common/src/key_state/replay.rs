//! The dlq-replayer's transition.

use sqlx::PgExecutor;

/// `dead_lettered` → `requested`, with a fresh attempt budget, no lease and no binding
/// to a results record (the publisher binds the key to its new result); or, for a key
/// whose result is stored (dead-lettered after it was enriched: a result or an output
/// too large, an output that cannot be built), `dead_lettered` → `enriched`, unbound: the
/// enricher re-emits the stored result for the replayed request and the publisher
/// publishes it, with no second paid call. False when the key is not dead-lettered (a
/// replay raced with another, or the dead letter is a malformed source record with no
/// key state).
pub async fn reset<'e>(db: impl PgExecutor<'e>, pipeline: &str, key: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE enrich_state SET state = CASE WHEN result IS NULL THEN 'requested' ELSE 'enriched' END,
                                 attempts = CASE WHEN result IS NULL THEN 0 ELSE attempts END,
                                 lease_owner = NULL, lease_until = NULL,
                                 publish_partition = NULL, publish_offset = NULL, publish_outcome = NULL,
                                 publish_trace = NULL, updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND state = 'dead_lettered'",
    )
    .bind(pipeline)
    .bind(key)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
