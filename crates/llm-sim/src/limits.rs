//! Rate limits the way a hosted provider enforces them: requests per minute and tokens
//! per minute, each a bucket refilled continuously. A request over either limit is
//! answered 429 with `Retry-After` (seconds, rounded up), `retry-after-ms`, and OpenAI's
//! `x-ratelimit-*` headers, which every answer carries while a limit is set.
//!
//! A request costs one request and its prompt tokens plus its `max_tokens` (what the
//! provider must hold for the answer). `burst_secs` sets how much of a minute's allowance
//! can be spent at once: 60 (the default) lets a whole minute's requests through at once,
//! 1 spreads them over the minute as a provider enforcing per-second limits does.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimits {
    /// Requests per minute; 0: no limit.
    pub rpm: u64,
    /// Tokens per minute; 0: no limit.
    pub tpm: u64,
    /// Seconds of allowance a bucket holds.
    pub burst_secs: f64,
    /// Whether answers carry the `x-ratelimit-*` headers (a provider or gateway that
    /// declares no limits sends `Retry-After` alone).
    pub declare: bool,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self { rpm: 0, tpm: 0, burst_secs: 60.0, declare: true }
    }
}

impl RateLimits {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.burst_secs > 0.0 && self.burst_secs <= 60.0) {
            return Err(format!("burst_secs must be in (0, 60], not {}", self.burst_secs));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    per_minute: u64,
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, burst_secs: f64, now: Instant) -> Self {
        let capacity = (per_minute as f64 * burst_secs / 60.0).max(1.0);
        Self { per_minute, capacity, level: capacity, at: now }
    }

    fn per_sec(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_sec()).min(self.capacity);
        self.at = now;
    }

    /// How long until `n` (at most the capacity) is available; zero if it is now.
    fn wait_for(&self, n: f64) -> Duration {
        let missing = n.min(self.capacity) - self.level;
        if missing <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(missing / self.per_sec()) }
    }

    /// Until the bucket is full again.
    fn reset(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.level).max(0.0)) / self.per_sec())
    }
}

/// The limiter's verdict on one request, with the headers to send either way.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Some: refused, retry after this long.
    pub retry_after: Option<Duration>,
    pub headers: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone)]
pub struct Limiter {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    declare: bool,
}

impl Limiter {
    pub fn new(limits: RateLimits, now: Instant) -> Self {
        let bucket = |n: u64| (n > 0).then(|| Bucket::new(n, limits.burst_secs, now));
        Self { requests: bucket(limits.rpm), tokens: bucket(limits.tpm), declare: limits.declare }
    }

    /// Takes one request and `tokens` if both are available.
    pub fn check(&mut self, tokens: u64, now: Instant) -> Verdict {
        let need = tokens as f64;
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.requests, 1.0), (&mut self.tokens, need)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if wait.is_zero() {
            if let Some(b) = &mut self.requests {
                b.level -= 1.0;
            }
            if let Some(b) = &mut self.tokens {
                // A request larger than the bucket goes through when it is full and
                // leaves it in debt.
                b.level -= need;
            }
        }
        Verdict { retry_after: (!wait.is_zero()).then_some(wait), headers: self.headers() }
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if !self.declare {
            return h;
        }
        if let Some(b) = &self.requests {
            h.push(("x-ratelimit-limit-requests", b.per_minute.to_string()));
            h.push(("x-ratelimit-remaining-requests", (b.level.max(0.0).floor() as u64).to_string()));
            h.push(("x-ratelimit-reset-requests", go_duration(b.reset())));
        }
        if let Some(b) = &self.tokens {
            h.push(("x-ratelimit-limit-tokens", b.per_minute.to_string()));
            h.push(("x-ratelimit-remaining-tokens", (b.level.max(0.0).floor() as u64).to_string()));
            h.push(("x-ratelimit-reset-tokens", go_duration(b.reset())));
        }
        h
    }
}

/// `250ms`, `1.5s`, `2m3s`: the format of OpenAI's reset headers.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_over_the_limit_wait_for_the_refill() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimits { rpm: 120, tpm: 0, burst_secs: 1.0, declare: true }, t0);
        // 120 per minute, one second's worth: two at once, then one every 500 ms.
        assert_eq!(l.check(10, t0).retry_after, None);
        assert_eq!(l.check(10, t0).retry_after, None);
        let refused = l.check(10, t0);
        assert_eq!(refused.retry_after, Some(Duration::from_millis(500)));
        assert!(refused.headers.contains(&("x-ratelimit-remaining-requests", "0".into())));
        assert!(refused.headers.contains(&("x-ratelimit-limit-requests", "120".into())));
        assert_eq!(l.check(10, t0 + Duration::from_millis(500)).retry_after, None);
    }

    #[test]
    fn tokens_are_limited_and_a_large_request_goes_through_a_full_bucket() {
        let t0 = Instant::now();
        let mut l = Limiter::new(RateLimits { rpm: 0, tpm: 600, burst_secs: 10.0, declare: true }, t0);
        // 100 tokens of allowance, 10 per second.
        assert_eq!(l.check(60, t0).retry_after, None);
        assert_eq!(l.check(60, t0).retry_after, Some(Duration::from_secs(2)));
        // Larger than the bucket: allowed once it is full, leaving it in debt.
        let later = t0 + Duration::from_secs(6);
        assert_eq!(l.check(500, later).retry_after, None);
        assert!(l.check(1, later).retry_after.is_some());
        assert!(l.check(1, later).headers.contains(&("x-ratelimit-limit-tokens", "600".into())));
    }

    #[test]
    fn no_limit_no_headers() {
        let mut l = Limiter::new(RateLimits::default(), Instant::now());
        let v = l.check(1_000_000, Instant::now());
        assert_eq!(v, Verdict { retry_after: None, headers: vec![] });
    }

    #[test]
    fn durations_print_as_openai_does() {
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(2)), "2s");
        assert_eq!(go_duration(Duration::from_secs(123)), "2m3s");
    }
}
