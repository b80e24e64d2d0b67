//! The DLQ limit: a stage that would dead-letter most of what it reads is more likely
//! broken (a bad deploy, a wrong key strategy, a broken prompt) than fed bad data. Past
//! the limit it stops dead-lettering, holds the records (their offsets are not committed)
//! and says why in its logs, `/readyz` and `enrich_dlq_limit_tripped`, until it is
//! restarted with the cause fixed.

use std::collections::VecDeque;

use crate::config::DlqLimitSettings;

pub struct DlqLimit {
    settings: DlqLimitSettings,
    /// The outcomes of the latest records: true = dead-lettered.
    recent: VecDeque<bool>,
    dead_in_window: usize,
    consecutive: u32,
}

impl DlqLimit {
    pub fn new(settings: DlqLimitSettings) -> Self {
        Self { settings, recent: VecDeque::new(), dead_in_window: 0, consecutive: 0 }
    }

    /// Whether `dead` more dead letters (after `ok` good records) stay within the limit;
    /// Err says which limit they would pass. Nothing is recorded.
    pub fn check(&self, dead: usize, ok: usize) -> Result<(), String> {
        if dead == 0 {
            return Ok(());
        }
        let s = &self.settings;
        let consecutive = if ok == 0 { self.consecutive as usize + dead } else { dead };
        if consecutive > s.max_consecutive as usize {
            return Err(format!(
                "DLQ limit: {consecutive} dead letters in a row (dlq_limit.max_consecutive = {}); holding them",
                s.max_consecutive
            ));
        }
        let mut window = self.recent.clone();
        let mut dead_in_window = self.dead_in_window;
        for outcome in std::iter::repeat_n(false, ok).chain(std::iter::repeat_n(true, dead)) {
            window.push_back(outcome);
            dead_in_window += usize::from(outcome);
            if window.len() > s.window && window.pop_front() == Some(true) {
                dead_in_window -= 1;
            }
        }
        let share = dead_in_window as f64 / window.len().max(1) as f64;
        if window.len() >= s.min_records && share > s.max_share {
            return Err(format!(
                "DLQ limit: {dead_in_window} of the last {} records would be dead letters ({:.0}% > dlq_limit.max_share {:.0}%); holding them",
                window.len(),
                share * 100.0,
                s.max_share * 100.0
            ));
        }
        Ok(())
    }

    /// Records outcomes that happened.
    pub fn record(&mut self, dead: usize, ok: usize) {
        for outcome in std::iter::repeat_n(false, ok).chain(std::iter::repeat_n(true, dead)) {
            self.recent.push_back(outcome);
            self.dead_in_window += usize::from(outcome);
            if self.recent.len() > self.settings.window && self.recent.pop_front() == Some(true) {
                self.dead_in_window -= 1;
            }
            self.consecutive = if outcome { self.consecutive + 1 } else { 0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> DlqLimit {
        DlqLimit::new(DlqLimitSettings { window: 100, max_share: 0.5, max_consecutive: 30, min_records: 20 })
    }

    #[test]
    fn scattered_dead_letters_pass() {
        let mut l = limit();
        for _ in 0..50 {
            assert!(l.check(1, 9).is_ok());
            l.record(1, 9);
        }
    }

    #[test]
    fn a_run_of_dead_letters_trips_the_consecutive_limit() {
        let mut l = limit();
        l.record(0, 100);
        l.record(30, 0);
        let err = l.check(1, 0).unwrap_err();
        assert!(err.contains("in a row"), "{err}");
        assert!(l.check(1, 1).is_ok(), "a good record breaks the run");
    }

    #[test]
    fn a_mostly_dead_window_trips_the_share_limit_but_not_before_min_records() {
        let mut l = limit();
        assert!(l.check(10, 5).is_ok(), "15 records are fewer than min_records");
        l.record(10, 5);
        let err = l.check(10, 5).unwrap_err();
        assert!(err.contains("max_share"), "{err}");
    }
}
