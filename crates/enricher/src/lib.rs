//! enricher: consumes `enrich.requests`, calls the LLM at most once per idempotency key
//! (a stored result is re-emitted instead), validates the answer against the output
//! schema, stores it, and produces it to `enrich.results`. Replicas scale alone: they
//! share one consumer group, and leases keep two replicas off one key.

mod batch;
pub mod breaker;
pub mod budget;
pub mod cache;
mod consume;
mod delay;
pub mod failpoints;
pub mod flow;
pub mod kill_switch;
pub mod llm;
mod metrics;
pub mod policy;
pub mod process;
pub mod prompt;
pub mod scheduler;
pub mod store;
pub mod strict;
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
    let topics = [
        settings.topics.requests.as_str(),
        settings.topics.retry.as_str(),
        settings.topics.results.as_str(),
        settings.topics.dlq.as_str(),
    ];
    let (runtime, mut metrics) = StageRuntime::start(
        &settings,
        STAGE,
        settings.enricher.http_port,
        &topics,
        &shutdown,
        EnricherMetrics::register,
    )
    .await?;
    let refuse = kafka::TopicLimit::Refuse;
    let written =
        [(settings.topics.results.as_str(), refuse), (&settings.topics.retry, refuse), (&settings.topics.dlq, refuse)];
    kafka::check_topic_limits(&settings, &written).await?;
    // The stage-wide counters are the ones registered by the runtime.
    metrics.stage = runtime.metrics.clone();
    let producer = kafka::producer(&settings, STAGE.as_str())?;
    let group = settings.group_id(STAGE);
    let (rebalances, rebalance_rx) = consume::RebalanceEvents::new();
    let consumer = Arc::new(kafka::consumer_with_context(
        &settings,
        &group,
        STAGE.as_str(),
        kafka::OffsetCommit::Stored,
        rebalances,
    )?);
    kafka::spawn_lag_reporter(consumer.clone(), runtime.metrics.clone(), Duration::from_secs(5), shutdown.clone());
    // The retry topic's partitions are held, one by one, until their next record is due.
    consumer.subscribe(&[&settings.topics.requests, &settings.topics.retry])?;
    let owner =
        settings.enricher.instance_id.clone().unwrap_or_else(|| format!("enricher-{:016x}", rand::random::<u64>()));
    let limits = scheduler::Limits {
        // Records in progress: twice the LLM calls in flight, so storing and producing
        // finished records never keeps a call slot idle.
        max_in_flight: settings.enricher.max_in_flight * 2,
        max_buffered_per_partition: settings.enricher.max_buffered_per_partition,
        max_buffered_bytes: settings.enricher.max_buffered_bytes,
        ordering: match settings.enricher.ordering {
            OrderingMode::Key | OrderingMode::StrictKey => scheduler::Ordering::Key,
            OrderingMode::Partition => scheduler::Ordering::Partition,
        },
    };
    tracing::info!(group, owner, model = llm.model(), prompt_version = prompt.version(), ?limits, "consuming");
    if settings.enricher.failpoints {
        tracing::warn!(
            "enricher.failpoints is on: records marked [[enricher:abort]] abort this process (testing only)"
        );
    }

    let kill_switch = Arc::new(kill_switch::KillSwitch::default());
    kill_switch.spawn(
        runtime.pool.clone(),
        settings.pipeline.name.clone(),
        runtime.state.clone(),
        metrics.paused.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    );
    let limit_gauge = metrics.concurrency_limit.clone();
    let enricher = Arc::new(Enricher {
        store: store::Store::new(store::StoreCore {
            pool: runtime.pool.clone(),
            pipeline: settings.pipeline.name.clone(),
            owner,
            lease: Duration::from_millis(settings.enricher.lease_ms),
            call_timeout: Duration::from_millis(settings.llm.request_timeout_ms),
            max_attempts: settings.llm.max_attempts as i32,
            held: Default::default(),
        }),
        llm,
        prompt,
        validator,
        producer,
        results_topic: settings.topics.results.clone(),
        message_max_bytes: settings.kafka.message_max_bytes(),
        dlq_topic: settings.topics.dlq.clone(),
        metrics,
        flow: flow::Flow::new(
            flow::FlowSettings {
                max_concurrency: settings.enricher.max_in_flight,
                min_concurrency: settings.llm.min_concurrency,
                adaptive: settings.llm.adaptive_concurrency,
                latency_tolerance: settings.llm.latency_tolerance,
                requests_per_minute: settings.llm.requests_per_minute,
                tokens_per_minute: settings.llm.tokens_per_minute,
            },
            Box::new(move |limit| {
                limit_gauge.set(limit as i64);
            }),
        ),
        breaker: breaker::Breaker::new(
            settings.llm.breaker_failures,
            Duration::from_millis(settings.llm.breaker_open_ms),
        ),
        state: runtime.state.clone(),
        kill_switch: kill_switch.clone(),
        budgets: (!settings.llm.budgets.is_empty()).then(|| budget::Budgets {
            pool: runtime.pool.clone(),
            pipeline: settings.pipeline.name.clone(),
            windows: settings.llm.budgets.clone(),
        }),
        cache: (settings.llm.cache_ttl_secs > 0)
            .then(|| cache::ResponseCache::new(runtime.pool.clone(), Duration::from_secs(settings.llm.cache_ttl_secs))),
        failpoints: settings.enricher.failpoints,
        isolation: tokio::sync::Semaphore::new(1),
        keys_in_progress: Default::default(),
        dead_letters: enrich_common::dead_letter_sink::DeadLetterSink::new(
            &settings,
            STAGE,
            runtime.metrics.clone(),
            runtime.state.clone(),
        ),
        shutdown: shutdown.clone(),
        group: group.clone(),
        capture_content: settings.telemetry.capture_content,
        retry: process::RetryPolicy {
            topic: settings.topics.retry.clone(),
            quick_retries: settings.llm.quick_retries,
            max_rate_limited: settings.llm.max_rate_limited,
            delay: Duration::from_millis(settings.llm.retry_delay_ms),
            max_delay: Duration::from_millis(settings.llm.retry_max_delay_ms),
        },
        strict: (settings.enricher.ordering == OrderingMode::StrictKey)
            .then(|| strict::Blocks { pool: runtime.pool.clone(), pipeline: settings.pipeline.name.clone() }),
    });
    let sweeper = enricher.strict.is_some().then(|| {
        tokio::spawn(sweep_blocks(
            enricher.clone(),
            Duration::from_millis(settings.enricher.lease_ms),
            shutdown.clone(),
        ))
    });
    let renewal = enricher.store.core.spawn_renewal(shutdown.clone());
    runtime.state.set_ready();
    consume::run(&consumer, rebalance_rx, enricher.clone(), &runtime, limits, &settings.topics.retry, &shutdown).await;
    if let Some(sweeper) = sweeper {
        let _ = sweeper.await;
    }
    renewal.abort();
    kafka::drain(&consumer, &enricher.producer);
    runtime.finish(&shutdown).await;
    Ok(())
}

/// `strict-key`: releases the records parked behind a blocker that was resolved where no
/// release followed (a discard in the dlq-replayer, a process that died mid-release).
async fn sweep_blocks(enricher: Arc<Enricher>, stale: Duration, shutdown: CancellationToken) {
    let Some(blocks) = &enricher.strict else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let stalled = match blocks.stalled(stale).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for stalled key blocks");
                continue;
            }
        };
        for s in stalled {
            let done = if s.resolved {
                enricher.release_parked(&s.kafka_key, s.blocker.clone()).await
            } else {
                enricher.rerun_parked(&s.kafka_key, &s.blocker).await
            };
            if let Err(e) = done {
                tracing::warn!(blocker = %s.blocker, error = %e, "cannot release parked records");
            }
        }
    }
}
