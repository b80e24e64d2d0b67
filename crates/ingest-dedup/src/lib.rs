//! ingest-dedup: reads the source topics, derives each record's idempotency key, claims
//! it in PostgreSQL (one round trip per batch), forwards first sightings to
//! `enrich.requests`, records duplicates, and dead-letters malformed records. Offsets
//! are stored only after the forward is acknowledged and the claim is durable.

pub mod budget;
pub mod claims;
pub mod inspect;
mod metrics;

use enrich_common::config::Stage;
use enrich_common::dead_letter_sink::DeadLetterSink;
use enrich_common::service::StageRuntime;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::spans::{ChildSpan, RecordSpan, attr};
use enrich_common::{Settings, TraceContext, headers, kafka};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use rdkafka::consumer::Consumer;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

use budget::Budget;
use claims::{Claim, Disposition};
use inspect::{Inspected, inspect};
pub use metrics::IngestMetrics;

const STAGE: Stage = Stage::Ingest;
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const LAG_EVERY: Duration = Duration::from_secs(5);

struct Ingest {
    settings: Settings,
    group: String,
    dead_letters: DeadLetterSink,
    budget: Budget,
    runtime: StageRuntime,
    producer: FutureProducer,
    metrics: IngestMetrics,
}

/// Runs until `shutdown` is cancelled, then commits what is done and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Source topics are created only where the deployment lets stages create topics.
    let mut topics = settings.source_topics();
    topics.extend([settings.topics.requests.as_str(), settings.topics.dlq.as_str()]);
    let (runtime, metrics) =
        StageRuntime::start(&settings, STAGE, settings.ingest.http_port, &topics, &shutdown, IngestMetrics::register)
            .await?;
    let refuse = kafka::TopicLimit::Refuse;
    kafka::check_topic_limits(&settings, &[(&settings.topics.requests, refuse), (&settings.topics.dlq, refuse)])
        .await?;
    let producer = kafka::producer(&settings, STAGE.as_str())?;
    let group = settings.group_id(STAGE);
    let consumer =
        std::sync::Arc::new(kafka::consumer(&settings, &group, STAGE.as_str(), kafka::OffsetCommit::Stored)?);
    kafka::spawn_lag_reporter(consumer.clone(), runtime.metrics.clone(), LAG_EVERY, shutdown.clone());
    consumer.subscribe(&settings.source_topics())?;
    tracing::info!(group, topics = ?settings.source_topics(), "consuming");
    runtime.state.set_ready();

    let dead_letters = DeadLetterSink::new(&settings, STAGE, runtime.metrics.clone(), runtime.state.clone());
    let budget = Budget::new(&settings);
    tracing::info!(max_bytes = budget.max_bytes, limit = %budget.describe(), "largest source record forwarded");
    let ingest = Ingest { settings, group, dead_letters, budget, runtime, producer, metrics };
    let tuning = ingest.settings.ingest.tuning();
    loop {
        let batch = kafka::next_batch(&consumer, tuning, &shutdown).await;
        if batch.is_empty() {
            break;
        }
        // The batch is idempotent: on failure it is processed again from the start.
        if !ingest.runtime.until_done(&shutdown, MAX_BACKOFF, || process_batch(&ingest, &batch)).await {
            break;
        }
        kafka::store_offsets(&consumer, &batch);
    }
    kafka::drain(&consumer, &ingest.producer);
    ingest.runtime.finish(&shutdown).await;
    Ok(())
}

async fn process_batch(ingest: &Ingest, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let pipeline = &ingest.settings.pipeline;
    let topics = &ingest.settings.topics;
    // One CONSUMER span per record, in the trace its `traceparent` names (or a new one).
    let mut spans: Vec<RecordSpan> = Vec::with_capacity(batch.len());
    let mut inspected: Vec<Inspected> = Vec::with_capacity(batch.len());
    for m in batch {
        let hdrs = headers::collect_checked(rdkafka::Message::headers(m));
        let incoming = TraceContext::extract(&hdrs.pairs);
        spans.push(RecordSpan::consume(STAGE.as_str(), &ingest.group, m, incoming.as_ref()));
        inspected.push(inspect(pipeline, &ingest.budget, m, &hdrs));
    }
    let sightings: Vec<_> = inspected
        .iter()
        .filter_map(|i| match i {
            Inspected::Valid(s) => Some(s),
            Inspected::Invalid { .. } => None,
        })
        .collect();
    // A batch that would pass the DLQ limit is held whole (the stage pauses on it).
    let (n_dead, n_ok) = (inspected.len() - sightings.len(), sightings.len());
    if let Err(why) = ingest.dead_letters.check(n_dead, n_ok) {
        anyhow::bail!(why);
    }
    let claim_spans: Vec<ChildSpan> = inspected
        .iter()
        .zip(&spans)
        .filter(|(i, _)| matches!(i, Inspected::Valid(_)))
        .map(|(i, span)| {
            let key = KeyValue::new(attr::IDEMPOTENCY_KEY, i.key().to_string());
            span.child("dedup claim", SpanKind::Internal, vec![key])
        })
        .collect();
    let traceparents: Vec<String> = inspected
        .iter()
        .zip(&spans)
        .filter(|(i, _)| matches!(i, Inspected::Valid(_)))
        .map(|(_, span)| span.ids().traceparent())
        .collect();
    let claims = claims::claim(&ingest.runtime.pool, &pipeline.name, &sightings, &traceparents).await?;
    drop(claim_spans);

    let mut deliveries = Vec::new();
    let mut forwarded = Vec::new();
    let mut dispositions = Vec::with_capacity(batch.len());
    let mut dead_letters = Vec::new();
    let mut outcomes: Vec<&'static str> = Vec::with_capacity(batch.len());
    let mut claim_iter = claims.into_iter();
    // Each PRODUCER span ends once its record is acknowledged.
    let mut sends: Vec<ChildSpan> = Vec::new();
    // Records read again after a crash continue the trace of their first reading.
    let mut continued: Vec<RecordSpan> = Vec::new();
    for (item, first_span) in inspected.into_iter().zip(&spans) {
        first_span.set([KeyValue::new(attr::IDEMPOTENCY_KEY, item.key().to_string())]);
        let mut span = first_span;
        match item {
            Inspected::Valid(s) => {
                let (claim, earlier) = claim_iter.next().unwrap_or((Claim::Duplicate, None));
                let earlier = earlier.and_then(|tp| TraceContext::parse(&tp, None));
                if let Some(cx) = earlier {
                    first_span.set([KeyValue::new("enrich.continued_in", cx.trace_id_hex())]);
                    let resumed =
                        RecordSpan::resume(STAGE.as_str(), "process redelivered", SpanKind::Consumer, Some(&cx));
                    resumed.set([KeyValue::new(attr::IDEMPOTENCY_KEY, s.key.as_str().to_string())]);
                    continued.push(resumed);
                    span = continued.last().unwrap_or(first_span);
                }
                let src = s.envelope.source.clone().unwrap_or_default();
                let status = match claim {
                    Claim::Forward => {
                        let record_key = src.key.clone().unwrap_or_else(|| s.key.as_str().as_bytes().to_vec());
                        let forward = span.producer(&topics.requests);
                        let h = forward.ids().inject(headers::owned(&[(headers::IDEMPOTENCY_KEY, s.key.as_str())]));
                        sends.push(forward);
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
                span.set([KeyValue::new(attr::OUTCOME, status)]);
                // A redelivered owner is recorded as forwarded again: the insert is
                // idempotent, and it fills the row if a crash came before the first one.
                dispositions.push(Disposition {
                    key: s.key.into_string(),
                    status: if status == "redelivered" { "forwarded" } else { status },
                    topic: src.topic,
                    partition: src.partition,
                    offset: src.offset,
                    trace_id: span.ids().trace_id_hex(),
                    detail: None,
                });
            }
            Inspected::Invalid { key, envelope, error } => {
                let src = envelope.source.clone().unwrap_or_default();
                let record_key = src.key.clone().unwrap_or_else(|| key.as_str().as_bytes().to_vec());
                let dlq_send = span.producer(&topics.dlq);
                let (dead, h) = ingest.dead_letters.letter(envelope, &error, dlq_send.ids());
                deliveries.push(send(&ingest.producer, &topics.dlq, &record_key, dead.encode_to_bytes(), h)?);
                dead_letters.push((dead, dlq_send.ids().clone()));
                sends.push(dlq_send);
                span.set([KeyValue::new(attr::OUTCOME, "dead_lettered")]);
                span.fail(format!("{}: {}", error.reason, error.message));
                ingest.runtime.metrics.dead_lettered(error.reason.as_str());
                tracing::warn!(
                    idempotency_key = %key, topic = %src.topic, partition = src.partition, offset = src.offset,
                    reason = %error.reason, error = %error.message, "malformed record dead-lettered"
                );
                outcomes.push("dead_lettered");
                dispositions.push(Disposition {
                    key: key.into_string(),
                    status: "dead_lettered",
                    topic: src.topic,
                    partition: src.partition,
                    offset: src.offset,
                    trace_id: span.ids().trace_id_hex(),
                    detail: Some(format!("{}: {}", error.reason, error.message)),
                });
            }
        }
    }
    for delivery in deliveries {
        delivery.await.map_err(|_| anyhow::anyhow!("producer dropped a delivery"))?.map_err(|(e, _)| e)?;
    }
    drop(sends);
    ingest.runtime.metrics.produced(&topics.requests, forwarded.len() as u64);
    ingest.runtime.metrics.produced(&topics.dlq, dead_letters.len() as u64);
    enrich_common::key_state::ingest::mark_requested(&ingest.runtime.pool, &pipeline.name, &forwarded).await?;
    claims::record(&ingest.runtime.pool, &pipeline.name, &dispositions).await?;
    let dead: Vec<(&enrich_common::Envelope, &TraceContext)> = dead_letters.iter().map(|(e, t)| (e, t)).collect();
    enrich_common::dead_letter_store::record(&ingest.runtime.pool, &dead).await?;

    for m in batch {
        ingest.runtime.metrics.consumed(rdkafka::Message::topic(m));
    }
    for o in outcomes {
        ingest.metrics.outcome(o);
    }
    ingest.dead_letters.recorded(n_dead, n_ok);
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
        .send_result(FutureRecord::to(topic).key(key).payload(&payload).headers(headers))
        .map_err(|(e, _)| anyhow::anyhow!("cannot enqueue a record for {topic}: {e}"))
}
