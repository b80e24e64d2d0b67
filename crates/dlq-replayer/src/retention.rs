//! Audit retention: run-history and step-outcome rows older than
//! `audit.retention_days` are deleted by a scheduled job, in batches (a short
//! transaction each, so the tables stay writable while it runs).

use sqlx::PgPool;
use std::time::Duration;

use enrich_common::shutdown::Shutdown;

/// Rows deleted in one statement.
const BATCH: i64 = 5_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub runs: u64,
    pub steps: u64,
}

/// Deletes this pipeline's audit rows recorded before `now - older_than`.
pub async fn purge(pool: &PgPool, pipeline: &str, older_than: Duration) -> sqlx::Result<Purged> {
    let mut purged = Purged::default();
    for (table, count) in [("run_history", &mut purged.runs), ("step_outcomes", &mut purged.steps)] {
        loop {
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE id IN (
                   SELECT id FROM {table}
                   WHERE pipeline = $1 AND recorded_at < now() - make_interval(secs => $2)
                   LIMIT $3)"
            )))
            .bind(pipeline)
            .bind(older_than.as_secs_f64())
            .bind(BATCH)
            .execute(pool)
            .await?;
            *count += done.rows_affected();
            if done.rows_affected() < BATCH as u64 {
                break;
            }
        }
    }
    Ok(purged)
}

/// Runs `purge` every `every` until shutdown (retention 0: never).
pub fn spawn(pool: PgPool, pipeline: String, retention_days: u32, every: Duration, shutdown: Shutdown) {
    if retention_days == 0 {
        tracing::info!("audit.retention_days = 0: audit rows are kept forever");
        return;
    }
    let older_than = Duration::from_secs(u64::from(retention_days) * 86_400);
    tokio::spawn(async move {
        loop {
            match purge(&pool, &pipeline, older_than).await {
                Ok(p) if p.runs + p.steps > 0 => {
                    tracing::info!(runs = p.runs, steps = p.steps, retention_days, "old audit rows deleted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "audit retention failed; trying again next time"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
