//! enricher: consumes `enrich.requests`, calls the LLM at most once per idempotency key
//! (a stored result is re-emitted instead), validates the answer against the output
//! schema, stores it, and produces it to `enrich.results`. Replicas scale alone: they
//! share one consumer group, and leases keep two replicas off one key.

mod batch;
pub mod breaker;
mod consume;
pub mod llm;
mod metrics;
pub mod process;
pub mod prompt;
pub mod scheduler;
pub mod store;
pub mod validate;

use enrich_common::config::{OrderingMode, Stage};
use enrich_common::service::StageRuntime;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::{Settings, kafka};
use rdkafka::consumer::Consumer;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::EnricherMetrics;
use process::Enricher;

const STAGE: Stage = Stage::Enricher;

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
    // The stage-wide counters are the ones registered by the runtime.
    metrics.stage = runtime.metrics.clone();
    let producer = kafka::producer(&settings, STAGE.as_str())?;
    let group = settings.group_id(STAGE);
    let (rebalances, rebalance_rx) = consume::RebalanceEvents::new();
    let consumer =
        kafka::consumer_with_context(&settings, &group, STAGE.as_str(), kafka::OffsetCommit::Stored, rebalances)?;
    consumer.subscribe(&[&settings.topics.requests])?;
    let owner =
        settings.enricher.instance_id.clone().unwrap_or_else(|| format!("enricher-{:016x}", rand::random::<u64>()));
    let limits = scheduler::Limits {
        // Records in progress: twice the LLM calls in flight, so storing and producing
        // finished records never keeps a call slot idle.
        max_in_flight: settings.enricher.max_in_flight * 2,
        max_buffered_per_partition: settings.enricher.max_buffered_per_partition,
        ordering: match settings.enricher.ordering {
            OrderingMode::Key => scheduler::Ordering::Key,
            OrderingMode::Partition => scheduler::Ordering::Partition,
        },
    };
    tracing::info!(group, owner, model = llm.model(), prompt_version = prompt.version(), ?limits, "consuming");
    if settings.enricher.failpoints {
        tracing::warn!(
            "enricher.failpoints is on: records marked [[enricher:abort]] abort this process (testing only)"
        );
    }

    let enricher = Arc::new(Enricher {
        store: store::Store::new(store::StoreCore {
            pool: runtime.pool.clone(),
            pipeline: settings.pipeline.name.clone(),
            owner,
            lease: Duration::from_millis(settings.enricher.lease_ms),
            max_attempts: settings.llm.max_attempts as i32,
        }),
        llm,
        prompt,
        validator,
        producer,
        results_topic: settings.topics.results.clone(),
        dlq_topic: settings.topics.dlq.clone(),
        metrics,
        llm_slots: tokio::sync::Semaphore::new(settings.enricher.max_in_flight),
        breaker: breaker::Breaker::new(
            settings.llm.breaker_failures,
            Duration::from_millis(settings.llm.breaker_open_ms),
        ),
        state: runtime.state.clone(),
        failpoints: settings.enricher.failpoints,
        isolation: tokio::sync::Semaphore::new(1),
        keys_in_progress: Default::default(),
        dlq_limit: std::sync::Mutex::new(enrich_common::dlq_limit::DlqLimit::new(settings.dlq_limit.clone())),
        shutdown: shutdown.clone(),
    });
    runtime.state.set_ready();
    consume::run(&consumer, rebalance_rx, enricher.clone(), &runtime, limits, &shutdown).await;
    kafka::drain(&consumer, &enricher.producer);
    runtime.finish(&shutdown).await;
    Ok(())
}
