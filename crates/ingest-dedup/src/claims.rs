//! Claims in PostgreSQL, one round trip per batch: the first record seen with a key
//! owns it; every later record with that key is a duplicate.

use enrich_common::key_state::{self, State, ingest::Arrival};
use sqlx::PgPool;
use std::collections::HashMap;

use crate::inspect::Sighting;

/// What the claim says about one sighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This record owns the key and it was never forwarded (first sighting, or a
    /// redelivery of a record whose forward did not complete): forward it.
    Forward,
    /// This record owns the key and was already forwarded (a redelivery): nothing to do.
    AlreadyForwarded,
    /// Another record owns the key.
    Duplicate,
}

/// Claims every sighting's key (insert-if-absent, with the traceparent of the span that
/// reads it) and says what to do with each; for a record of its own key read again, also
/// the traceparent recorded when it was first claimed, if another reading recorded it.
pub async fn claim(
    pool: &PgPool,
    pipeline: &str,
    sightings: &[&Sighting],
    traceparents: &[String],
) -> sqlx::Result<Vec<(Claim, Option<String>)>> {
    if sightings.is_empty() {
        return Ok(Vec::new());
    }
    let n = sightings.len();
    let (mut keys, mut topics, mut partitions, mut offsets, mut kafka_keys) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in sightings {
        let src = s.envelope.source.clone().unwrap_or_default();
        keys.push(s.key.as_str().to_string());
        topics.push(src.topic);
        partitions.push(src.partition);
        offsets.push(src.offset);
        kafka_keys.push(src.key);
    }
    let arrivals: Vec<Arrival> = (0..n)
        .map(|i| Arrival {
            key: &keys[i],
            topic: &topics[i],
            partition: partitions[i],
            offset: offsets[i],
            kafka_key: kafka_keys[i].as_deref(),
            traceparent: &traceparents[i],
        })
        .collect();
    key_state::ingest::receive(pool, pipeline, &arrivals).await?;

    type Owner = (String, String, i32, i64, Option<String>);
    let rows: Vec<(String, String, String, i32, i64, Option<String>)> = sqlx::query_as(
        "SELECT idempotency_key, state, source_topic, source_partition, source_offset, traceparent
         FROM enrich_state WHERE pipeline = $1 AND idempotency_key = ANY($2)",
    )
    .bind(pipeline)
    .bind(&keys)
    .fetch_all(pool)
    .await?;
    let owners: HashMap<String, Owner> =
        rows.into_iter().map(|(k, state, t, p, o, tp)| (k, (state, t, p, o, tp))).collect();

    Ok(sightings
        .iter()
        .enumerate()
        .map(|(i, _)| match owners.get(&keys[i]) {
            Some((state, t, p, o, tp)) if (t, *p, *o) == (&topics[i], partitions[i], offsets[i]) => {
                let claim =
                    if State::parse(state) == Some(State::Received) { Claim::Forward } else { Claim::AlreadyForwarded };
                (claim, tp.clone().filter(|tp| *tp != traceparents[i]))
            }
            _ => (Claim::Duplicate, None),
        })
        .collect())
}

/// One audit row per source record.
pub struct Disposition {
    pub key: String,
    /// forwarded | duplicate | dead_lettered
    pub status: &'static str,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub trace_id: String,
    pub detail: Option<String>,
}

/// Appends the batch's dispositions to `run_history`; a redelivered record is recorded once.
pub async fn record(pool: &PgPool, pipeline: &str, rows: &[Disposition]) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    let mut topics = Vec::with_capacity(rows.len());
    let mut partitions = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    let mut traces = Vec::with_capacity(rows.len());
    let mut details = Vec::with_capacity(rows.len());
    for r in rows {
        keys.push(r.key.as_str());
        statuses.push(r.status);
        topics.push(r.topic.as_str());
        partitions.push(r.partition);
        offsets.push(r.offset);
        traces.push(r.trace_id.as_str());
        details.push(r.detail.as_deref());
    }
    sqlx::query(
        "INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, source_topic, source_partition, source_offset, trace_id, detail)
         SELECT $1, k, 'ingest-dedup', 0, s, t, p, o, tr, d
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[], $7::text[], $8::text[]) AS u(k, s, t, p, o, tr, d)
         ON CONFLICT (pipeline, source_topic, source_partition, source_offset) WHERE stage = 'ingest-dedup' DO NOTHING",
    )
    .bind(pipeline)
    .bind(&keys)
    .bind(&statuses)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&traces)
    .bind(&details)
    .execute(pool)
    .await?;
    Ok(())
}
