//! publisher: consumes `enrich.results` and writes each key's merged output (the
//! original JSON plus an `enrichment` object) once to the output topic. A batch goes in
//! three steps: each key is bound in PostgreSQL to the one results record that may
//! publish it (committed first); the outputs, dead letters and consumed offsets commit
//! in one Kafka transaction, so `read_committed` consumers never see a record twice;
//! then the keys are marked `published` (or `dead_lettered`), retried until stored,
//! before the next batch. A publisher that stops between the last two leaves bindings
//! behind its committed offsets, which the next owner of the partition settles.

use enrich_common::error::Reason;
use enrich_common::key_state::publish as binding;
pub mod failpoints;
mod merge;
mod metrics;

use enrich_common::config::Stage;
use enrich_common::dead_letter_sink::DeadLetterSink;
use enrich_common::envelope::Envelope;
use enrich_common::error::{RecordError, chain};
use enrich_common::service::StageRuntime;
use enrich_common::shutdown::Shutdown as CancellationToken;
use enrich_common::spans::{ChildSpan, RecordSpan, attr};
use enrich_common::{ErrorClass, Settings, TraceContext, headers, kafka};
use opentelemetry::KeyValue;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

pub use merge::{merge_output, source_of};
pub use metrics::PublisherMetrics;

const STAGE: Stage = Stage::Publisher;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

struct Publisher {
    settings: Settings,
    group: String,
    runtime: StageRuntime,
    producer: FutureProducer,
    metrics: PublisherMetrics,
    /// How long one transactional call may block: the transaction timeout. A call that
    /// did not complete in it is called again (commit, abort) or fails the batch.
    call_timeout: Duration,
    /// The DLQ limit, and dead letters built to fit.
    dead_letters: DeadLetterSink,
    /// Records of the results topic whose output the producer or the broker refused as
    /// too large (`MSG_SIZE_TOO_LARGE`; of a refused batch, its largest output): the batch
    /// is aborted, and read again they are dead-lettered `too_large` instead of being sent
    /// again for ever; forgotten once the batch that dead-letters them has committed.
    refused: std::sync::Mutex<HashSet<(i32, i64)>>,
    /// This process's name in `publish_partitions` (its transactional id).
    owner: String,
    /// The epoch under which this publisher took each partition it was assigned
    /// (`key_state::publish::take_partitions`): it binds records under it.
    epochs: std::sync::Mutex<HashMap<i32, i64>>,
    /// Records of the results topic whose pending dead letters this process recorded, until
    /// the transaction carrying them commits: read again after an abort, their rows are
    /// dropped and recorded anew (the new round may decide otherwise).
    pending: std::sync::Mutex<HashSet<(i32, i64)>>,
}

impl Publisher {
    fn refuse(&self, at: (i32, i64)) {
        if let Ok(mut refused) = self.refused.lock() {
            refused.insert(at);
        }
    }

    fn forget_committed(&self, committed: &[(i32, i64)]) {
        for set in [&self.refused, &self.pending] {
            if let Ok(mut set) = set.lock()
                && !set.is_empty()
            {
                for at in committed {
                    set.remove(at);
                }
            }
        }
    }

    /// The records (partition, offset) whose pending dead letters this process recorded.
    fn pending_recorded(&self, at: impl Iterator<Item = (i32, i64)>) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.extend(at);
        }
    }

    /// Of `at`, the records whose pending dead letters this process recorded in a round
    /// that has not committed.
    fn uncommitted_pending(&self, at: impl Iterator<Item = (i32, i64)>) -> Vec<(i32, i64)> {
        match self.pending.lock() {
            Ok(pending) if !pending.is_empty() => at.filter(|a| pending.contains(a)).collect(),
            _ => Vec::new(),
        }
    }

    fn was_refused(&self, at: (i32, i64)) -> bool {
        self.refused.lock().is_ok_and(|r| r.contains(&at))
    }

    /// `value`, unless its output record cannot be produced: larger than the producer's
    /// `message.max.bytes` as librdkafka counts it (value, key, the three headers this
    /// stage writes, framing), or refused already.
    fn fitting(
        &self,
        env: &Envelope,
        at: (i32, i64),
        tracestate: usize,
        value: Vec<u8>,
    ) -> Result<Vec<u8>, RecordError> {
        let topic = &self.settings.topics.output;
        let limit = self.settings.kafka.message_max_bytes();
        let key = env.source.as_ref().and_then(|s| s.key.as_ref()).map_or(0, Vec::len);
        let headers = (headers::IDEMPOTENCY_KEY.len() + env.idempotency_key.len() + 10)
            + (headers::TRACEPARENT.len() + 55 + 10)
            + (headers::TRACESTATE.len() + tracestate + 10);
        let size = value.len() + key + headers + RECORD_FRAMING;
        if size > limit {
            return Err(RecordError::new(
                ErrorClass::Permanent,
                Reason::TooLarge,
                format!(
                    "the merged output makes a record of {size} bytes for {topic}; the producer's message.max.bytes is {limit}"
                ),
            ));
        }
        if self.was_refused(at) {
            return Err(RecordError::new(
                ErrorClass::Permanent,
                Reason::TooLarge,
                format!(
                    "the merged output ({size} bytes) was refused as too large for {topic} (the topic's max.message.bytes is lower than message.max.bytes)"
                ),
            ));
        }
        Ok(value)
    }
}

/// librdkafka's framing of one record, at most (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`).
const RECORD_FRAMING: usize = 36;

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
    let written =
        [(settings.topics.output.as_str(), kafka::TopicLimit::Warn), (&settings.topics.dlq, kafka::TopicLimit::Refuse)];
    kafka::check_topic_limits(&settings, &written).await?;
    let transactional_id = settings
        .publisher
        .transactional_id
        .clone()
        // Two publishers on one host never share a default id: the port of this process's
        // health endpoint is part of it.
        .unwrap_or_else(|| format!("{}.publisher.{}.{}", settings.pipeline.name, hostname(), runtime.addr.port()));
    let producer = transactional_producer(&settings, &transactional_id)?;
    // Fences any earlier incarnation with this id and aborts its open transaction.
    let call_timeout = Duration::from_millis(settings.publisher.transaction_timeout_ms);
    tokio::task::block_in_place(|| producer.init_transactions(call_timeout))
        .map_err(|e| anyhow::anyhow!("init_transactions ({transactional_id}): {e}"))?;
    let group = settings.group_id(STAGE);
    let consumer = std::sync::Arc::new(kafka::consumer_with_context(
        &settings,
        &group,
        STAGE.as_str(),
        kafka::OffsetCommit::Transactional,
        Rebalances::default(),
    )?);
    kafka::spawn_lag_reporter(consumer.clone(), runtime.metrics.clone(), Duration::from_secs(5), shutdown.clone());
    consumer.subscribe(&[&settings.topics.results])?;
    tracing::info!(group, transactional_id, "consuming");
    runtime.state.set_ready();

    let dead_letters = DeadLetterSink::new(&settings, STAGE, runtime.metrics.clone(), runtime.state.clone());
    let publisher = Publisher {
        settings,
        group: group.clone(),
        runtime,
        producer,
        metrics,
        call_timeout,
        dead_letters,
        refused: Default::default(),
        owner: transactional_id.clone(),
        epochs: Default::default(),
        pending: Default::default(),
    };
    let consumed = consume(&publisher, &consumer, &shutdown).await;
    publisher.runtime.finish(&shutdown).await;
    consumed
}

impl Publisher {
    /// Partitions revoked: their epochs are no longer this publisher's to bind under.
    fn forget(&self, revoked: &HashSet<(String, i32)>) {
        if revoked.is_empty() {
            return;
        }
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.retain(|p, _| !revoked.iter().any(|(t, r)| *r == *p && *t == self.settings.topics.results));
        }
    }
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
        match tokio::task::block_in_place(|| publisher.producer.abort_transaction(publisher.call_timeout)) {
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

/// Partitions revoked from the consumer while it gathered a batch, and whether any were
/// assigned since the last look (a new owner settles what an old one left behind).
#[derive(Default)]
struct Rebalances {
    revoked: std::sync::Mutex<HashSet<(String, i32)>>,
    /// Partitions assigned since the last look (to be taken in `publish_partitions`).
    assigned: std::sync::Mutex<std::collections::BTreeSet<i32>>,
}

impl Rebalances {
    fn take_revoked(&self) -> HashSet<(String, i32)> {
        self.revoked.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default()
    }

    fn take_assigned(&self) -> Vec<i32> {
        self.assigned.lock().map(|mut a| std::mem::take(&mut *a).into_iter().collect()).unwrap_or_default()
    }

    /// Partitions to take again (their epoch was taken by another publisher while this
    /// consumer still has them assigned).
    fn take_again(&self, partitions: &[i32]) {
        if let Ok(mut assigned) = self.assigned.lock() {
            assigned.extend(partitions);
        }
    }
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance
            && let (Ok(mut revoked), Ok(mut assigned)) = (self.revoked.lock(), self.assigned.lock())
        {
            for e in list.elements() {
                revoked.insert((e.topic().to_string(), e.partition()));
                // Assigned and revoked again before it was taken: not this consumer's to take.
                assigned.remove(&e.partition());
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance
            && let Ok(mut assigned) = self.assigned.lock()
        {
            assigned.extend(list.elements().iter().map(|e| e.partition()));
        }
    }
}

type ResultsConsumer = StreamConsumer<Rebalances>;

/// Why a batch did not go through.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// Nothing of the batch was committed to Kafka (the transaction, if begun, was
    /// aborted): the batch is read again.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// The batch would pass the DLQ limit: it is held (read again later), the stage
    /// says why.
    #[error("{0}")]
    Held(String),
    #[error(transparent)]
    Fatal(#[from] ProducerFatal),
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<ProducerFatal>() {
            Ok(fatal) => Failed::Fatal(fatal),
            Err(e) => Failed::Retry(e),
        }
    }
}

/// A batch that failed before its Kafka commit is read again from Kafka (not retried in
/// memory): the failure may be a rebalance, which only a poll resolves. A batch whose
/// Kafka commit succeeded is never read again: its settlement is retried until it is
/// stored.
async fn consume(
    publisher: &Publisher,
    consumer: &ResultsConsumer,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let tuning = publisher.settings.publisher.tuning();
    let runtime = &publisher.runtime;
    let mut backoff = Duration::from_millis(200);
    loop {
        let assigned = consumer.context().take_assigned();
        if !assigned.is_empty() && !take_and_reconcile(publisher, consumer, &assigned, shutdown).await {
            return Ok(());
        }
        publisher.forget(&consumer.context().take_revoked());
        let mut batch = tokio::select! {
            batch = kafka::next_batch(consumer, tuning, shutdown) => batch,
            waiting = stalled(consumer) => {
                // Seen after the broker was stopped for longer than the session and the
                // transaction timeouts: the consumer no longer fetches. A new process
                // (its supervisor's) starts from the committed offsets.
                let why = format!("the consumer has delivered nothing for {} s while {waiting} records wait", STALL.as_secs() * 2);
                tracing::error!("{why}; stopping for a restart");
                runtime.state.set_not_ready(why.clone());
                return Err(anyhow::anyhow!(why));
            }
        };
        if batch.is_empty() {
            return Ok(());
        }
        // Records of a partition revoked meanwhile belong to its new owner now: they
        // leave the batch (their offsets are not committed here). Where the partition came
        // back to this consumer, it is read again from them.
        let revoked = consumer.context().take_revoked();
        publisher.forget(&revoked);
        if !revoked.is_empty() {
            let (dropped, kept): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|m| revoked.contains(&(m.topic().to_string(), m.partition())));
            tracing::info!(dropped = dropped.len(), ?revoked, "records of revoked partitions left the batch");
            // A partition given back meanwhile is read from where its other owner
            // committed: below that, its records were published or dead-lettered there.
            tokio::task::block_in_place(|| rewind_to_committed(consumer, &dropped))?;
            batch = kept;
            if batch.is_empty() {
                continue;
            }
        }
        // Partitions assigned while the batch was read are taken before their records
        // are bound; a record of a partition this publisher never took (none should be
        // left) is read again rather than skipped: skipped, its offset would be committed.
        let assigned = consumer.context().take_assigned();
        if !assigned.is_empty() && !take_and_reconcile(publisher, consumer, &assigned, shutdown).await {
            return Ok(());
        }
        let epochs = publisher.epochs.lock().map(|e| e.clone()).unwrap_or_default();
        if batch.iter().any(|m| !epochs.contains_key(&m.partition())) {
            let (untaken, kept): (Vec<_>, Vec<_>) =
                batch.into_iter().partition(|m| !epochs.contains_key(&m.partition()));
            tracing::warn!(records = untaken.len(), "records of partitions not taken yet are read again");
            rewind(consumer, &untaken)?;
            batch = kept;
            if batch.is_empty() {
                continue;
            }
        }
        for m in &batch {
            runtime.metrics.consumed(m.topic());
        }
        match publish_batch(publisher, consumer, &batch, &epochs, shutdown).await {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                runtime.state.set_ready();
            }
            Err(Failed::Fatal(e)) => {
                tracing::error!(error = %e, "stopping: a new publisher takes over where this one committed");
                return Err(e.into());
            }
            Err(Failed::Held(_)) => {
                // Read again in a while: the limit may allow it then (good records of
                // other partitions), or the stage is restarted with the cause fixed.
                rewind(consumer, &batch)?;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            Err(Failed::Retry(e)) => {
                runtime.metrics.batch_retries.inc();
                let cause = chain(e.as_ref());
                tracing::error!(error = %cause, "batch not committed; it will be read again");
                runtime.state.set_not_ready(format!("transactions failing: {cause}"));
                rewind(consumer, &batch)?;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// How often a consumer that delivers nothing is asked whether records wait for it.
const STALL: Duration = Duration::from_secs(30);

/// Returns once two looks `STALL` apart both found records waiting past the group's
/// committed offsets of the assigned partitions (how many): a consumer that should be
/// delivering and is not. Never returns while nothing waits or the broker cannot be
/// asked.
async fn stalled(consumer: &ResultsConsumer) -> i64 {
    let mut seen_waiting = false;
    loop {
        tokio::time::sleep(STALL).await;
        let waiting = tokio::task::block_in_place(|| -> rdkafka::error::KafkaResult<i64> {
            let timeout = Duration::from_secs(5);
            let committed = consumer.committed(timeout)?;
            let mut waiting = 0;
            for e in committed.elements() {
                let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
                let from = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => low,
                };
                waiting += (high - from).max(0);
            }
            Ok(waiting)
        });
        match waiting {
            Ok(n) if n > 0 && seen_waiting => return n,
            Ok(n) => seen_waiting = n > 0,
            Err(_) => seen_waiting = false,
        }
    }
}

/// Takes the partitions just assigned that the consumer still has (their epochs move on:
/// an earlier owner binds none of their records any more), once, then settles what
/// earlier owners left (retried on its own: a retried take could take a partition this
/// consumer lost meanwhile). False on shutdown.
async fn take_and_reconcile(
    publisher: &Publisher,
    consumer: &ResultsConsumer,
    assigned: &[i32],
    shutdown: &CancellationToken,
) -> bool {
    let runtime = &publisher.runtime;
    let pipeline = &publisher.settings.pipeline.name;
    let results = &publisher.settings.topics.results;
    let take = || async {
        let current = consumer.assignment()?;
        let still: Vec<i32> =
            assigned.iter().copied().filter(|p| current.find_partition(results, *p).is_some()).collect();
        if still.is_empty() {
            return Ok(());
        }
        let taken = binding::take_partitions(&runtime.pool, pipeline, &publisher.owner, &still).await?;
        if let Ok(mut epochs) = publisher.epochs.lock() {
            epochs.extend(taken);
        }
        anyhow::Ok(())
    };
    runtime.until_done(shutdown, MAX_BACKOFF, take).await
        && runtime.until_done(shutdown, MAX_BACKOFF, || reconcile(publisher, consumer)).await
}

/// Settles what any publisher bound and committed but did not settle (it stopped, or lost
/// its database, between the two): a binding or a pending dead letter whose record is
/// behind the group's committed offset was carried by a committed transaction.
async fn reconcile(publisher: &Publisher, consumer: &ResultsConsumer) -> anyhow::Result<()> {
    let pipeline = &publisher.settings.pipeline.name;
    let results = &publisher.settings.topics.results;
    let (bound, pending) = binding::unsettled(&publisher.runtime.pool, pipeline).await?;
    if bound.is_empty() && pending.is_empty() {
        return Ok(());
    }
    let partitions: std::collections::BTreeSet<i32> =
        bound.iter().map(|b| b.partition).chain(pending.iter().map(|p| p.0)).collect();
    let mut asked = TopicPartitionList::new();
    for p in &partitions {
        asked.add_partition(results, *p);
    }
    let committed = tokio::task::block_in_place(|| consumer.committed_offsets(asked, Duration::from_secs(10)))?;
    let committed_at = |partition: i32| match committed.find_partition(results, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => -1,
    };
    let bound: Vec<_> = bound.into_iter().filter(|b| b.offset < committed_at(b.partition)).collect();
    let pending: Vec<_> = pending.into_iter().filter(|(p, o)| *o < committed_at(*p)).collect();
    if bound.is_empty() && pending.is_empty() {
        return Ok(());
    }
    let settled = binding::settle(&publisher.runtime.pool, pipeline, &bound, &pending).await?;
    tracing::info!(
        keys = settled.keys,
        dead_letters = settled.dead_letters,
        "settled what an earlier publisher committed to Kafka but had not recorded"
    );
    Ok(())
}

/// Seeks every partition of `batch` still assigned to this consumer back to its first
/// record, so those records are read again. A seek that fails would let the next batch
/// commit past records never published: the stage stops instead, and its successor
/// starts from the committed offsets.
fn rewind(consumer: &ResultsConsumer, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    // A partition no longer assigned: its new owner reads it from the committed offset.
    for ((topic, partition), offset) in first_assigned(consumer, batch)? {
        consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(10)).map_err(|e| {
            anyhow::anyhow!("cannot seek {topic}/{partition} back to {offset} to read an uncommitted batch again: {e}")
        })?;
    }
    Ok(())
}

/// As [`rewind`], for records of partitions revoked while the batch was read: each
/// partition assigned again meanwhile is read from the group's committed offset (as a
/// fresh assignment is), which its other owner may have moved past these records; from
/// the first of them when nothing is committed. Blocking: asks the group coordinator.
fn rewind_to_committed(consumer: &ResultsConsumer, dropped: &[OwnedMessage]) -> anyhow::Result<()> {
    let first = first_assigned(consumer, dropped)?;
    if first.is_empty() {
        return Ok(());
    }
    let mut partitions = TopicPartitionList::new();
    for (topic, partition) in first.keys() {
        partitions.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot read the committed offsets of the partitions given back: {e}"))?;
    for ((topic, partition), first) in first {
        let element = committed.find_partition(&topic, partition);
        if let Some(Err(e)) = element.as_ref().map(|e| e.error()) {
            anyhow::bail!("cannot read the committed offset of {topic}/{partition}, given back: {e}");
        }
        // Nothing committed yet: its records from the first this batch read.
        let offset = match element.map(|e| e.offset()) {
            Some(Offset::Offset(at)) => at,
            _ => first,
        };
        consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(10)).map_err(|e| {
            anyhow::anyhow!("cannot seek {topic}/{partition} given back to its committed offset {offset}: {e}")
        })?;
    }
    Ok(())
}

/// Per partition of `batch` still assigned to this consumer, the offset of its first
/// record there.
fn first_assigned(
    consumer: &ResultsConsumer,
    batch: &[OwnedMessage],
) -> anyhow::Result<std::collections::BTreeMap<(String, i32), i64>> {
    let mut first: std::collections::BTreeMap<(String, i32), i64> = std::collections::BTreeMap::new();
    for m in batch {
        let e = first.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
        *e = (*e).min(m.offset());
    }
    let assigned = consumer.assignment()?;
    first.retain(|(topic, partition), _| assigned.find_partition(topic, *partition).is_some());
    Ok(first)
}

/// One key's result in the batch: a copy of the key, the source object its output is
/// built on (or why there is none), and where its record is.
struct Candidate {
    env: Envelope,
    trace: RecordSpan,
    partition: i32,
    offset: i64,
    source: Result<serde_json::Map<String, serde_json::Value>, RecordError>,
    /// The length of the `tracestate` its output record will carry.
    tracestate: usize,
}

impl Candidate {
    fn at(&self) -> binding::Bound {
        binding::Bound { key: self.env.idempotency_key.clone(), partition: self.partition, offset: self.offset }
    }
}

/// A record that is no result at all (not an envelope, or one without a result).
struct Reject {
    env: Envelope,
    trace: RecordSpan,
    partition: i32,
    offset: i64,
    error: RecordError,
}

/// One batch in three steps: bind its keys to its records and record its dead letters
/// as pending (committed in PostgreSQL); one Kafka transaction with the outputs, the
/// dead letters and the consumed offsets; then settle the keys and dead letters it
/// carried, retried until stored.
/// `epochs`: the epoch under which this publisher took each partition of the batch.
async fn publish_batch(
    publisher: &Publisher,
    consumer: &ResultsConsumer,
    batch: &[OwnedMessage],
    epochs: &HashMap<i32, i64>,
    shutdown: &CancellationToken,
) -> Result<(), Failed> {
    let pipeline = &publisher.settings.pipeline.name;
    let topics = &publisher.settings.topics;
    let (mut candidates, mut rejects) = decode(publisher, batch);
    // The DLQ limit, as in every stage: a dead letter that would pass it is held, with
    // every later record of its partition (read again later); the other partitions go on.
    let dead_at: HashSet<(i32, i64)> = rejects
        .iter()
        .map(|r| (r.partition, r.offset))
        .chain(candidates.iter().filter(|c| c.source.is_err()).map(|c| (c.partition, c.offset)))
        .collect();
    // Per held partition, the offset from which its records wait.
    let (mut ok, mut dead, mut why) = (0, 0, None);
    let mut held_from: HashMap<i32, i64> = HashMap::new();
    for m in batch {
        if held_from.contains_key(&m.partition()) {
            continue;
        }
        if !dead_at.contains(&(m.partition(), m.offset())) {
            ok += 1;
        } else if let Err(e) = publisher.dead_letters.check(dead + 1, ok) {
            held_from.insert(m.partition(), m.offset());
            why = Some(e);
        } else {
            dead += 1;
        }
    }
    let kept_at = |p: i32, o: i64| held_from.get(&p).is_none_or(|from| o < *from);
    // Only a batch that holds something is copied.
    let kept: Vec<OwnedMessage>;
    let batch = match why {
        None => batch,
        Some(why) => {
            let (k, held): (Vec<OwnedMessage>, Vec<OwnedMessage>) =
                batch.iter().cloned().partition(|m| kept_at(m.partition(), m.offset()));
            if k.is_empty() {
                return Err(Failed::Held(why));
            }
            rewind(consumer, &held)?;
            candidates.retain(|c| kept_at(c.partition, c.offset));
            rejects.retain(|r| kept_at(r.partition, r.offset));
            kept = k;
            kept.as_slice()
        }
    };

    // 1. Bind. A key bound to another record (or no longer `enriched`) is not ours, nor
    // is a record of a partition another publisher took since this one did.
    let claims: Vec<binding::Claim> = candidates
        .iter()
        .map(|c| binding::Claim {
            epoch: epochs.get(&c.partition).copied().unwrap_or(-1),
            key: &c.env.idempotency_key,
            partition: c.partition,
            offset: c.offset,
            outcome: if c.source.is_ok() { binding::Outcome::Published } else { binding::Outcome::DeadLettered },
            trace_id: c.trace.ids().trace_id_hex(),
        })
        .collect();
    // PRODUCER spans end when the transaction is over.
    let mut sends: Vec<ChildSpan> = Vec::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    for r in &rejects {
        let at = (r.partition, r.offset);
        dead.push(dead_letter_of(
            &publisher.dead_letters,
            &mut sends,
            &topics.dlq,
            &r.env,
            &r.trace,
            &r.error,
            at,
            None,
        ));
    }
    let mut clock = std::time::Instant::now();
    // Per candidate, the output of the record bound to its key (None: not bound).
    let outputs: Vec<Output> = async {
        let mut tx = publisher.runtime.pool.begin().await?;
        let binding::Binding { mut bound, unheld } = binding::bind(&mut tx, pipeline, &claims).await?;
        if !unheld.is_empty() {
            // Another publisher took these partitions since this one did (it lost them and
            // was given them back, or it is a zombie still holding them): nothing of the
            // batch is skipped or committed; the partitions still assigned are taken again
            // and the batch read again.
            if let Ok(mut epochs) = publisher.epochs.lock() {
                epochs.retain(|p, _| !unheld.contains(p));
            }
            consumer.context().take_again(&unheld);
            anyhow::bail!("partitions {unheld:?} were taken by another publisher since this one took them");
        }
        let outputs: Vec<Output> =
            candidates.iter().map(|c| bound.remove(&c.at()).map(|stored| output_of(publisher, c, stored))).collect();
        // An output that cannot be built from the stored result (or does not fit) is known
        // only now: its key is bound to be dead-lettered, in this same transaction.
        let unbuildable: Vec<binding::Bound> = candidates
            .iter()
            .zip(&outputs)
            .filter(|(c, o)| matches!(o, Some(Err(_))) && c.source.is_ok())
            .map(|(c, _)| c.at())
            .collect();
        binding::rebind_dead_lettered(&mut tx, pipeline, &unbuildable).await?;
        // A key that cannot be merged is dead-lettered by the record it is bound to.
        for (c, output) in candidates.iter().zip(&outputs) {
            if let Some(Err(error)) = output {
                let key = c.env.source.as_ref().and_then(|s| s.key.clone());
                dead.push(dead_letter_of(
                    &publisher.dead_letters,
                    &mut sends,
                    &topics.dlq,
                    &c.env,
                    &c.trace,
                    error,
                    (c.partition, c.offset),
                    key,
                ));
            }
        }
        let contexts: Vec<TraceContext> = sends.iter().map(|s| s.ids().clone()).collect();
        let pending: Vec<_> = dead.iter().zip(&contexts).map(|((letter, _, _, at), ctx)| (letter, ctx, *at)).collect();
        // Pending dead letters this process recorded for these records in a round that
        // did not commit are void: the round binding them again records its own. (Rows
        // another publisher recorded are never touched.)
        let void: Vec<(i32, i64)> = publisher.uncommitted_pending(
            candidates.iter().map(|c| (c.partition, c.offset)).chain(rejects.iter().map(|r| (r.partition, r.offset))),
        );
        enrich_common::dead_letter_store::drop_pending_at(&mut *tx, pipeline, &void).await?;
        enrich_common::dead_letter_store::record_pending(&mut *tx, &pending).await?;
        tx.commit().await?;
        publisher.pending_recorded(dead.iter().map(|(_, _, _, at)| *at));
        anyhow::Ok(outputs)
    }
    .await?;
    let mine: Vec<bool> = outputs.iter().map(Option::is_some).collect();
    let bound_keys: HashSet<&str> =
        candidates.iter().zip(&mine).filter(|(_, m)| **m).map(|(c, _)| c.env.idempotency_key.as_str()).collect();

    publisher.metrics.phase("bind", &mut clock);

    // 2. The Kafka transaction.
    tokio::task::block_in_place(|| publisher.producer.begin_transaction()).map_err(|e| match e {
        rdkafka::error::KafkaError::Transaction(t) if t.is_fatal() => Failed::Fatal(ProducerFatal(t.to_string())),
        e => Failed::Retry(anyhow::anyhow!("begin_transaction: {e}")),
    })?;
    let mut published = Vec::new();
    let in_transaction = async {
        // Each with the results record whose output it is (and its size), if it is one.
        let mut deliveries: Vec<(DeliveryFuture, Option<OutputAt>)> = Vec::new();
        for (c, output) in candidates.iter().zip(&outputs) {
            let Some(output) = output else {
                // Another copy of the key in this batch is the one bound.
                let outcome = if bound_keys.contains(c.env.idempotency_key.as_str()) {
                    "duplicate_result"
                } else {
                    "already_published"
                };
                publisher.metrics.outcome(outcome);
                continue;
            };
            if let Ok(value) = output {
                let out = c.trace.producer(&topics.output);
                let h = out.ids().inject(headers::owned(&[(headers::IDEMPOTENCY_KEY, &c.env.idempotency_key)]));
                sends.push(out);
                let key = c.env.source.as_ref().and_then(|s| s.key.as_deref());
                let at = (c.partition, c.offset);
                let sent = send(&publisher.producer, &topics.output, key, value, h).inspect_err(|e| {
                    if kafka::is_too_large(e) {
                        publisher.refuse(at);
                    }
                })?;
                deliveries.push((sent, Some((at, value.len()))));
                published.push(c);
            }
        }
        for (letter, h, key, _) in &dead {
            let sent = send(&publisher.producer, &topics.dlq, key.as_deref(), &letter.encode_to_bytes(), h.clone())?;
            deliveries.push((sent, None));
        }
        // The broker refuses a whole batch of records when it is over the topic's
        // `max.message.bytes`, and every record of it fails alike: only the largest output
        // refused is taken for too large (dead-lettered when read again); the others go
        // again, and if the batch is still refused, the next largest, one per round.
        let mut failed: Option<anyhow::Error> = None;
        let mut largest_refused: Option<((i32, i64), usize)> = None;
        for (d, output_of) in deliveries {
            let delivered = d.await.map_err(|_| anyhow::anyhow!("producer dropped a delivery"))?;
            if let Err((e, _)) = delivered {
                let e = anyhow::Error::new(e);
                if let Some((at, len)) = output_of
                    && kafka::is_too_large(&e)
                    && largest_refused.is_none_or(|(_, l)| len > l)
                {
                    largest_refused = Some((at, len));
                }
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            if let Some((at, _)) = largest_refused {
                publisher.refuse(at);
            }
            return Err(e);
        }
        publisher.metrics.phase("produce", &mut clock);
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in kafka::next_offsets(batch) {
            offsets.add_partition_offset(&topic, partition, Offset::Offset(next))?;
        }
        let group = consumer.group_metadata().ok_or_else(|| anyhow::anyhow!("consumer has no group metadata"))?;
        tokio::task::block_in_place(|| {
            publisher.producer.send_offsets_to_transaction(&offsets, &group, publisher.call_timeout)
        })?;
        publisher.metrics.phase("offsets", &mut clock);
        anyhow::Ok(())
    };
    let committed = match in_transaction.await {
        Ok(()) => {
            failpoints::pass(pipeline, failpoints::Instant::BeforeKafkaCommit).await;
            commit(publisher, shutdown).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        if e.downcast_ref::<ProducerFatal>().is_some() {
            return Err(e.into());
        }
        abort(publisher, shutdown).await.map_err(|abort| abort.context(format!("aborting after: {e:#}")))?;
        return Err(Failed::Retry(e));
    }
    publisher.metrics.phase("commit", &mut clock);
    failpoints::pass(pipeline, failpoints::Instant::AfterKafkaCommit).await;
    // The refused outputs and pending dead letters of this batch are committed: never
    // read again.
    publisher.forget_committed(&records_at(batch));
    publisher.runtime.metrics.produced(&topics.output, published.len() as u64);
    publisher.runtime.metrics.produced(&topics.dlq, dead.len() as u64);

    // 3. Settle, before the next batch: the output is committed, and nothing of this
    // batch is read again.
    let settled_keys: Vec<binding::Bound> =
        candidates.iter().zip(&mine).filter(|(_, m)| **m).map(|(c, _)| c.at()).collect();
    let records: Vec<(i32, i64)> = dead.iter().map(|(_, _, _, at)| *at).collect();
    let settled = publisher
        .runtime
        .until_done(shutdown, MAX_BACKOFF, || async {
            binding::settle(&publisher.runtime.pool, pipeline, &settled_keys, &records).await?;
            Ok(())
        })
        .await;
    publisher.metrics.phase("settle", &mut clock);
    if !settled {
        tracing::info!("shutting down before the batch was settled; the next publisher settles it");
    }
    for (letter, _, _, _) in &dead {
        if let Some(failure) = letter.failure() {
            publisher.runtime.metrics.dead_lettered(&failure.reason);
        }
    }
    publisher.dead_letters.recorded(dead.len(), published.len());
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    for c in &published {
        publisher.metrics.outcome("published");
        c.trace.set([KeyValue::new(attr::OUTCOME, "published")]);
        let source_ms = c.env.source.as_ref().map(|s| s.timestamp_ms).unwrap_or(0);
        if source_ms > 0 && now_ms >= source_ms {
            publisher.metrics.end_to_end.observe((now_ms - source_ms) as f64 / 1000.0);
        }
    }
    for (c, output) in candidates.iter().zip(&outputs) {
        if let Some(Err(e)) = output {
            c.trace.fail(e.to_string());
        }
    }
    for r in &rejects {
        r.trace.fail(r.error.to_string());
    }
    drop(sends);
    Ok(())
}

/// The output of a bound record: its source with the result stored for its key, not the
/// one it carries (which a stale or forged record may have changed). A key without a
/// stored result was bound to be dead-lettered.
fn output_of(publisher: &Publisher, c: &Candidate, stored: binding::StoredResult) -> Result<Vec<u8>, RecordError> {
    let source = c.source.clone()?;
    let Some(json) = stored.json else {
        return Err(RecordError::invalid(Reason::NoResult, "the key has no stored result"));
    };
    let carried = c.env.result().map(|r| r.result_hash.as_str());
    if stored.result_hash.as_deref() != carried {
        tracing::warn!(
            idempotency_key = %c.env.idempotency_key, partition = c.partition, offset = c.offset,
            "the results record carries another result than the stored one; publishing the stored one"
        );
        publisher.metrics.outcome("result_replaced");
    }
    let tracestate = c.tracestate;
    merge_output(source, json).and_then(|v| publisher.fitting(&c.env, (c.partition, c.offset), tracestate, v))
}

/// Per candidate, the output of the record bound to its key (None: not bound), or why
/// it cannot be built.
type Output = Option<Result<Vec<u8>, RecordError>>;

/// The (partition, offset) of each record of a batch.
fn records_at(batch: &[OwnedMessage]) -> Vec<(i32, i64)> {
    batch.iter().map(|m| (m.partition(), m.offset())).collect()
}

/// Where an output comes from (its results record) and its size.
type OutputAt = ((i32, i64), usize);

/// A dead letter of the batch: its envelope and headers, the Kafka key of its DLQ record,
/// and the results record (partition, offset) it comes from.
type DeadLetter = (Envelope, OwnedHeaders, Option<Vec<u8>>, (i32, i64));

#[allow(clippy::too_many_arguments)]
fn dead_letter_of(
    sink: &DeadLetterSink,
    sends: &mut Vec<ChildSpan>,
    dlq_topic: &str,
    env: &Envelope,
    trace: &RecordSpan,
    error: &RecordError,
    at: (i32, i64),
    key: Option<Vec<u8>>,
) -> DeadLetter {
    let dlq = trace.producer(dlq_topic);
    let (letter, h) = sink.letter(env.clone(), error, dlq.ids());
    sends.push(dlq);
    (letter, h, key, at)
}

/// Decodes the batch and merges each result into its output. Every copy of a key is a
/// candidate (binding picks the one that publishes). A record that is no envelope of
/// this pipeline, or one PostgreSQL cannot store (a NUL in its key or topic), becomes
/// an envelope (its bytes as the payload, its coordinates as its source) for the DLQ.
fn decode(publisher: &Publisher, batch: &[OwnedMessage]) -> (Vec<Candidate>, Vec<Reject>) {
    let pipeline = &publisher.settings.pipeline.name;
    let mut candidates = Vec::new();
    let mut rejects = Vec::new();
    for m in batch {
        let hdrs = headers::collect(m.headers());
        let incoming = TraceContext::extract(&hdrs);
        let trace = RecordSpan::consume(STAGE.as_str(), &publisher.group, m, incoming.as_ref());
        let (partition, offset) = (m.partition(), m.offset());
        let decoded = Envelope::decode_internal(m.payload().unwrap_or_default()).and_then(|env| {
            if env.pipeline == *pipeline {
                Ok(env)
            } else {
                Err(format!("the envelope is of pipeline {:?}, not {pipeline:?}", env.pipeline))
            }
        });
        match decoded {
            Ok(env) if env.result().is_some() => {
                trace.set([KeyValue::new(attr::IDEMPOTENCY_KEY, env.idempotency_key.clone())]);
                let tracestate = incoming.as_ref().and_then(|t| t.tracestate.as_ref()).map_or(0, String::len);
                let source = source_of(&env);
                candidates.push(Candidate { env, trace, partition, offset, source, tracestate });
            }
            Ok(env) => {
                let error = RecordError::invalid(Reason::NoResult, "a results record without a result");
                rejects.push(Reject { env, trace, partition, offset, error });
            }
            Err(e) => {
                let env = publisher.dead_letters.foreign(m);
                let error = RecordError::invalid(Reason::InvalidEnvelope, e);
                rejects.push(Reject { env, trace, partition, offset, error });
            }
        }
    }
    (candidates, rejects)
}

/// Commits the open transaction. A commit that did not complete in time (the broker is
/// away) is still in progress inside librdkafka and must be called again, not aborted;
/// meanwhile `/readyz` says so. Only an error that requires an abort returns one (the
/// caller aborts); a fatal error is [`ProducerFatal`].
async fn commit(publisher: &Publisher, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut wait = Duration::from_millis(200);
    loop {
        match tokio::task::block_in_place(|| publisher.producer.commit_transaction(publisher.call_timeout)) {
            Ok(()) => return Ok(()),
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_fatal() => {
                return Err(ProducerFatal(e.to_string()).into());
            }
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                return Err(anyhow::anyhow!("commit_transaction: {e}"));
            }
            Err(rdkafka::error::KafkaError::Transaction(e)) if e.is_retriable() => {
                tracing::warn!(error = %e, "commit_transaction did not complete yet; calling it again");
                publisher
                    .runtime
                    .state
                    .set_not_ready(format!("the Kafka transaction's commit has not completed yet: {e}"));
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(ProducerFatal(format!("shutting down during a commit: {e}")).into()),
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(anyhow::anyhow!("commit_transaction: {e}")),
        }
    }
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
    producer
        .send_result(record)
        .map_err(|(e, _)| anyhow::Error::new(e).context(format!("cannot enqueue a record for {topic}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::ClientConfig;

    /// A partition assigned and revoked again before the loop took it (two rebalances
    /// while one batch was read) is not taken: taken, it would move the epoch of a
    /// partition another publisher now holds, whose records that one would then fail to
    /// bind.
    #[test]
    fn a_partition_revoked_before_it_was_taken_is_not_taken() {
        let consumer: BaseConsumer<Rebalances> = ClientConfig::new()
            .set("group.id", "unit")
            .set("bootstrap.servers", "127.0.0.1:1")
            .create_with_context(Rebalances::default())
            .expect("a consumer that connects to nothing");
        let mut list = TopicPartitionList::new();
        list.add_partition("results", 3);
        list.add_partition("results", 4);
        let ctx = consumer.context();
        ctx.post_rebalance(&consumer, &Rebalance::Assign(&list));
        let mut gone = TopicPartitionList::new();
        gone.add_partition("results", 3);
        ctx.pre_rebalance(&consumer, &Rebalance::Revoke(&gone));
        assert_eq!(ctx.take_assigned(), vec![4]);
        assert!(ctx.take_revoked().contains(&("results".to_string(), 3)));
        ctx.take_again(&[4]);
        assert_eq!(ctx.take_assigned(), vec![4], "a partition taken from under the publisher is taken again");
    }
}
