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
