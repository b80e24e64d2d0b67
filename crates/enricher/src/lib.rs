//! enricher: consumes `enrich.requests`, calls the LLM at most once per idempotency key
//! (a stored result is re-emitted instead), validates the answer against the output
//! schema, stores it, and produces it to `enrich.results`. Replicas scale alone: they
//! share one consumer group, and leases keep two replicas off one key.

pub mod llm;
mod metrics;
pub mod process;
pub mod prompt;
pub mod scheduler;
pub mod store;
pub mod validate;

use enrich_common::config::Stage;
use enrich_common::service::StageRuntime;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::{Settings, kafka};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub use metrics::EnricherMetrics;
use process::Enricher;

const STAGE: Stage = Stage::Enricher;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs until `shutdown` is cancelled; in-flight calls finish, their results are
/// produced and their offsets committed before it returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let validator = validate::OutputValidator::new(&settings.llm.output_schema)?;
    let prompt = prompt::PromptTemplate::new(&settings.llm)?;
    let llm = llm::LlmClient::new(&settings.llm, &validator.schema)?;
    let topics = [settings.topics.requests.as_str(), settings.topics.results.as_str(), settings.topics.dlq.as_str()];
    let (runtime, mut metrics) = StageRuntime::start(
        &settings,
        STAGE,
        settings.enricher.http_port,
        &topics,
        &shutdown,
        EnricherMetrics::register,
    )
    .await?;
    metrics.stage = runtime.metrics.clone();
    let producer = kafka::producer(&settings, STAGE.as_str())?;
    let group = settings.group_id(STAGE);
    let consumer = kafka::consumer(&settings, &group, STAGE.as_str(), kafka::OffsetCommit::Stored)?;
    consumer.subscribe(&[&settings.topics.requests])?;
    let owner =
        settings.enricher.instance_id.clone().unwrap_or_else(|| format!("enricher-{:016x}", rand::random::<u64>()));
    tracing::info!(group, owner, model = llm.model(), prompt_version = prompt.version(), "consuming");

    let enricher = Arc::new(Enricher {
        store: store::Store {
            pool: runtime.pool.clone(),
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
    runtime.state.set_ready();

    let tuning = settings.enricher.tuning();
    let limit = Arc::new(Semaphore::new(settings.enricher.max_in_flight));
    loop {
        let batch = kafka::next_batch(&consumer, tuning, &shutdown).await;
        if batch.is_empty() {
            break;
        }
        for m in &batch {
            runtime.metrics.consumed(m.topic());
        }
        if !runtime.until_done(&shutdown, MAX_BACKOFF, || process_batch(&enricher, &batch, &limit)).await {
            break;
        }
        kafka::store_offsets(&consumer, &batch);
    }
    kafka::drain(&consumer, &enricher.producer);
    runtime.finish(&shutdown).await;
    Ok(())
}

/// Records of one Kafka key run in order; different keys run concurrently, up to
/// `enricher.max_in_flight`. Every record is finished (or known failed) on return.
async fn process_batch(enricher: &Arc<Enricher>, batch: &[OwnedMessage], limit: &Arc<Semaphore>) -> anyhow::Result<()> {
    let mut by_key: BTreeMap<(i32, Option<Vec<u8>>), Vec<OwnedMessage>> = BTreeMap::new();
    for m in batch {
        by_key.entry((m.partition(), m.key().map(<[u8]>::to_vec))).or_default().push(m.clone());
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
