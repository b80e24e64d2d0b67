//! PostgreSQL: the pool and the embedded migrations (`migrations/`).

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::time::Duration;

use crate::config::DatabaseSettings;

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Connects (without logging every statement) and, when configured, migrates. The
/// sessions carry `application` as their `application_name`, so an operator (or a
/// test) can tell a stage's sessions apart in `pg_stat_activity`.
pub async fn connect(settings: &DatabaseSettings, application: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.url.expose())
        .map_err(|e| anyhow::anyhow!("database.url is not a valid PostgreSQL URL: {e}"))?
        .application_name(application)
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL (database.url): {e}"))?;
    if settings.migrate_on_start {
        migrate(&pool).await?;
    }
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.map_err(|e| anyhow::anyhow!("database migration failed: {e}"))
}

/// Whether a failed database call is worth trying again as it is: the database
/// unreachable, restarting, out of resources, or a conflict between transactions — not
/// a statement it refuses (bad input, a constraint), which fails the same way again.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<sqlx::Error>().is_some_and(sqlx_transient) || c.downcast_ref::<Transient>().is_some())
}

fn sqlx_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, transaction rollbacks (serialization, deadlock),
        // insufficient resources, operator intervention (shutdown, restart), system
        // errors, and a lock not available.
        sqlx::Error::Database(d) => {
            d.code().is_some_and(|c| ["08", "40", "53", "57", "58"].iter().any(|p| c.starts_with(p)) || c == "55P03")
        }
        _ => false,
    }
}

/// A failure `is_transient` counts as transient, carried as text (a batch writer's,
/// whose one statement answered many callers).
#[derive(Debug)]
pub struct Transient(pub String);

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Transient {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_transient_a_refused_statement_is_not() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(is_transient(&anyhow::Error::from(io).context("settle the budget")));
        assert!(is_transient(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        assert!(is_transient(&anyhow::Error::new(Transient("batch failed".into()))));
        assert!(!is_transient(&anyhow::Error::from(sqlx::Error::RowNotFound)));
        assert!(!is_transient(&anyhow::anyhow!("invalid byte sequence for encoding \"UTF8\": 0x00")));
    }
}
