//! What the console remembers between a dry run and its replay (the ids it found), and
//! the replays under way or done with their progress: the latest 100 of each, in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::replay::ReplayOutcome;

/// Dry runs and replay jobs remembered at most.
const KEEP: usize = 100;

/// What a dry run found, kept for the replay that follows it.
struct Preview {
    pub ids: Vec<i64>,
    created: Instant,
}

/// A replay under way or done.
pub struct Job {
    pub total: usize,
    /// Waiting for the replay before it to end (the console runs one at a time).
    pub waiting: std::sync::atomic::AtomicBool,
    pub progress: Arc<AtomicUsize>,
    pub outcome: Mutex<Option<Result<ReplayOutcome, String>>>,
    pub note: Option<String>,
    pub rate: u32,
    pub started: Instant,
    pub finished: Mutex<Option<Instant>>,
}

#[derive(Default)]
pub struct Jobs {
    /// Held by the replay under way: two replays of the same dead letters at once would
    /// both find them waiting and both produce them (a second replay), so the next one
    /// starts when this one has marked its dead letters replayed, and finds them so.
    pub turn: Arc<tokio::sync::Mutex<()>>,
    next: AtomicU64,
    previews: Mutex<HashMap<u64, Preview>>,
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
}

impl Jobs {
    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn keep_preview(&self, ids: Vec<i64>) -> u64 {
        let id = self.id();
        if let Ok(mut p) = self.previews.lock() {
            if p.len() >= KEEP
                && let Some(oldest) = p.iter().min_by_key(|(_, v)| v.created).map(|(k, _)| *k)
            {
                p.remove(&oldest);
            }
            p.insert(id, Preview { ids, created: Instant::now() });
        }
        id
    }

    pub fn take_preview(&self, id: u64) -> Option<Vec<i64>> {
        self.previews.lock().ok()?.remove(&id).map(|p| p.ids)
    }

    pub fn add(&self, job: Arc<Job>) -> u64 {
        let id = self.id();
        if let Ok(mut j) = self.jobs.lock() {
            if j.len() >= KEEP
                && let Some(oldest) = j.iter().min_by_key(|(_, v)| v.started).map(|(k, _)| *k)
            {
                j.remove(&oldest);
            }
            j.insert(id, job);
        }
        id
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.jobs.lock().ok()?.get(&id).cloned()
    }
}
