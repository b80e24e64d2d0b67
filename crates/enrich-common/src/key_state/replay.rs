//! The dlq-replayer's transition.

use sqlx::PgExecutor;

/// `dead_lettered` → `requested`, with a fresh attempt budget, no lease and no binding
/// to a results record (the publisher binds the key to its new result). False when the
/// key is not dead-lettered (a replay raced with another, or the dead letter is a
/// malformed source record with no key state).
pub async fn reset<'e>(db: impl PgExecutor<'e>, pipeline: &str, key: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE enrich_state SET state = 'requested', attempts = 0, lease_owner = NULL, lease_until = NULL,
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
