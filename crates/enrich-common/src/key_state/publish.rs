//! The publisher's transitions, in the order of a batch: bind each key to the results
//! record that will publish it (committed before the Kafka transaction), then settle
//! what the committed transaction carried (`enriched` → `published` or `dead_lettered`,
//! pending dead letters listed). `unsettled` finds what a publisher that stopped between
//! the two left behind, for it to settle from the group's committed offsets.

use sqlx::PgPool;

/// What a bound key becomes once the transaction carrying its record has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Published,
    DeadLettered,
}

impl Outcome {
    pub fn state(self) -> super::State {
        match self {
            Outcome::Published => super::State::Published,
            Outcome::DeadLettered => super::State::DeadLettered,
        }
    }
}

/// A key and the results record (partition, offset) that carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bound {
    pub key: String,
    pub partition: i32,
    pub offset: i64,
}

/// One key of the batch asking to be bound.
pub struct Claim<'a> {
    pub key: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub outcome: Outcome,
    pub trace_id: String,
    /// The epoch under which this publisher took the record's partition
    /// ([`take_partitions`]).
    pub epoch: i64,
}

/// Takes `partitions` of the results topic for `owner`, as it is assigned them and before
/// it reads from them: each one's epoch moves on. Returns the epochs, under which
/// [`bind`] binds the partitions' records; a publisher that took a partition earlier (a
/// zombie whose session expired while it was frozen) binds none of its records any more.
pub async fn take_partitions(
    pool: &PgPool,
    pipeline: &str,
    owner: &str,
    partitions: &[i32],
) -> sqlx::Result<std::collections::HashMap<i32, i64>> {
    let taken: Vec<(i32, i64)> = sqlx::query_as(
        "INSERT INTO publish_partitions (pipeline, partition, epoch, owner)
         SELECT $1, p, 1, $3 FROM UNNEST($2::int[]) AS p
         ON CONFLICT (pipeline, partition)
            DO UPDATE SET epoch = publish_partitions.epoch + 1, owner = EXCLUDED.owner, taken_at = now()
         RETURNING partition, epoch",
    )
    .bind(pipeline)
    .bind(partitions)
    .bind(owner)
    .fetch_all(pool)
    .await?;
    Ok(taken.into_iter().collect())
}

/// What a bound key publishes: the result the enricher stored for it (every copy it
/// emitted carries the same), never the one a results record carries (a stale or
/// forged record could carry any). `None`: the key has no stored result, and its
/// binding is a dead letter's.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub json: Option<serde_json::Value>,
    pub result_hash: Option<String>,
}

/// A row the binding returns: key, partition, offset, stored result and its hash.
type BoundRow = (String, i32, i64, Option<serde_json::Value>, Option<String>);

/// Binds the keys that are `enriched` and bound to no other record, in the caller's
/// transaction (which also records the batch's dead letters as pending, and commits
/// before the Kafka transaction begins). A key may come in several copies (its result
/// re-emitted, on one partition or another): the copy it is already bound to wins (a
/// record read again after an aborted transaction gets its binding back), else the first
/// by partition and offset. Returns, per key bound, the record it is bound to and the
/// result stored for the key (a key without one is bound to be dead-lettered).
///
/// Only records of partitions the caller still holds under the epoch it took them with
/// are bound: those rows of `publish_partitions` are read `FOR SHARE`, so a new owner
/// taking one waits for this transaction, and a publisher whose partition was taken
/// meanwhile binds nothing of it. [`Binding::unheld`] names those partitions: their
/// records are not the caller's to skip (and commit past); it must read them again or
/// leave them to the partition's owner.
pub async fn bind(tx: &mut sqlx::PgConnection, pipeline: &str, claims: &[Claim<'_>]) -> sqlx::Result<Binding> {
    let mut asked: Vec<(i32, i64)> = claims.iter().map(|c| (c.partition, c.epoch)).collect();
    asked.sort_unstable();
    asked.dedup();
    let (asked_p, asked_e): (Vec<i32>, Vec<i64>) = asked.into_iter().unzip();
    let held: Vec<(i32,)> = sqlx::query_as(
        "SELECT o.partition FROM publish_partitions o
           JOIN UNNEST($2::int[], $3::bigint[]) AS q(p, epoch) ON o.partition = q.p AND o.epoch = q.epoch
          WHERE o.pipeline = $1
          ORDER BY o.partition
          FOR SHARE OF o",
    )
    .bind(pipeline)
    .bind(&asked_p)
    .bind(&asked_e)
    .fetch_all(&mut *tx)
    .await?;
    let held: std::collections::HashSet<i32> = held.into_iter().map(|(p,)| p).collect();
    let mut unheld: Vec<i32> = asked_p.iter().copied().filter(|p| !held.contains(p)).collect();
    unheld.dedup();
    let claims: Vec<&Claim<'_>> = claims.iter().filter(|c| held.contains(&c.partition)).collect();
    if claims.is_empty() {
        return Ok(Binding { bound: std::collections::HashMap::new(), unheld });
    }
    let keys: Vec<&str> = claims.iter().map(|c| c.key).collect();
    let partitions: Vec<i32> = claims.iter().map(|c| c.partition).collect();
    let offsets: Vec<i64> = claims.iter().map(|c| c.offset).collect();
    let outcomes: Vec<&str> = claims.iter().map(|c| c.outcome.state().as_str()).collect();
    let traces: Vec<&str> = claims.iter().map(|c| c.trace_id.as_str()).collect();
    // One row per key (an UPDATE joined to several would apply any one of them).
    let bound: Vec<BoundRow> = sqlx::query_as(
        "UPDATE enrich_state s
            SET publish_partition = b.p, publish_offset = b.o, publish_outcome = b.outcome,
                publish_trace = b.trace, updated_at = now()
           FROM (SELECT DISTINCT ON (c.k) c.k, c.p, c.o, c.trace,
                        CASE WHEN e.result IS NULL THEN 'dead_lettered' ELSE c.outcome END AS outcome
                   FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::text[], $6::text[]) AS c(k, p, o, outcome, trace)
                   JOIN enrich_state e ON e.pipeline = $1 AND e.idempotency_key = c.k
                  WHERE e.state = 'enriched'
                    AND (e.publish_offset IS NULL OR (e.publish_partition = c.p AND e.publish_offset = c.o))
                  ORDER BY c.k, (e.publish_offset IS NOT NULL) DESC, c.p, c.o) AS b
          WHERE s.pipeline = $1 AND s.idempotency_key = b.k AND s.state = 'enriched'
            AND (s.publish_offset IS NULL OR (s.publish_partition = b.p AND s.publish_offset = b.o))
         RETURNING s.idempotency_key, b.p, b.o, s.result, s.result_hash",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&outcomes)
    .bind(&traces)
    .fetch_all(tx)
    .await?;
    let bound = bound
        .into_iter()
        .map(|(key, partition, offset, json, result_hash)| {
            (Bound { key, partition, offset }, StoredResult { json, result_hash })
        })
        .collect();
    Ok(Binding { bound, unheld })
}

/// What [`bind`] did: per key bound, the record it is bound to and the result stored for
/// it; and the partitions of the claims that the caller no longer holds under the epoch
/// it gave (taken by another publisher since).
#[derive(Debug, Default)]
pub struct Binding {
    pub bound: std::collections::HashMap<Bound, StoredResult>,
    pub unheld: Vec<i32>,
}

/// Keys bound to be published whose output turned out impossible to build (too large
/// for the output topic, say) once the stored result was read: bound to be
/// dead-lettered instead, in the caller's binding transaction (`enriched` kept).
pub async fn rebind_dead_lettered(tx: &mut sqlx::PgConnection, pipeline: &str, bound: &[Bound]) -> sqlx::Result<()> {
    if bound.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = bound.iter().map(|b| b.key.as_str()).collect();
    let partitions: Vec<i32> = bound.iter().map(|b| b.partition).collect();
    let offsets: Vec<i64> = bound.iter().map(|b| b.offset).collect();
    sqlx::query(
        "UPDATE enrich_state s SET publish_outcome = 'dead_lettered', updated_at = now()
           FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS b(k, p, o)
          WHERE s.pipeline = $1 AND s.idempotency_key = b.k AND s.state = 'enriched'
            AND s.publish_partition = b.p AND s.publish_offset = b.o",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&partitions)
    .bind(&offsets)
    .execute(tx)
    .await?;
    Ok(())
}

/// What settling did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub keys: i64,
    pub dead_letters: i64,
}

/// The transaction that carried `bound` keys and the records at `records` (partition,
/// offset) has committed: each bound key takes its outcome (with its audit row; its
/// binding is cleared, so the partial index of unsettled bindings stays small) and the
/// pending dead letters written by those records are listed. One statement, and
/// idempotent: run again, it finds nothing left to do.
pub async fn settle(pool: &PgPool, pipeline: &str, bound: &[Bound], records: &[(i32, i64)]) -> sqlx::Result<Settled> {
    let keys: Vec<&str> = bound.iter().map(|b| b.key.as_str()).collect();
    let partitions: Vec<i32> = bound.iter().map(|b| b.partition).collect();
    let offsets: Vec<i64> = bound.iter().map(|b| b.offset).collect();
    let (record_partitions, record_offsets): (Vec<i32>, Vec<i64>) = records.iter().copied().unzip();
    let (keys, dead_letters): (i64, i64) = sqlx::query_as(
        "WITH marked AS (
             UPDATE enrich_state s SET state = s.publish_outcome, publish_partition = NULL, publish_offset = NULL,
                                       updated_at = now()
               FROM UNNEST($2::text[], $3::int[], $4::bigint[]) AS b(k, p, o)
              WHERE s.pipeline = $1 AND s.idempotency_key = b.k AND s.state = 'enriched'
                AND s.publish_partition = b.p AND s.publish_offset = b.o
             RETURNING s.idempotency_key, s.state, s.publish_trace),
         audit AS (
             INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, trace_id)
             SELECT $1, idempotency_key, 'publisher', 0, state, publish_trace FROM marked),
         -- A key waits in the DLQ once: of its pending dead letters one is listed, unless
         -- one is listed already; the others are dropped (their DLQ records stay). The
         -- listed one is read FOR SHARE, to wait for a replay that holds it until its mark
         -- (dead_letter_store::list_pending says why).
         pending AS (
             SELECT d.id, d.idempotency_key FROM dead_letters d
               JOIN UNNEST($5::int[], $6::bigint[]) AS r(p, o) ON d.publish_partition = r.p AND d.publish_offset = r.o
              WHERE d.pipeline = $1 AND d.status = 'pending'),
         chosen AS (
             SELECT DISTINCT ON (idempotency_key) id FROM pending n
              WHERE NOT EXISTS (SELECT 1 FROM dead_letters w
                                 WHERE w.pipeline = $1 AND w.idempotency_key = n.idempotency_key
                                   AND w.status = 'dead' AND w.stage <> 'ingest-dedup'
                                   FOR SHARE)
              ORDER BY idempotency_key, id),
         listed AS (
             UPDATE dead_letters d SET status = 'dead', updated_at = now()
              WHERE d.id IN (SELECT id FROM chosen)
             RETURNING 1),
         dropped AS (
             DELETE FROM dead_letters d
              WHERE d.id IN (SELECT id FROM pending) AND d.id NOT IN (SELECT id FROM chosen))
         SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM listed)",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&record_partitions)
    .bind(&record_offsets)
    .fetch_one(pool)
    .await?;
    Ok(Settled { keys, dead_letters })
}

/// How many stale bindings (of ended keys) one statement clears.
const STALE_BINDINGS_CLEARED: i64 = 10_000;

/// Bindings and pending dead letters still waiting to be settled: the keys (with their
/// records) and the records of pending dead letters, by partition of the results topic.
/// Ended keys that kept their binding (settled by a publisher of an earlier release,
/// during a rolling upgrade) have it cleared first: the partial index read here holds
/// only bindings waiting to be settled, not every key such a publisher ever settled.
pub async fn unsettled(pool: &PgPool, pipeline: &str) -> sqlx::Result<(Vec<Bound>, Vec<(i32, i64)>)> {
    // In statements of at most STALE_BINDINGS_CLEARED rows each, each one short (no
    // long lock on a large table), until none is left: the first reconciliation after an
    // upgrade clears what the earlier release left, the later ones what its publishers
    // still running beside this one settled meanwhile.
    loop {
        let cleared = sqlx::query(
            "UPDATE enrich_state s SET publish_partition = NULL, publish_offset = NULL
               FROM (SELECT idempotency_key FROM enrich_state
                      WHERE pipeline = $1 AND publish_offset IS NOT NULL AND state IN ('published', 'dead_lettered')
                      LIMIT $2) AS e
              WHERE s.pipeline = $1 AND s.idempotency_key = e.idempotency_key
                AND s.publish_offset IS NOT NULL AND s.state IN ('published', 'dead_lettered')",
        )
        .bind(pipeline)
        .bind(STALE_BINDINGS_CLEARED)
        .execute(pool)
        .await?;
        if cleared.rows_affected() < STALE_BINDINGS_CLEARED as u64 {
            break;
        }
    }
    let bound: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT idempotency_key, publish_partition, publish_offset FROM enrich_state
          WHERE pipeline = $1 AND state = 'enriched' AND publish_offset IS NOT NULL",
    )
    .bind(pipeline)
    .fetch_all(pool)
    .await?;
    let pending: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT publish_partition, publish_offset FROM dead_letters
          WHERE pipeline = $1 AND status = 'pending' AND publish_offset IS NOT NULL",
    )
    .bind(pipeline)
    .fetch_all(pool)
    .await?;
    Ok((bound.into_iter().map(|(key, partition, offset)| Bound { key, partition, offset }).collect(), pending))
}
