//! Delayed retries: records on the retry topic carry the time they are due. A partition
//! whose next record is not yet due is held (paused, its records kept here in offset
//! order) until it is; `enrich.requests` is never held back by it. Pure bookkeeping, so
//! it can be tested without a broker.

use std::collections::{HashMap, VecDeque};

use crate::scheduler::PartitionId;

/// What to do with a record from the retry topic.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<M> {
    /// Due (and nothing earlier is held): run it now.
    Admit(M),
    /// Kept until due. `pause` is true when the partition just started being held.
    Held { pause: bool },
}

pub struct Delays<M> {
    held: HashMap<PartitionId, VecDeque<(i64, M)>>,
}

impl<M> Default for Delays<M> {
    fn default() -> Self {
        Self { held: HashMap::new() }
    }
}

impl<M> Delays<M> {
    /// A record of `partition`, due at `due_ms` (Unix milliseconds).
    pub fn offer(&mut self, partition: &PartitionId, due_ms: i64, message: M, now_ms: i64) -> Offer<M> {
        match self.held.get_mut(partition) {
            // Records behind a held one wait behind it: offsets are stored in order.
            Some(queue) => {
                queue.push_back((due_ms, message));
                Offer::Held { pause: false }
            }
            None if due_ms <= now_ms => Offer::Admit(message),
            None => {
                self.held.insert(partition.clone(), VecDeque::from([(due_ms, message)]));
                Offer::Held { pause: true }
            }
        }
    }

    /// The earliest time a held partition's head is due.
    pub fn next_due(&self) -> Option<i64> {
        self.held.values().filter_map(|q| q.front().map(|(due, _)| *due)).min()
    }

    /// Records now due, in offset order per partition, and the partitions no longer held
    /// (to resume).
    pub fn release(&mut self, now_ms: i64) -> (Vec<M>, Vec<PartitionId>) {
        let mut due = Vec::new();
        let mut emptied = Vec::new();
        for (partition, queue) in &mut self.held {
            while queue.front().is_some_and(|(d, _)| *d <= now_ms) {
                if let Some((_, m)) = queue.pop_front() {
                    due.push(m);
                }
            }
            if queue.is_empty() {
                emptied.push(partition.clone());
            }
        }
        for p in &emptied {
            self.held.remove(p);
        }
        (due, emptied)
    }

    pub fn is_held(&self, partition: &PartitionId) -> bool {
        self.held.contains_key(partition)
    }

    /// Records held in all partitions.
    pub fn len(&self) -> usize {
        self.held.values().map(VecDeque::len).sum()
    }

    /// The partitions are no longer ours (their new owner reads the records again):
    /// drops the held records of `partitions` that `stale` says were read before their
    /// revocation; records read since stay, in order.
    pub fn revoke_where(&mut self, partitions: &[PartitionId], stale: impl Fn(&M) -> bool) {
        for p in partitions {
            if let Some(queue) = self.held.get_mut(p) {
                queue.retain(|(_, m)| !stale(m));
                if queue.is_empty() {
                    self.held.remove(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> PartitionId {
        ("retry".to_string(), n)
    }

    #[test]
    fn a_due_record_runs_at_once() {
        let mut d = Delays::default();
        assert_eq!(d.offer(&p(0), 100, "a", 100), Offer::Admit("a"));
        assert_eq!(d.next_due(), None);
    }

    #[test]
    fn a_record_not_due_holds_its_partition_until_due_and_keeps_order() {
        let mut d = Delays::default();
        assert_eq!(d.offer(&p(0), 500, "a", 100), Offer::Held { pause: true });
        // Due already, but behind a held record of its partition.
        assert_eq!(d.offer(&p(0), 50, "b", 100), Offer::Held { pause: false });
        assert_eq!(d.offer(&p(0), 900, "c", 100), Offer::Held { pause: false });
        // Another partition is not held back.
        assert_eq!(d.offer(&p(1), 100, "x", 100), Offer::Admit("x"));
        assert_eq!(d.next_due(), Some(500));
        assert_eq!(d.release(499), (vec![], vec![]));
        assert_eq!(d.release(500), (vec!["a", "b"], vec![]));
        assert!(d.is_held(&p(0)));
        assert_eq!(d.next_due(), Some(900));
        assert_eq!(d.release(1000), (vec!["c"], vec![p(0)]));
        assert!(!d.is_held(&p(0)));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn revoked_partitions_forget_their_held_records() {
        let mut d = Delays::default();
        d.offer(&p(0), 500, "a", 100);
        d.offer(&p(1), 700, "b", 100);
        d.offer(&p(1), 900, "c", 100);
        d.revoke_where(&[p(0), p(1)], |m| *m != "c");
        assert_eq!(d.len(), 1, "only the record read since stays");
        assert_eq!(d.release(1000).0, vec!["c"]);
        d.offer(&p(1), 700, "b", 100);
        assert_eq!(d.next_due(), Some(700));
    }
}
