//! Producing a workload and reading topics back to their end.

use enrich_common::{Settings, TraceContext, headers, kafka};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

use crate::workload::Record;

/// Where one record of the workload landed.
#[derive(Debug, Clone)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
    /// The trace context the record was sent with, if any.
    pub trace: Option<TraceContext>,
    /// The record's timestamp (CreateTime), milliseconds since the epoch.
    pub timestamp_ms: i64,
}

/// How fast to produce.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as the producer goes.
    Unlimited,
    /// About this many records per second.
    PerSecond(f64),
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Produces every record (in order) and waits for each acknowledgement. Records for
/// which `traced(i)` is true carry a fresh `traceparent` header.
pub async fn produce_all(
    settings: &Settings,
    topic: &str,
    records: &[Record],
    traced: impl Fn(usize) -> bool,
    progress: impl FnMut(usize),
) -> anyhow::Result<Vec<Produced>> {
    produce_paced(settings, topic, records, traced, Pace::Unlimited, progress).await
}

/// [`produce_all`] at a chosen pace.
pub async fn produce_paced(
    settings: &Settings,
    topic: &str,
    records: &[Record],
    traced: impl Fn(usize) -> bool,
    pace: Pace,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Vec<Produced>> {
    let started = tokio::time::Instant::now();
    let producer: FutureProducer = kafka::producer(settings, "loadgen")?;
    let mut pending = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if let Pace::PerSecond(rate) = pace {
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        let trace = traced(i).then(TraceContext::new_root);
        let timestamp_ms = now_ms();
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).timestamp(timestamp_ms);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        if let Some(t) = &trace {
            record = record.headers(t.inject(OwnedHeaders::new()));
        }
        let delivery = loop {
            match producer.send_result(record) {
                Ok(d) => break d,
                Err((e, back)) => {
                    // Queue full: let librdkafka drain, then try again.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if !matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ) {
                        anyhow::bail!("cannot produce to {topic}: {e}");
                    }
                }
            }
        };
        pending.push((delivery, trace, timestamp_ms));
        if (i + 1).is_multiple_of(1000) {
            progress(i + 1);
        }
    }
    let mut produced = Vec::with_capacity(pending.len());
    for (delivery, trace, timestamp_ms) in pending {
        let d = delivery.await?.map_err(|(e, _)| anyhow::anyhow!("delivery to {topic} failed: {e}"))?;
        produced.push(Produced { partition: d.partition, offset: d.offset, trace, timestamp_ms });
    }
    if !records.len().is_multiple_of(1000) {
        progress(records.len());
    }
    Ok(produced)
}

/// Reads every committed record of `topic` (all partitions, from the start) until the
/// consumer reaches the end of each partition.
pub fn read_to_end(settings: &Settings, topic: &str, deadline: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
    read_to_end_with(settings, topic, deadline, "read_committed")
}

/// [`read_to_end`] with a chosen `isolation.level` (`read_uncommitted` also sees records
/// of aborted transactions).
pub fn read_to_end_with(
    settings: &Settings,
    topic: &str,
    deadline: Duration,
    isolation: &str,
) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut config = kafka::base_config(settings);
    config
        .set("group.id", format!("loadgen-reader-{:x}", rand_suffix()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("enable.partition.eof", "false");
    kafka::override_from(&mut config, settings);
    let consumer: BaseConsumer = config.create()?;
    let mut ends = watermarks(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for &(p, _) in &ends {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut out = Vec::new();
    loop {
        let position = consumer.position()?;
        let at = |p: i32| match position.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(x)) => x,
            _ => 0,
        };
        if ends.iter().all(|&(p, high)| high == 0 || at(p) >= high) {
            // Concluded from the watermarks read at the start: read them again, so a
            // partition whose first answer was stale (or one added since) is read too.
            let now = watermarks(&consumer, topic)?;
            if now.iter().all(|&(p, high)| high == 0 || at(p) >= high) {
                return Ok(out);
            }
            let new: Vec<i32> = now.iter().map(|e| e.0).filter(|p| !ends.iter().any(|e| e.0 == *p)).collect();
            if !new.is_empty() {
                let mut added = TopicPartitionList::new();
                for p in new {
                    added.add_partition_offset(topic, p, Offset::Beginning)?;
                }
                consumer.incremental_assign(&added)?;
            }
            ends = now;
        }
        if started.elapsed() > deadline {
            let behind: Vec<String> = ends
                .iter()
                .filter(|&&(p, high)| at(p) < high)
                .map(|&(p, high)| format!("{p}: {}/{high}", at(p)))
                .collect();
            anyhow::bail!(
                "did not reach the end of {topic} within {deadline:?} (read {} records; partition: position/end {})",
                out.len(),
                behind.join(", ")
            );
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None => {}
        }
    }
}

/// The high watermark of every partition of `topic`, as the broker answers now.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut ends = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (_low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.push((p, high));
    }
    Ok(ends)
}

/// Deletes `topics` (best effort: a topic already gone, or a broker that does not answer
/// within 10 s, is left). A broker that keeps every run's topics runs out of file
/// descriptors after a few runs of the test suite or the bench.
pub async fn delete_topics(settings: &Settings, topics: &[&str]) {
    let admin: Result<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>, _> =
        kafka::base_config(settings).create();
    if let Ok(admin) = admin {
        let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let _ = admin.delete_topics(topics, &opts).await;
    }
}

/// Whether `group` has committed offsets up to the end of every partition of `topic`.
pub fn group_caught_up(settings: &Settings, group: &str, topic: &str) -> anyhow::Result<bool> {
    let mut config = kafka::base_config(settings);
    config.set("group.id", group).set("enable.auto.commit", "false");
    kafka::override_from(&mut config, settings);
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            ends.push((p.id(), high));
            tpl.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(ends.iter().all(|&(p, high)| {
        high == 0
            || committed.find_partition(topic, p).is_some_and(|e| matches!(e.offset(), Offset::Offset(x) if x >= high))
    }))
}

/// Reads a header of an output record as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    headers::find(&headers::collect(m.headers()), name).map(str::to_string)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        ^ u64::from(std::process::id())
}
