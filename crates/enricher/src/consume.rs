//! The consumer loop: reads continuously, hands records to the scheduler, runs what it
//! releases as tasks, stores the offsets it says are safe, pauses and resumes partitions
//! as it says. The loop never waits on a record, so the consumer keeps polling
//! (`max.poll.interval.ms` is never at risk) however slow the LLM is.

use enrich_common::service::{StageRuntime, until_done};
use enrich_common::shutdown::Shutdown;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::delay::{Delays, Offer};
use crate::process::Enricher;
use crate::scheduler::{Action, ChainId, Limits, PartitionId, Scheduler};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A revocation: the partitions, and the rebalance epoch it opened.
pub type Revoked = (u64, Vec<PartitionId>);

/// Tells the loop which partitions were revoked, from librdkafka's rebalance callback.
/// The callback runs inside a read, so the read may return a record of the new
/// assignment before the loop hears of the revocation: the epoch counter and the epoch
/// of each partition's last revocation let the loop tell old state from new.
pub struct RebalanceEvents {
    tx: mpsc::UnboundedSender<Revoked>,
    epoch: std::sync::atomic::AtomicU64,
    revoked_at: std::sync::Mutex<std::collections::HashMap<PartitionId, u64>>,
}

impl RebalanceEvents {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Revoked>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, epoch: Default::default(), revoked_at: Default::default() }, rx)
    }

    /// The current epoch, and the epoch of `partition`'s last revocation.
    fn epochs(&self, partition: &PartitionId) -> (u64, u64) {
        let epoch = self.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let revoked = self.revoked_at.lock().map(|m| m.get(partition).copied().unwrap_or(0)).unwrap_or(0);
        (epoch, revoked)
    }
}

impl ClientContext for RebalanceEvents {}

impl ConsumerContext for RebalanceEvents {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<PartitionId> =
                list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
            let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if let Ok(mut at) = self.revoked_at.lock() {
                for p in &revoked {
                    at.insert(p.clone(), epoch);
                }
            }
            tracing::info!(?revoked, epoch, "partitions revoked");
            let _ = self.tx.send((epoch, revoked));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let assigned: Vec<PartitionId> =
                list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
            tracing::info!(?assigned, "partitions assigned");
            // A partition comes with no state here: whatever paused it before (a held
            // retry, a full buffer) was dropped with its revocation.
            if let Err(e) = consumer.resume(list) {
                tracing::warn!(error = %e, "cannot resume the assigned partitions");
            }
        }
    }
}

struct Done {
    chain: ChainId,
    generation: u64,
    offset: i64,
    finished: bool,
}

pub async fn run(
    consumer: &StreamConsumer<RebalanceEvents>,
    mut revoked: mpsc::UnboundedReceiver<Revoked>,
    enricher: Arc<Enricher>,
    runtime: &StageRuntime,
    limits: Limits,
    retry_topic: &str,
    shutdown: &Shutdown,
) {
    let mut scheduler = Scheduler::new(limits);
    // Held retry records, with the epoch they were read at.
    let mut delays: Delays<(u64, OwnedMessage)> = Delays::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut draining = false;
    loop {
        if !draining {
            while let Some(job) = scheduler.next_job() {
                let enricher = enricher.clone();
                let done_tx = done_tx.clone();
                let state = runtime.state.clone();
                let metrics = runtime.metrics.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let offset = job.message.offset();
                    // A failure of the database or Kafka is retried here; the record keeps
                    // its place, and its partition's position waits for it.
                    let finished = until_done(&state, &metrics, &shutdown, MAX_BACKOFF, || async {
                        enricher.handle(&job.message).await.map(drop)
                    })
                    .await;
                    let _ = done_tx.send(Done { chain: job.chain, generation: job.generation, offset, finished });
                });
            }
        }
        if draining && scheduler.running() == 0 {
            return;
        }
        tokio::select! {
            biased;
            Some(done) = done_rx.recv() => {
                let actions = scheduler.complete(&done.chain, done.generation, done.offset, done.finished);
                apply(consumer, &delays, &scheduler, actions);
            }
            Some((epoch, partitions)) = revoked.recv() => {
                let actions = scheduler.revoke_at(&partitions, epoch);
                apply(consumer, &delays, &scheduler, actions);
                delays.revoke_where(&partitions, |(read_at, _)| *read_at < epoch);
                enricher.metrics.retries_waiting.set(delays.len() as i64);
            }
            _ = sleep_until_due(delays.next_due()), if !draining && delays.next_due().is_some() => {
                let (due, emptied) = delays.release(now_ms());
                for (read_at, m) in due {
                    let partition = (m.topic().to_string(), m.partition());
                    let (_, revoked_at) = consumer.context().epochs(&partition);
                    let actions = scheduler.admit_at(m, read_at, revoked_at);
                    apply(consumer, &delays, &scheduler, actions);
                }
                for p in emptied {
                    if !scheduler.is_paused(&p) {
                        apply(consumer, &delays, &scheduler, vec![Action::Resume(p)]);
                    }
                }
                enricher.metrics.retries_waiting.set(delays.len() as i64);
            }
            _ = shutdown.cancelled(), if !draining => {
                tracing::info!(in_flight = scheduler.running(), "draining: finishing in-flight records");
                draining = true;
            }
            received = consumer.recv(), if !draining => match received {
                Ok(m) => {
                    runtime.metrics.consumed(m.topic());
                    let m = m.detach();
                    let partition = (m.topic().to_string(), m.partition());
                    let (epoch, revoked_at) = consumer.context().epochs(&partition);
                    if m.topic() == retry_topic {
                        // Records held from before the partition's last revocation are stale.
                        delays.revoke_where(std::slice::from_ref(&partition), |(read_at, _)| *read_at < revoked_at);
                        // A due time further ahead than the longest delay the policy gives is
                        // a rogue header: it is held no longer than that.
                        let ceiling = enricher.retry.max_delay.as_millis() as i64;
                        let written = m.timestamp().to_millis().unwrap_or(i64::MAX);
                        let due = due_ms(&m).min(now_ms().saturating_add(ceiling)).min(written.saturating_add(ceiling));
                        match delays.offer(&partition, due, (epoch, m), now_ms()) {
                            Offer::Admit((_, m)) => {
                                let actions = scheduler.admit_at(m, epoch, revoked_at);
                                apply(consumer, &delays, &scheduler, actions);
                            }
                            Offer::Held { pause } => {
                                if pause {
                                    tracing::debug!(topic = %partition.0, partition = partition.1, due, "holding a retry partition until its next record is due");
                                    set_flow(consumer, &partition, true);
                                }
                                enricher.metrics.retries_waiting.set(delays.len() as i64);
                            }
                        }
                    } else {
                        let actions = scheduler.admit_at(m, epoch, revoked_at);
                        apply(consumer, &delays, &scheduler, actions);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
            },
        }
    }
}

fn apply(
    consumer: &StreamConsumer<RebalanceEvents>,
    delays: &Delays<(u64, OwnedMessage)>,
    scheduler: &Scheduler,
    actions: Vec<Action>,
) {
    for action in actions {
        match action {
            Action::Store((topic, partition), position) => {
                // store_offset takes the last finished offset and stores the one after it.
                if let Err(e) = consumer.store_offset(&topic, partition, position - 1) {
                    tracing::debug!(%topic, partition, error = %e, "offset not stored (partition revoked?)");
                }
            }
            Action::Pause(p) => set_flow(consumer, &p, true),
            // A retry partition waiting for its next record's due time stays paused.
            Action::Resume(p) if !delays.is_held(&p) && !scheduler.is_paused(&p) => set_flow(consumer, &p, false),
            Action::Resume(_) => {}
        }
    }
}

fn set_flow(consumer: &StreamConsumer<RebalanceEvents>, (topic, partition): &PartitionId, pause: bool) {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, *partition);
    let result = if pause { consumer.pause(&list) } else { consumer.resume(&list) };
    match result {
        Ok(()) => tracing::debug!(%topic, partition, pause, "partition flow changed"),
        Err(e) => tracing::warn!(%topic, partition, pause, error = %e, "cannot pause or resume"),
    }
}

/// When a retry-topic record is due; a record without the header is due now.
fn due_ms(message: &OwnedMessage) -> i64 {
    let headers = enrich_common::headers::collect(message.headers());
    enrich_common::headers::find(&headers, enrich_common::headers::RETRY_DUE_MS)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn sleep_until_due(due_ms: Option<i64>) {
    let wait = due_ms.map(|d| (d - now_ms()).max(0) as u64).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait)).await;
}
