//! enricher: consumes `enrich.requests`, calls the LLM at most once per idempotency key
//! (a stored result is re-emitted instead), validates the answer against the output
//! schema, stores it, and produces it to `enrich.results`. Replicas scale alone: they
//! share one consumer group, and leases keep two replicas off one key.

pub mod llm;
mod metrics;
pub mod process;
pub mod prompt;
pub mod store;
pub mod validate;

use enrich_common::config::Stage;
use enrich_common::error::chain;
use enrich_common::http::{self, ServiceState};
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::{Settings, db, kafka};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub use metrics::EnricherMetrics;
use process::Enricher;

const STAGE: Stage = Stage::Enricher;

/// Runs until `shutdown` is cancelled; in-flight calls finish, their results are
/// produced and their offsets committed before it returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let validator = validate::OutputValidator::new(&settings.llm.output_schema)?;
    let prompt = prompt::PromptTemplate::new(&settings.llm)?;
    let llm = llm::LlmClient::new(&settings.llm, &validator.schema)?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = EnricherMetrics::register(&mut registry);
    let state = ServiceState::new(STAGE.as_str(), registry);
    let (addr, http_task) = http::serve(
        "0.0.0.0",
        settings.enricher.http_port,
        http::router(state.clone()),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "health and metrics endpoints listening");

    let pool = db::connect(&settings.database).await?;
    kafka::ensure_topics(
        &settings,
        &[
            &settings.topics.requests,
            &settings.topics.results,
            &settings.topics.dlq,
        ],
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
    consumer.subscribe(&[&settings.topics.requests])?;
    let owner = settings
        .enricher
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("enricher-{:016x}", rand::random::<u64>()));
    tracing::info!(
        group,
        owner,
        model = llm.model(),
        prompt_version = prompt.version(),
        "consuming"
    );

    let enricher = Arc::new(Enricher {
        store: store::Store {
            pool,
            pipeline: settings.pipeline.name.clone(),
            owner,
            lease: Duration::from_millis(settings.enricher.lease_ms),
            max_attempts: settings.llm.max_attempts as i32,
        },
        llm,
        prompt,
        validator,
        producer,
        results_topic: settings.topics.results.clone(),
        dlq_topic: settings.topics.dlq.clone(),
        metrics,
        shutdown: shutdown.clone(),
    });
    state.set_ready();
    let result = consume(&enricher, &consumer, &settings, &state, &shutdown).await;
    if let Err(e) = enricher
        .producer
        .flush(Timeout::After(Duration::from_secs(10)))
    {
        tracing::warn!(error = %e, "producer flush on shutdown failed");
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("offsets committed on shutdown"),
        Err(e) => tracing::info!(error = %e, "no offsets to commit on shutdown"),
    }
    shutdown.cancel();
    let _ = http_task.await;
    result
}

async fn consume(
    enricher: &Arc<Enricher>,
    consumer: &StreamConsumer,
    settings: &Settings,
    state: &Arc<ServiceState>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let tuning = settings.enricher.tuning();
    let limit = Arc::new(Semaphore::new(settings.enricher.max_in_flight));
    loop {
        let batch = kafka::next_batch(consumer, tuning, shutdown).await;
        if batch.is_empty() {
            return Ok(());
        }
        for m in &batch {
            EnricherMetrics::inc(&enricher.metrics.consumed, "topic", m.topic());
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            match process_batch(enricher, &batch, &limit).await {
                Ok(()) => {
                    kafka::store_offsets(consumer, &batch);
                    state.set_ready();
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        tracing::info!(error = %chain(e.as_ref()), "batch left unfinished at shutdown; it will be read again");
                        return Ok(());
                    }
                    enricher.metrics.batch_retries.inc();
                    let cause = chain(e.as_ref());
                    tracing::error!(error = %cause, retry_in_ms = backoff.as_millis() as u64, "batch failed; retrying");
                    state.set_not_ready(format!("batch failing: {cause}"));
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// Records of one Kafka key run in order; different keys run concurrently, up to
/// `enricher.max_in_flight`. Every record is finished (or known failed) on return.
async fn process_batch(
    enricher: &Arc<Enricher>,
    batch: &[OwnedMessage],
    limit: &Arc<Semaphore>,
) -> anyhow::Result<()> {
    let mut by_key: BTreeMap<(i32, Option<Vec<u8>>), Vec<OwnedMessage>> = BTreeMap::new();
    for m in batch {
        by_key
            .entry((m.partition(), m.key().map(<[u8]>::to_vec)))
            .or_default()
            .push(m.clone());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (_, records) in by_key {
        let permit = limit.clone().acquire_owned().await?;
        let enricher = enricher.clone();
        tasks.spawn(async move {
            let _permit = permit;
            for m in &records {
                enricher.handle(m).await?;
            }
            anyhow::Ok(())
        });
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
