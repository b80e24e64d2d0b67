//! publisher: consumes `enrich.results` and writes each key's merged output (the
//! original JSON plus an `enrichment` object) once to the output topic. The output
//! records and the consumed offsets commit in one Kafka transaction, so `read_committed`
//! consumers never see a record twice; the key is marked `published` in PostgreSQL in a
//! database transaction committed right after it.

pub mod failpoints;
mod merge;
mod metrics;

use enrich_common::config::Stage;
use enrich_common::dead_letter::dead_letter;
use enrich_common::envelope::Envelope;
use enrich_common::error::{RecordError, chain};
use enrich_common::service::StageRuntime;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::spans::{ChildSpan, RecordSpan, attr};
use enrich_common::{Settings, TraceContext, headers, kafka};
use opentelemetry::KeyValue;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashSet;
use std::time::Duration;

pub use merge::merge_output;
pub use metrics::PublisherMetrics;

const STAGE: Stage = Stage::Publisher;
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Publisher {
    settings: Settings,
    group: String,
    runtime: StageRuntime,
    producer: FutureProducer,
    metrics: PublisherMetrics,
}

pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topics = [settings.topics.results.as_str(), settings.topics.output.as_str(), settings.topics.dlq.as_str()];
    let (runtime, metrics) = StageRuntime::start(
        &settings,
        STAGE,
        settings.publisher.http_port,
        &topics,
        &shutdown,
        PublisherMetrics::register,
    )
    .await?;
    let transactional_id = settings
        .publisher
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("{}.publisher.{}", settings.pipeline.name, hostname()));
    let producer = transactional_producer(&settings, &transactional_id)?;
    // Fences any earlier incarnation with this id and aborts its open transaction.
    tokio::task::block_in_place(|| producer.init_transactions(TXN_TIMEOUT))
        .map_err(|e| anyhow::anyhow!("init_transactions ({transactional_id}): {e}"))?;
    let group = settings.group_id(STAGE);
    let consumer =
        std::sync::Arc::new(kafka::consumer(&settings, &group, STAGE.as_str(), kafka::OffsetCommit::Transactional)?);
    kafka::spawn_lag_reporter(consumer.clone(), runtime.metrics.clone(), Duration::from_secs(5), shutdown.clone());
    consumer.subscribe(&[&settings.topics.results])?;
    tracing::info!(group, transactional_id, "consuming");
    runtime.state.set_ready();

    let publisher = Publisher { settings, group: group.clone(), runtime, producer, metrics };
    let consumed = consume(&publisher, &consumer, &shutdown).await;
    publisher.runtime.finish(&shutdown).await;
    consumed
}

/// The transactional producer cannot go on (fenced, or a fatal error): the stage stops
/// with an error and its supervisor starts a new one, which fences this one for good.
#[derive(Debug, thiserror::Error)]
#[error("the transactional producer cannot continue: {0}")]
struct ProducerFatal(String);

/// Aborts the open transaction. An abort that times out (the broker is away) must be
/// called again until it completes: librdkafka refuses any other transactional call
/// meanwhile. A fatal error ends the stage.
async fn abort(publisher: &Publisher, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut wait = Duration::from_millis(200);
    loop {
        match tokio::task::block_in_place(|| publisher.producer.abort_transaction(TXN_TIMEOUT)) {
            Ok(()) => return Ok(()),
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_retriable() && !e.is_fatal() => {
                tracing::warn!(error = %e, "abort_transaction did not complete yet; calling it again");
                tokio::select! {
                    _ = shutdown.cancelled() => anyhow::bail!("shutting down during an abort: {e}"),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(ProducerFatal(e.to_string()).into()),
        }
    }
}

fn transactional_producer(settings: &Settings, transactional_id: &str) -> anyhow::Result<FutureProducer> {
    let mut config = kafka::base_config(settings);
    config
        .set("client.id", STAGE.as_str())
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", settings.publisher.transaction_timeout_ms.to_string())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    kafka::override_from(&mut config, settings);
    Ok(config.create()?)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// A failed transaction is aborted and its batch read again from Kafka (not retried in
/// memory): the failure may be a rebalance, which only a poll resolves.
async fn consume(publisher: &Publisher, consumer: &StreamConsumer, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let tuning = publisher.settings.publisher.tuning();
    let runtime = &publisher.runtime;
    let mut backoff = Duration::from_millis(200);
    loop {
        let batch = kafka::next_batch(consumer, tuning, shutdown).await;
        if batch.is_empty() {
            return Ok(());
        }
        for m in &batch {
            runtime.metrics.consumed(m.topic());
        }
        match publish_batch(publisher, consumer, &batch, shutdown).await {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                runtime.state.set_ready();
            }
            Err(e) if e.downcast_ref::<ProducerFatal>().is_some() => {
                tracing::error!(error = %e, "stopping: a new publisher takes over where this one committed");
                return Err(e);
            }
            Err(e) => {
                runtime.metrics.batch_retries.inc();
                let cause = chain(e.as_ref());
                tracing::error!(error = %cause, "transaction failed; aborted, the batch will be read again");
                runtime.state.set_not_ready(format!("transactions failing: {cause}"));
                rewind(consumer, &batch);
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Seeks every partition of `batch` back to its first record, so an aborted batch is
/// read again.
fn rewind(consumer: &StreamConsumer, batch: &[OwnedMessage]) {
    let mut first: std::collections::BTreeMap<(String, i32), i64> = std::collections::BTreeMap::new();
    for m in batch {
        let e = first.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
        *e = (*e).min(m.offset());
    }
    for ((topic, partition), offset) in first {
        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(5)) {
            tracing::warn!(%topic, partition, offset, error = %e, "seek back failed; the committed offset decides");
        }
    }
}

/// One transaction: outputs (and dead letters) plus the consumed offsets; then the
/// `published` marks in PostgreSQL.
async fn publish_batch(
    publisher: &Publisher,
    consumer: &StreamConsumer,
    batch: &[OwnedMessage],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let pipeline = &publisher.settings.pipeline.name;
    let topics = &publisher.settings.topics;

    // Decode; the first copy of a key in the batch is the one that counts.
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    let mut rejects = Vec::new();
    for m in batch {
        let hdrs = headers::collect(m.headers());
        let incoming = TraceContext::extract(&hdrs);
        let trace = RecordSpan::consume(STAGE.as_str(), &publisher.group, m, incoming.as_ref());
        match Envelope::decode_from(m.payload().unwrap_or_default()) {
            Ok(env) if env.result().is_some() => {
                trace.set([KeyValue::new(attr::IDEMPOTENCY_KEY, env.idempotency_key.clone())]);
                if seen.insert(env.idempotency_key.clone()) {
                    candidates.push((env, trace));
                } else {
                    publisher.metrics.outcome("duplicate_result");
                }
            }
            Ok(env) => {
                rejects.push((env, trace, RecordError::invalid("no_result", "a results record without a result")))
            }
            Err(e) => {
                let env = Envelope {
                    schema: enrich_common::envelope::SCHEMA.into(),
                    pipeline: pipeline.clone(),
                    idempotency_key: enrich_common::idempotency::fallback_key(pipeline, m.key(), m.payload())
                        .to_string(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    ..Default::default()
                };
                rejects.push((env, trace, RecordError::invalid("invalid_envelope", e.to_string())));
            }
        }
    }

    let mut db_tx = publisher.runtime.pool.begin().await?;
    let keys: Vec<String> = candidates.iter().map(|(e, _)| e.idempotency_key.clone()).collect();
    // Claim the right to publish: only keys not yet published come back.
    let claimed: Vec<(String,)> = sqlx::query_as(
        "UPDATE enrich_state SET state = 'published', updated_at = now()
         WHERE pipeline = $1 AND idempotency_key = ANY($2) AND state <> 'published'
         RETURNING idempotency_key",
    )
    .bind(pipeline)
    .bind(&keys)
    .fetch_all(&mut *db_tx)
    .await?;
    let claimed: HashSet<String> = claimed.into_iter().map(|(k,)| k).collect();

    tokio::task::block_in_place(|| publisher.producer.begin_transaction())?;
    // PRODUCER spans end when the transaction is over.
    let mut sends: Vec<ChildSpan> = Vec::new();
    let in_transaction = async {
        let mut deliveries: Vec<DeliveryFuture> = Vec::new();
        let mut published = Vec::new();
        for (env, trace) in &candidates {
            if !claimed.contains(&env.idempotency_key) {
                publisher.metrics.outcome("already_published");
                continue;
            }
            match merge_output(env) {
                Ok(value) => {
                    let out = trace.producer(&topics.output);
                    let h = out.ids().inject(headers::owned(&[(headers::IDEMPOTENCY_KEY, &env.idempotency_key)]));
                    sends.push(out);
                    let key = env.source.as_ref().and_then(|s| s.key.as_deref());
                    deliveries.push(send(&publisher.producer, &topics.output, key, &value, h)?);
                    published.push((env, trace));
                }
                Err(error) => {
                    let dlq = trace.producer(&topics.dlq);
                    let (dead, h) = dead_letter(env.clone(), &error, STAGE.as_str(), dlq.ids());
                    sends.push(dlq);
                    trace.fail(error.to_string());
                    let key = env.source.as_ref().and_then(|s| s.key.clone());
                    deliveries.push(send(
                        &publisher.producer,
                        &topics.dlq,
                        key.as_deref(),
                        &dead.encode_to_bytes(),
                        h,
                    )?);
                    publisher.runtime.metrics.dead_lettered(error.reason);
                }
            }
        }
        for (env, trace, error) in &rejects {
            let dlq = trace.producer(&topics.dlq);
            let (dead, h) = dead_letter(env.clone(), error, STAGE.as_str(), dlq.ids());
            sends.push(dlq);
            trace.fail(error.to_string());
            deliveries.push(send(&publisher.producer, &topics.dlq, None, &dead.encode_to_bytes(), h)?);
            publisher.runtime.metrics.dead_lettered(error.reason);
        }
        for d in deliveries {
            d.await.map_err(|_| anyhow::anyhow!("producer dropped a delivery"))?.map_err(|(e, _)| e)?;
        }

        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in kafka::next_offsets(batch) {
            offsets.add_partition_offset(&topic, partition, Offset::Offset(next))?;
        }
        let group = consumer.group_metadata().ok_or_else(|| anyhow::anyhow!("consumer has no group metadata"))?;
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            publisher.producer.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)?;
            publisher.producer.commit_transaction(TXN_TIMEOUT)?;
            Ok(())
        })?;
        failpoints::pass(pipeline, failpoints::Instant::AfterKafkaCommit).await;
        anyhow::Ok(published)
    };
    let published = match in_transaction.await {
        Ok(p) => p,
        Err(e) => {
            // The database transaction rolls back when dropped; the Kafka one is aborted here.
            abort(publisher, shutdown).await.map_err(|abort| abort.context(format!("aborting after: {e}")))?;
            return Err(e);
        }
    };
    publisher.runtime.metrics.produced(&topics.output, published.len() as u64);
    publisher.runtime.metrics.produced(&topics.dlq, sends.len().saturating_sub(published.len()) as u64);

    // The output is committed. Record it; a crash right here leaves the key `enriched`
    // in the database although it was published (see README, "Guarantees").
    let (audit_keys, audit_traces): (Vec<String>, Vec<String>) =
        published.iter().map(|(e, t)| (e.idempotency_key.clone(), t.ids().trace_id_hex())).unzip();
    sqlx::query(
        "INSERT INTO run_history (pipeline, idempotency_key, stage, attempt, status, trace_id)
         SELECT $1, k, 'publisher', 0, 'published', t FROM UNNEST($2::text[], $3::text[]) AS u(k, t)",
    )
    .bind(pipeline)
    .bind(&audit_keys)
    .bind(&audit_traces)
    .execute(&mut *db_tx)
    .await?;
    if let Err(e) = db_tx.commit().await {
        tracing::error!(error = %e, keys = audit_keys.len(), "output committed but the published marks were not stored");
        return Ok(());
    }
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    for (env, span) in &published {
        publisher.metrics.outcome("published");
        span.set([KeyValue::new(attr::OUTCOME, "published")]);
        let source_ms = env.source.as_ref().map(|s| s.timestamp_ms).unwrap_or(0);
        if source_ms > 0 && now_ms >= source_ms {
            publisher.metrics.end_to_end.observe((now_ms - source_ms) as f64 / 1000.0);
        }
    }
    drop(sends);
    Ok(())
}

fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: OwnedHeaders,
) -> anyhow::Result<DeliveryFuture> {
    let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("cannot enqueue a record for {topic}: {e}"))
}
