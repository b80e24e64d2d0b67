//! Key-ordered concurrency inside partitions, as pure bookkeeping (no I/O), so it can
//! be tested record by record.
//!
//! - Records of one chain (one Kafka key of one partition, or the whole partition when
//!   `ordering = "partition"`) run one at a time, in offset order; different chains run
//!   concurrently, up to `max_in_flight`.
//! - Each partition's committable position is its lowest unfinished offset (or one past
//!   the highest seen when nothing is unfinished), so nothing is committed past work
//!   that is still running or waiting.
//! - A partition holding `max_buffered_per_partition` records is paused until it drains
//!   to half, and every partition that receives a record while the replica holds
//!   `max_buffered_bytes` of unfinished records is paused until they drain to half, so
//!   memory is bounded whatever the backlog and whatever the records' size (a run of
//!   1 MB records cannot hold a thousand of them per partition).
//! - A revoked partition's waiting records are dropped (its new owner reads them again);
//!   its running records finish, but their offsets are no longer ours to store.

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// A partition: (topic, partition).
pub type PartitionId = (String, i32);

/// What serialises records: a Kafka key within a partition (None: no key, or the
/// whole partition in partition-ordering mode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChainId {
    pub partition: PartitionId,
    pub key: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// One record at a time per Kafka key; different keys concurrently.
    Key,
    /// One record at a time per partition (the classic consumer; for comparison).
    Partition,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_buffered_per_partition: usize,
    /// Bytes (value, key and headers) of unfinished records over all partitions.
    pub max_buffered_bytes: usize,
    pub ordering: Ordering,
}

/// A record handed out to run.
#[derive(Debug)]
pub struct Job {
    pub chain: ChainId,
    pub generation: u64,
    pub message: OwnedMessage,
}

/// A partition's flow-control or commit change the consumer loop must apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pause(PartitionId),
    Resume(PartitionId),
    /// Store this position (the next offset to read) for the partition.
    Store(PartitionId, i64),
}

struct Tracker {
    generation: u64,
    /// The rebalance epoch when the partition was (re)assigned here: a revocation at a
    /// later epoch ends this tracker.
    epoch: u64,
    /// Offsets admitted and not finished, with their records' weight.
    unfinished: BTreeMap<i64, usize>,
    /// The weight of the unfinished records.
    bytes: usize,
    /// One past the highest offset admitted.
    end: i64,
    stored: Option<i64>,
    paused: bool,
}

#[derive(Default)]
struct Chain {
    running: bool,
    waiting: VecDeque<(u64, OwnedMessage)>,
}

pub struct Scheduler {
    limits: Limits,
    chains: HashMap<ChainId, Chain>,
    /// Chains whose head may start, in arrival order.
    ready: VecDeque<ChainId>,
    running: usize,
    trackers: HashMap<PartitionId, Tracker>,
    next_generation: u64,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            chains: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            trackers: HashMap::new(),
            next_generation: 1,
        }
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// Records admitted and not yet finished, over all owned partitions.
    pub fn buffered(&self) -> usize {
        self.trackers.values().map(|t| t.unfinished.len()).sum()
    }

    /// Bytes of the records admitted and not yet finished, over all owned partitions.
    pub fn buffered_bytes(&self) -> usize {
        self.trackers.values().map(|t| t.bytes).sum()
    }

    /// Takes a record from the consumer (no rebalances to reckon with).
    pub fn admit(&mut self, message: OwnedMessage) -> Vec<Action> {
        self.admit_at(message, 0, 0)
    }

    /// Takes a record read at rebalance `epoch`; its partition was last revoked at
    /// `revoked_at`. A tracker older than that revocation is stale even if the loop has not
    /// heard of the revocation yet (librdkafka calls back in the middle of a read): it is
    /// replaced, so the record is not dropped with it.
    pub fn admit_at(&mut self, message: OwnedMessage, epoch: u64, revoked_at: u64) -> Vec<Action> {
        let partition: PartitionId = (message.topic().to_string(), message.partition());
        let offset = message.offset();
        if self.trackers.get(&partition).is_some_and(|t| t.epoch < revoked_at) {
            self.trackers.remove(&partition);
        }
        let tracker = self.trackers.entry(partition.clone()).or_insert_with(|| {
            let generation = self.next_generation;
            self.next_generation += 1;
            Tracker {
                generation,
                epoch,
                unfinished: BTreeMap::new(),
                bytes: 0,
                end: offset,
                stored: None,
                paused: false,
            }
        });
        let size = enrich_common::kafka::weight(&message);
        if let Some(before) = tracker.unfinished.insert(offset, size) {
            tracker.bytes -= before; // the same offset read again
        }
        tracker.bytes += size;
        tracker.end = tracker.end.max(offset + 1);
        let generation = tracker.generation;
        let full = tracker.unfinished.len() >= self.limits.max_buffered_per_partition;
        let mut actions = Vec::new();
        let over_bytes = self.buffered_bytes() >= self.limits.max_buffered_bytes;
        if let Some(tracker) = self.trackers.get_mut(&partition)
            && !tracker.paused
            && (full || over_bytes)
        {
            tracker.paused = true;
            actions.push(Action::Pause(partition.clone()));
        }
        let key = match self.limits.ordering {
            Ordering::Key => message.key().map(<[u8]>::to_vec),
            Ordering::Partition => None,
        };
        let chain_id = ChainId { partition, key };
        let chain = self.chains.entry(chain_id.clone()).or_default();
        let was_idle = !chain.running && chain.waiting.is_empty();
        chain.waiting.push_back((generation, message));
        if was_idle {
            self.ready.push_back(chain_id);
        }
        actions
    }

    /// The next record that may start now, if the in-flight limit allows one.
    pub fn next_job(&mut self) -> Option<Job> {
        while self.running < self.limits.max_in_flight {
            let chain_id = self.ready.pop_front()?;
            let Some(chain) = self.chains.get_mut(&chain_id) else { continue };
            while let Some((generation, message)) = chain.waiting.pop_front() {
                let current = self.trackers.get(&chain_id.partition).map(|t| t.generation);
                if current != Some(generation) {
                    continue; // revoked since it was admitted: its new owner reads it again
                }
                chain.running = true;
                self.running += 1;
                return Some(Job { chain: chain_id, generation, message });
            }
            self.chains.remove(&chain_id);
        }
        None
    }

    /// A job ended. `finished` is false when it was abandoned (shutdown): its offset
    /// then stays unfinished and holds the partition's position back.
    pub fn complete(&mut self, job_chain: &ChainId, generation: u64, offset: i64, finished: bool) -> Vec<Action> {
        self.running = self.running.saturating_sub(1);
        if let Some(chain) = self.chains.get_mut(job_chain) {
            chain.running = false;
            if chain.waiting.is_empty() {
                self.chains.remove(job_chain);
            } else {
                self.ready.push_back(job_chain.clone());
            }
        }
        let mut actions = Vec::new();
        let Some(tracker) = self.trackers.get_mut(&job_chain.partition) else { return self.resume_drained() };
        if tracker.generation != generation || !finished {
            // A stale or abandoned job frees no bytes of its own, but the budget may have
            // drained meanwhile (a revocation dropped a tracker).
            return self.resume_drained();
        }
        if let Some(size) = tracker.unfinished.remove(&offset) {
            tracker.bytes -= size;
        }
        let position = tracker.unfinished.first_key_value().map_or(tracker.end, |(o, _)| *o);
        if tracker.stored.is_none_or(|s| position > s) {
            tracker.stored = Some(position);
            actions.push(Action::Store(job_chain.partition.clone(), position));
        }
        actions.extend(self.resume_drained());
        actions
    }

    /// Drained to half of the byte budget: every partition paused and drained to half its
    /// count resumes (one paused by the bytes of others has nothing of its own to finish).
    fn resume_drained(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.buffered_bytes() <= self.limits.max_buffered_bytes / 2 {
            let half = self.limits.max_buffered_per_partition / 2;
            for (p, t) in &mut self.trackers {
                if t.paused && t.unfinished.len() <= half {
                    t.paused = false;
                    actions.push(Action::Resume(p.clone()));
                }
            }
        }
        actions
    }

    /// Whether the partition is paused because it holds too many unfinished records.
    pub fn is_paused(&self, partition: &PartitionId) -> bool {
        self.trackers.get(partition).is_some_and(|t| t.paused)
    }

    /// The partitions are no longer ours.
    pub fn revoke(&mut self, partitions: &[PartitionId]) -> Vec<Action> {
        self.revoke_at(partitions, u64::MAX)
    }

    /// The partitions were revoked at rebalance `epoch`: trackers from before it end;
    /// one made since (the partition came back) stays. The bytes they held go with them:
    /// the partitions those bytes paused may resume.
    pub fn revoke_at(&mut self, partitions: &[PartitionId], epoch: u64) -> Vec<Action> {
        for p in partitions {
            if self.trackers.get(p).is_some_and(|t| t.epoch < epoch) {
                self.trackers.remove(p);
            }
        }
        self.resume_drained()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn msg(partition: i32, offset: i64, key: &str) -> OwnedMessage {
        OwnedMessage::new(
            None,
            Some(key.as_bytes().to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn limits(max_in_flight: usize, buffered: usize, ordering: Ordering) -> Limits {
        Limits { max_in_flight, max_buffered_per_partition: buffered, max_buffered_bytes: usize::MAX, ordering }
    }

    fn drain(s: &mut Scheduler) -> Vec<Job> {
        std::iter::from_fn(|| s.next_job()).collect()
    }

    fn offsets(jobs: &[Job]) -> Vec<i64> {
        jobs.iter().map(|j| j.message.offset()).collect()
    }

    #[test]
    fn different_keys_run_together_one_key_runs_in_order() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        for (o, k) in [(0, "a"), (1, "b"), (2, "a"), (3, "c"), (4, "a")] {
            s.admit(msg(0, o, k));
        }
        let first = drain(&mut s);
        assert_eq!(offsets(&first), vec![0, 1, 3], "one head per key");
        // Finishing a's head releases a's next record, in order.
        let a = &first[0];
        s.complete(&a.chain, a.generation, 0, true);
        let next = drain(&mut s);
        assert_eq!(offsets(&next), vec![2]);
        s.complete(&next[0].chain, next[0].generation, 2, true);
        assert_eq!(offsets(&drain(&mut s)), vec![4]);
    }

    #[test]
    fn partition_ordering_runs_one_record_per_partition() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Partition));
        for (p, o, k) in [(0, 0, "a"), (0, 1, "b"), (1, 0, "c")] {
            s.admit(msg(p, o, k));
        }
        assert_eq!(offsets(&drain(&mut s)), vec![0, 0]);
    }

    #[test]
    fn in_flight_limit_holds() {
        let mut s = Scheduler::new(limits(2, 100, Ordering::Key));
        for o in 0..5 {
            s.admit(msg(0, o, &format!("k{o}")));
        }
        let jobs = drain(&mut s);
        assert_eq!(jobs.len(), 2);
        assert_eq!(s.running(), 2);
        s.complete(&jobs[0].chain, jobs[0].generation, 0, true);
        assert_eq!(drain(&mut s).len(), 1);
    }

    #[test]
    fn offsets_are_stored_only_up_to_the_lowest_unfinished() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        for o in 10..13 {
            s.admit(msg(0, o, &format!("k{o}")));
        }
        let jobs = drain(&mut s);
        let p: PartitionId = ("t".into(), 0);
        // 11 and 12 finish first: nothing may be stored past 10.
        assert_eq!(s.complete(&jobs[1].chain, jobs[1].generation, 11, true), vec![Action::Store(p.clone(), 10)]);
        assert_eq!(s.complete(&jobs[2].chain, jobs[2].generation, 12, true), vec![]);
        assert_eq!(s.complete(&jobs[0].chain, jobs[0].generation, 10, true), vec![Action::Store(p, 13)]);
    }

    #[test]
    fn an_abandoned_record_holds_the_position() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        s.admit(msg(0, 0, "a"));
        s.admit(msg(0, 1, "b"));
        let jobs = drain(&mut s);
        assert_eq!(s.complete(&jobs[0].chain, jobs[0].generation, 0, false), vec![]);
        assert_eq!(s.complete(&jobs[1].chain, jobs[1].generation, 1, true), vec![Action::Store(("t".into(), 0), 0)]);
    }

    #[test]
    fn full_partitions_pause_and_resume_at_half() {
        let mut s = Scheduler::new(limits(100, 4, Ordering::Key));
        let p: PartitionId = ("t".into(), 0);
        let mut actions = Vec::new();
        for o in 0..4 {
            actions.extend(s.admit(msg(0, o, &format!("k{o}"))));
        }
        assert_eq!(actions, vec![Action::Pause(p.clone())]);
        let jobs = drain(&mut s);
        s.complete(&jobs[0].chain, jobs[0].generation, 0, true);
        let after_two = s.complete(&jobs[1].chain, jobs[1].generation, 1, true);
        assert!(after_two.contains(&Action::Resume(p)), "{after_two:?}");
    }

    #[test]
    fn the_bytes_buffered_pause_every_partition_that_reads_more_until_they_drain_to_half() {
        // 1 MB records, a 3 MB budget over the replica, room for 1,000 records a partition.
        let mb = |p: i32, o: i64| {
            OwnedMessage::new(
                Some(vec![b'x'; 1 << 20]),
                Some(format!("k{o}").into_bytes()),
                "t".into(),
                Timestamp::NotAvailable,
                p,
                o,
                None,
            )
        };
        let mut s = Scheduler::new(Limits {
            max_in_flight: 100,
            max_buffered_per_partition: 1000,
            max_buffered_bytes: 3 << 20,
            ordering: Ordering::Key,
        });
        let (p0, p1): (PartitionId, PartitionId) = (("t".into(), 0), ("t".into(), 1));
        assert!(s.admit(mb(0, 0)).is_empty());
        assert!(s.admit(mb(1, 0)).is_empty());
        assert_eq!(s.admit(mb(0, 1)), vec![Action::Pause(p0.clone())], "the third MB passes the budget");
        assert_eq!(s.admit(mb(1, 1)), vec![Action::Pause(p1.clone())], "a partition that reads on pauses too");
        assert!(s.buffered_bytes() >= 4 << 20);
        let jobs = drain(&mut s);
        let done = |s: &mut Scheduler, i: usize| {
            let j = &jobs[i];
            s.complete(&j.chain, j.generation, j.message.offset(), true)
        };
        assert!(!done(&mut s, 0).iter().any(|a| matches!(a, Action::Resume(_))), "3 MB left");
        let resumed = done(&mut s, 1);
        assert!(resumed.iter().all(|a| !matches!(a, Action::Resume(_))), "2 MB left: more than half: {resumed:?}");
        let resumed = done(&mut s, 2);
        assert!(resumed.contains(&Action::Resume(p0)) && resumed.contains(&Action::Resume(p1)), "{resumed:?}");
    }

    #[test]
    fn a_revocation_that_frees_the_bytes_resumes_the_partitions_they_paused() {
        let record = |p: i32, o: i64, size: usize| {
            OwnedMessage::new(Some(vec![b'x'; size]), None, "t".into(), Timestamp::NotAvailable, p, o, None)
        };
        let mut s = Scheduler::new(Limits {
            max_in_flight: 100,
            max_buffered_per_partition: 1000,
            max_buffered_bytes: 10 << 20,
            ordering: Ordering::Key,
        });
        let (p0, p1): (PartitionId, PartitionId) = (("t".into(), 0), ("t".into(), 1));
        // Partition 0 holds 12 MB of a 10 MB budget; partition 1 reads a small record and
        // pauses for the bytes of partition 0.
        s.admit(record(0, 0, 6 << 20));
        s.admit(record(0, 1, 6 << 20));
        assert_eq!(s.admit(record(1, 0, 1024)), vec![Action::Pause(p1.clone())]);
        let jobs = drain(&mut s);
        let small = jobs.iter().find(|j| j.chain.partition == p1).expect("the small record runs");
        let done = s.complete(&small.chain, small.generation, small.message.offset(), true);
        assert!(!done.contains(&Action::Resume(p1.clone())), "12 MB still buffered: {done:?}");
        // Partition 0 is revoked: its 12 MB are gone, and partition 1 must not stay paused.
        let actions = s.revoke(std::slice::from_ref(&p0));
        assert!(actions.contains(&Action::Resume(p1.clone())), "{actions:?}");
        assert!(!s.is_paused(&p1));
        // Its jobs still running end as stale, with nothing more to resume.
        for j in jobs.iter().filter(|j| j.chain.partition == p0) {
            s.complete(&j.chain, j.generation, j.message.offset(), true);
        }
        assert_eq!(s.buffered_bytes(), 0);
    }

    #[test]
    fn revoked_partitions_drop_waiting_records_and_stop_storing() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        s.admit(msg(0, 0, "a"));
        s.admit(msg(0, 1, "a"));
        s.admit(msg(1, 0, "b"));
        let jobs = drain(&mut s);
        assert_eq!(jobs.len(), 2);
        s.revoke(&[("t".into(), 0)]);
        // The running record finishes, but stores nothing and its waiting successor is dropped.
        assert_eq!(s.complete(&jobs[0].chain, jobs[0].generation, 0, true), vec![]);
        assert!(drain(&mut s).is_empty());
        // Reassigned: a new generation, the same key runs again when redelivered.
        s.admit(msg(0, 0, "a"));
        let again = drain(&mut s);
        assert_eq!(offsets(&again), vec![0]);
        assert_ne!(again[0].generation, jobs[0].generation);
        assert_eq!(s.buffered(), 2);
    }

    #[test]
    fn a_record_read_after_a_revocation_the_loop_has_not_heard_of_is_kept() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        s.admit_at(msg(0, 0, "a"), 0, 0);
        let old = drain(&mut s);
        // Revoked and reassigned at epoch 1 inside the read that returned offset 5.
        s.admit_at(msg(0, 5, "b"), 1, 1);
        s.revoke_at(&[("t".into(), 0)], 1);
        let jobs = drain(&mut s);
        assert_eq!(offsets(&jobs), vec![5], "not dropped with the stale tracker");
        assert_eq!(s.complete(&jobs[0].chain, jobs[0].generation, 5, true), vec![Action::Store(("t".into(), 0), 6)]);
        assert_eq!(s.complete(&old[0].chain, old[0].generation, 0, true), vec![], "the old record stores nothing");
    }

    #[test]
    fn a_key_still_running_from_a_revoked_generation_blocks_its_redelivery() {
        let mut s = Scheduler::new(limits(10, 100, Ordering::Key));
        s.admit(msg(0, 5, "a"));
        let old = drain(&mut s);
        s.revoke(&[("t".into(), 0)]);
        s.admit(msg(0, 5, "a"));
        assert!(drain(&mut s).is_empty(), "never two records of one key at once");
        s.complete(&old[0].chain, old[0].generation, 5, true);
        assert_eq!(offsets(&drain(&mut s)), vec![5]);
    }
}
