//! ingest-dedup: reads the source topics, derives each record's idempotency key, claims
//! it in PostgreSQL (one round trip per batch), forwards first sightings to
//! `enrich.requests`, records duplicates, and dead-letters malformed records. Offsets
//! are stored only after the forward is acknowledged and the claim is durable.

pub mod claims;
pub mod inspect;
mod metrics;

use enrich_common::config::Stage;
use enrich_common::dead_letter::dead_letter;
use enrich_common::error::chain;
use enrich_common::http::{self, ServiceState};
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::{Settings, db, headers, kafka};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;

use claims::{Claim, Disposition};
use inspect::{Inspected, inspect};
pub use metrics::IngestMetrics;

const STAGE: Stage = Stage::Ingest;

struct Ingest {
    settings: Settings,
    pool: PgPool,
    producer: FutureProducer,
    metrics: IngestMetrics,
}

/// Runs until `shutdown` is cancelled, then commits what is done and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = IngestMetrics::register(&mut registry);
    let state = ServiceState::new(STAGE.as_str(), registry);
    let (addr, http_task) = http::serve(
        "0.0.0.0",
        settings.ingest.http_port,
        http::router(state.clone()),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "health and metrics endpoints listening");

    let pool = db::connect(&settings.database).await?;
    kafka::ensure_topics(
        &settings,
        &[&settings.topics.requests, &settings.topics.dlq],
    )
    .await?;
    let producer = kafka::producer(&settings, STAGE.as_str())?;
    let group = settings.group_id(STAGE);
    let consumer = kafka::consumer(
        &settings,
        &group,
        STAGE.as_str(),
        kafka::OffsetCommit::Stored,
    )?;
    consumer.subscribe(&settings.source_topics())?;
    tracing::info!(group, topics = ?settings.source_topics(), "consuming");
    state.set_ready();

    let ingest = Ingest {
        settings,
        pool,
        producer,
        metrics,
    };
    let result = consume(&ingest, &consumer, &state, &shutdown).await;
    drain(&consumer, &ingest.producer);
    shutdown.cancel();
    let _ = http_task.await;
    result
}

async fn consume(
    ingest: &Ingest,
    consumer: &StreamConsumer,
    state: &Arc<ServiceState>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let tuning = ingest.settings.ingest.tuning();
    loop {
        let batch = kafka::next_batch(consumer, tuning, shutdown).await;
        if batch.is_empty() {
            return Ok(());
        }
        // The batch is idempotent: on failure it is processed again from the start.
        let mut backoff = Duration::from_millis(100);
        loop {
            match process_batch(ingest, &batch).await {
                Ok(()) => {
                    kafka::store_offsets(consumer, &batch);
                    state.set_ready();
                    break;
                }
                Err(e) => {
                    ingest.metrics.batch_retries.inc();
                    let cause = chain(e.as_ref());
                    tracing::error!(error = %cause, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                    state.set_not_ready(format!("batch failing: {cause}"));
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

async fn process_batch(ingest: &Ingest, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let pipeline = &ingest.settings.pipeline;
    let topics = &ingest.settings.topics;
    let inspected: Vec<Inspected> = batch.iter().map(|m| inspect(pipeline, m)).collect();
    let sightings: Vec<_> = inspected
        .iter()
        .filter_map(|i| match i {
            Inspected::Valid(s) => Some(s),
            Inspected::Invalid { .. } => None,
        })
        .collect();
    let claims = claims::claim(&ingest.pool, &pipeline.name, &sightings).await?;

    let mut deliveries = Vec::new();
    let mut forwarded = Vec::new();
    let mut dispositions = Vec::with_capacity(batch.len());
    let mut outcomes: Vec<&'static str> = Vec::with_capacity(batch.len());
    let mut claim_iter = claims.into_iter();
    for item in inspected {
        match item {
            Inspected::Valid(s) => {
                let claim = claim_iter.next().unwrap_or(Claim::Duplicate);
                let src = s.envelope.source.clone().unwrap_or_default();
                let status = match claim {
                    Claim::Forward => {
                        let record_key = src
                            .key
                            .clone()
                            .unwrap_or_else(|| s.key.as_str().as_bytes().to_vec());
                        let h = s.trace.inject(headers::owned(&[(
                            headers::IDEMPOTENCY_KEY,
                            s.key.as_str(),
                        )]));
                        deliveries.push(send(
                            &ingest.producer,
                            &topics.requests,
                            &record_key,
                            s.envelope.encode_to_bytes(),
                            h,
                        )?);
                        forwarded.push(s.key.to_string());
                        "forwarded"
                    }
                    Claim::AlreadyForwarded => "redelivered",
                    Claim::Duplicate => "duplicate",
                };
                outcomes.push(status);
                if status != "redelivered" {
                    dispositions.push(Disposition {
                        key: s.key.into_string(),
                        status,
                        topic: src.topic,
                        partition: src.partition,
                        offset: src.offset,
                        trace_id: s.trace.trace_id_hex(),
                        detail: None,
                    });
                }
            }
            Inspected::Invalid {
                key,
                envelope,
                trace,
                error,
            } => {
                let src = envelope.source.clone().unwrap_or_default();
                let record_key = src
                    .key
                    .clone()
                    .unwrap_or_else(|| key.as_str().as_bytes().to_vec());
                let (dead, h) = dead_letter(envelope, &error, STAGE.as_str(), &trace);
                deliveries.push(send(
                    &ingest.producer,
                    &topics.dlq,
                    &record_key,
                    dead.encode_to_bytes(),
                    h,
                )?);
                ingest
                    .metrics
                    .dead_letters
                    .get_or_create(&vec![("reason", error.reason.to_string())])
                    .inc();
                tracing::warn!(
                    idempotency_key = %key, topic = %src.topic, partition = src.partition, offset = src.offset,
                    reason = error.reason, error = %error.message, "malformed record dead-lettered"
                );
                outcomes.push("dead_lettered");
                dispositions.push(Disposition {
                    key: key.into_string(),
                    status: "dead_lettered",
                    topic: src.topic,
                    partition: src.partition,
                    offset: src.offset,
                    trace_id: trace.trace_id_hex(),
                    detail: Some(format!("{}: {}", error.reason, error.message)),
                });
            }
        }
    }
    for delivery in deliveries {
        delivery
            .await
            .map_err(|_| anyhow::anyhow!("producer dropped a delivery"))?
            .map_err(|(e, _)| e)?;
    }
    claims::mark_requested(&ingest.pool, &pipeline.name, &forwarded).await?;
    claims::record(&ingest.pool, &pipeline.name, &dispositions).await?;

    for m in batch {
        ingest
            .metrics
            .consumed
            .get_or_create(&vec![("topic", rdkafka::Message::topic(m).to_string())])
            .inc();
    }
    for o in outcomes {
        ingest.metrics.outcome(o);
    }
    Ok(())
}

fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: Vec<u8>,
    headers: OwnedHeaders,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    producer
        .send_result(
            FutureRecord::to(topic)
                .key(key)
                .payload(&payload)
                .headers(headers),
        )
        .map_err(|(e, _)| anyhow::anyhow!("cannot enqueue a record for {topic}: {e}"))
}

/// Commits the stored offsets and flushes the producer before exit.
fn drain(consumer: &StreamConsumer, producer: &FutureProducer) {
    if let Err(e) = producer.flush(Timeout::After(Duration::from_secs(10))) {
        tracing::warn!(error = %e, "producer flush on shutdown failed");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed on shutdown"),
        Err(e) => tracing::info!(error = %e, "no offsets to commit on shutdown"),
    }
}
