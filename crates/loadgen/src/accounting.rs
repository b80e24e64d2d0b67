//! What became of the records of one workload, from the product's own audit in
//! PostgreSQL.

use sqlx::PgPool;

use crate::kafka_io::Produced;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Source records ingest has recorded.
    pub read: i64,
    pub forwarded: i64,
    pub duplicates: i64,
    pub dead_lettered_at_ingest: i64,
    /// Forwarded keys now published.
    pub published: i64,
    /// Forwarded keys dead-lettered by the enricher.
    pub dead_lettered_at_enricher: i64,
    /// Successful LLM calls recorded for the workload's keys.
    pub llm_calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl Accounting {
    /// Every record read, and every forwarded key finished.
    pub fn complete(&self, sent: usize) -> bool {
        self.read == sent as i64 && self.published + self.dead_lettered_at_enricher == self.forwarded
    }
}

pub async fn account(pool: &PgPool, pipeline: &str, topic: &str, produced: &[Produced]) -> sqlx::Result<Accounting> {
    let partitions: Vec<i32> = produced.iter().map(|p| p.partition).collect();
    let offsets: Vec<i64> = produced.iter().map(|p| p.offset).collect();
    let row: (i64, i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "WITH sent AS (SELECT * FROM UNNEST($3::int[], $4::bigint[]) AS s(p, o)),
         ing AS (
           SELECT r.idempotency_key, r.status FROM run_history r
           JOIN sent ON r.source_partition = sent.p AND r.source_offset = sent.o
           WHERE r.pipeline = $1 AND r.stage = 'ingest-dedup' AND r.source_topic = $2),
         keys AS (SELECT DISTINCT idempotency_key FROM ing WHERE status = 'forwarded'),
         calls AS (
           SELECT o.input_tokens, o.output_tokens FROM step_outcomes o JOIN keys USING (idempotency_key)
           WHERE o.pipeline = $1 AND o.step = 'llm_call' AND o.status = 'ok')
         SELECT
           (SELECT count(*) FROM ing),
           (SELECT count(*) FROM ing WHERE status = 'forwarded'),
           (SELECT count(*) FROM ing WHERE status = 'duplicate'),
           (SELECT count(*) FROM ing WHERE status = 'dead_lettered'),
           (SELECT count(*) FROM enrich_state s JOIN keys USING (idempotency_key) WHERE s.pipeline = $1 AND s.state = 'published'),
           (SELECT count(*) FROM enrich_state s JOIN keys USING (idempotency_key) WHERE s.pipeline = $1 AND s.state = 'dead_lettered'),
           (SELECT count(*) FROM calls),
           (SELECT COALESCE(sum(input_tokens), 0)::bigint FROM calls),
           (SELECT COALESCE(sum(output_tokens), 0)::bigint FROM calls)",
    )
    .bind(pipeline)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_one(pool)
    .await?;
    Ok(Accounting {
        read: row.0,
        forwarded: row.1,
        duplicates: row.2,
        dead_lettered_at_ingest: row.3,
        published: row.4,
        dead_lettered_at_enricher: row.5,
        llm_calls: row.6,
        input_tokens: row.7,
        output_tokens: row.8,
    })
}
