//! `ordering = "strict-key"` in PostgreSQL: which Kafka keys are blocked by a record that
//! waits for a delayed retry or sits in the DLQ, and the records parked behind it.
//!
//! Every change to a key's block happens in a transaction holding that block's row, so a
//! record being parked and the block being lifted never miss each other.

use enrich_common::envelope::Envelope;
use sqlx::PgPool;
use std::time::Duration;

/// Whether a record may run now.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockCheck {
    /// Its key is not blocked.
    Free,
    /// Its key is blocked by this very record (a delayed retry, a replay, a release).
    Own,
    /// Parked behind `blocker`.
    Parked { blocker: String },
}

/// A parked record to run next.
pub struct Parked {
    pub envelope: Envelope,
    pub traceparent: Option<String>,
}

/// A blocked key that needs the sweeper.
pub struct Stalled {
    pub kafka_key: Vec<u8>,
    pub blocker: String,
    /// The blocker is enriched or discarded: release the records behind it.
    pub resolved: bool,
}

pub struct Blocks {
    pub pool: PgPool,
    pub pipeline: String,
}

impl Blocks {
    /// Parks the record if an earlier record of its Kafka key blocks it.
    pub async fn check(&self, kafka_key: &[u8], envelope: &Envelope, traceparent: &str) -> anyhow::Result<BlockCheck> {
        let mut tx = self.pool.begin().await?;
        let blocker: Option<(String,)> =
            sqlx::query_as("SELECT blocker_key FROM key_blocks WHERE pipeline = $1 AND kafka_key = $2 FOR UPDATE")
                .bind(&self.pipeline)
                .bind(kafka_key)
                .fetch_optional(&mut *tx)
                .await?;
        let verdict = match blocker {
            None => BlockCheck::Free,
            Some((b,)) if b == envelope.idempotency_key => BlockCheck::Own,
            Some((blocker,)) => {
                sqlx::query(
                    "INSERT INTO parked (pipeline, kafka_key, idempotency_key, envelope, traceparent)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(&self.pipeline)
                .bind(kafka_key)
                .bind(&envelope.idempotency_key)
                .bind(envelope.encode_to_bytes())
                .bind(traceparent)
                .execute(&mut *tx)
                .await?;
                BlockCheck::Parked { blocker }
            }
        };
        tx.commit().await?;
        Ok(verdict)
    }

    /// The record goes to the retry topic or the DLQ: later records of its key wait for it.
    pub async fn block(&self, kafka_key: &[u8], idempotency_key: &str) -> anyhow::Result<()> {
        let blocker: (String,) = sqlx::query_as(
            "INSERT INTO key_blocks (pipeline, kafka_key, blocker_key) VALUES ($1, $2, $3)
             ON CONFLICT (pipeline, kafka_key) DO UPDATE SET updated_at = now()
             RETURNING blocker_key",
        )
        .bind(&self.pipeline)
        .bind(kafka_key)
        .bind(idempotency_key)
        .fetch_one(&self.pool)
        .await?;
        if blocker.0 != idempotency_key {
            tracing::warn!(idempotency_key, blocker = %blocker.0, "key already blocked by another record");
        }
        Ok(())
    }

    /// `blocker` is resolved: drop its parked copy and hand the key to the next parked
    /// record (returned, to run now), or lift the block when none is left. `None` also
    /// when the key is no longer blocked by `blocker` (someone else moved it on).
    pub async fn advance(&self, kafka_key: &[u8], blocker: &str) -> anyhow::Result<Option<Parked>> {
        let mut tx = self.pool.begin().await?;
        let current: Option<(String,)> =
            sqlx::query_as("SELECT blocker_key FROM key_blocks WHERE pipeline = $1 AND kafka_key = $2 FOR UPDATE")
                .bind(&self.pipeline)
                .bind(kafka_key)
                .fetch_optional(&mut *tx)
                .await?;
        if current.as_ref().map(|c| c.0.as_str()) != Some(blocker) {
            return Ok(None);
        }
        sqlx::query("DELETE FROM parked WHERE pipeline = $1 AND kafka_key = $2 AND idempotency_key = $3")
            .bind(&self.pipeline)
            .bind(kafka_key)
            .bind(blocker)
            .execute(&mut *tx)
            .await?;
        let next: Option<(String, Vec<u8>, Option<String>)> = sqlx::query_as(
            "SELECT idempotency_key, envelope, traceparent FROM parked
             WHERE pipeline = $1 AND kafka_key = $2 ORDER BY seq LIMIT 1",
        )
        .bind(&self.pipeline)
        .bind(kafka_key)
        .fetch_optional(&mut *tx)
        .await?;
        let released = match next {
            None => {
                sqlx::query("DELETE FROM key_blocks WHERE pipeline = $1 AND kafka_key = $2")
                    .bind(&self.pipeline)
                    .bind(kafka_key)
                    .execute(&mut *tx)
                    .await?;
                None
            }
            Some((key, bytes, traceparent)) => {
                sqlx::query(
                    "UPDATE key_blocks SET blocker_key = $3, updated_at = now() WHERE pipeline = $1 AND kafka_key = $2",
                )
                .bind(&self.pipeline)
                .bind(kafka_key)
                .bind(&key)
                .execute(&mut *tx)
                .await?;
                Some(Parked { envelope: Envelope::decode_from(&bytes)?, traceparent })
            }
        };
        tx.commit().await?;
        Ok(released)
    }

    /// Blocked keys that need a hand: the blocker was published or discarded (the release
    /// after it did not happen here, e.g. the discard came from the dlq-replayer), or a
    /// released record has been the blocker for longer than `stale` without finishing
    /// (its process died). Each is claimed for `stale` so replicas share the work. An
    /// `enriched` blocker is not enough: a replay puts a dead-lettered key whose result is
    /// stored back to `enriched` before its request is even produced, and released then,
    /// the records parked behind it would be published before it.
    pub async fn stalled(&self, stale: Duration) -> anyhow::Result<Vec<Stalled>> {
        let rows: Vec<(Vec<u8>, String, bool)> = sqlx::query_as(
            "WITH candidates AS (
               SELECT b.kafka_key, b.blocker_key,
                      (EXISTS (SELECT 1 FROM enrich_state s WHERE s.pipeline = b.pipeline AND s.idempotency_key = b.blocker_key
                                AND s.state = 'published')
                       OR (EXISTS (SELECT 1 FROM dead_letters d WHERE d.pipeline = b.pipeline AND d.idempotency_key = b.blocker_key
                                   AND d.status = 'discarded')
                           AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.pipeline = b.pipeline AND d.idempotency_key = b.blocker_key
                                   AND d.status = 'dead'))) AS resolved,
                      EXISTS (SELECT 1 FROM parked p WHERE p.pipeline = b.pipeline AND p.kafka_key = b.kafka_key
                              AND p.idempotency_key = b.blocker_key) AS released
               FROM key_blocks b
               WHERE b.pipeline = $1 AND b.updated_at < now() - make_interval(secs => 1)
               ORDER BY b.updated_at LIMIT 100
               FOR UPDATE OF b SKIP LOCKED
             )
             UPDATE key_blocks b SET updated_at = now()
             FROM candidates c
             WHERE b.pipeline = $1 AND b.kafka_key = c.kafka_key
               AND (c.resolved OR (c.released AND b.updated_at < now() - make_interval(secs => $2)))
             RETURNING b.kafka_key, b.blocker_key, c.resolved",
        )
        .bind(&self.pipeline)
        .bind(stale.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(kafka_key, blocker, resolved)| Stalled { kafka_key, blocker, resolved }).collect())
    }

    /// The parked copy of a released record (to run it again after its process died).
    pub async fn parked(&self, kafka_key: &[u8], idempotency_key: &str) -> anyhow::Result<Option<Parked>> {
        let row: Option<(Vec<u8>, Option<String>)> = sqlx::query_as(
            "SELECT envelope, traceparent FROM parked WHERE pipeline = $1 AND kafka_key = $2 AND idempotency_key = $3",
        )
        .bind(&self.pipeline)
        .bind(kafka_key)
        .bind(idempotency_key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(bytes, traceparent)| Ok(Parked { envelope: Envelope::decode_from(&bytes)?, traceparent })).transpose()
    }
}
