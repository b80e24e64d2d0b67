//! The dlq-replayer's transition.

use sqlx::PgExecutor;

/// A key a replay reset: what [`undo_reset`] needs to put it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    /// The attempts the key had spent when it was dead-lettered.
    pub attempts: i32,
    /// Whether the key had a stored result (reset to `enriched`, not `requested`).
    pub stored: bool,
}

/// `dead_lettered` → `requested`, with a fresh attempt budget, no lease and no binding
/// to a results record (the publisher binds the key to its new result); or, for a key
/// whose result is stored (dead-lettered after it was enriched: a result or an output
/// too large, an output that cannot be built), `dead_lettered` → `enriched`, unbound: the
/// enricher re-emits the stored result for the replayed request and the publisher
/// publishes it, with no second paid call. `None` when the key is not dead-lettered (a
/// replay raced with another, or the dead letter is a malformed source record with no
/// key state).
pub async fn reset<'e>(db: impl PgExecutor<'e>, pipeline: &str, key: &str) -> sqlx::Result<Option<Reset>> {
    let before: Option<(i32, bool)> = sqlx::query_as(
        "WITH before AS (
             SELECT attempts FROM enrich_state
             WHERE pipeline = $1 AND idempotency_key = $2 AND state = 'dead_lettered' FOR UPDATE)
         UPDATE enrich_state s SET state = CASE WHEN result IS NULL THEN 'requested' ELSE 'enriched' END,
                                 attempts = CASE WHEN result IS NULL THEN 0 ELSE s.attempts END,
                                 lease_owner = NULL, lease_until = NULL,
                                 publish_partition = NULL, publish_offset = NULL, publish_outcome = NULL,
                                 publish_trace = NULL, updated_at = now()
         FROM before
         WHERE s.pipeline = $1 AND s.idempotency_key = $2 AND s.state = 'dead_lettered'
         RETURNING before.attempts, s.result IS NOT NULL",
    )
    .bind(pipeline)
    .bind(key)
    .fetch_optional(db)
    .await?;
    Ok(before.map(|(attempts, stored)| Reset { attempts, stored }))
}

/// A replay whose request could not be produced: `requested` → `dead_lettered` again,
/// with the attempts it had, so the key is not left waiting for a request that never
/// came while its dead letter is still listed. Only while the key is as the reset left
/// it (no attempt taken, under the row's lock): a request the producer reported failed
/// but the broker kept, already taken by the enricher, is left alone. A key reset to its
/// stored result (`enriched`) is left as it is: nothing in its row tells whether the
/// enricher already re-emitted that result for the request (and, under `strict-key`,
/// released the records parked behind it); replayed again, it is published. Returns
/// whether the key was put back.
pub async fn undo_reset<'e>(db: impl PgExecutor<'e>, pipeline: &str, key: &str, reset: Reset) -> sqlx::Result<bool> {
    if reset.stored {
        return Ok(false);
    }
    let done = sqlx::query(
        "UPDATE enrich_state SET state = 'dead_lettered', attempts = $3, updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = $2 AND state = 'requested' AND attempts = 0
           AND lease_owner IS NULL AND publish_partition IS NULL",
    )
    .bind(pipeline)
    .bind(key)
    .bind(reset.attempts)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
