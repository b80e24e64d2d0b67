//! Flow control of the calls to the LLM endpoint, in one place: a concurrency limit that
//! adapts (AIMD), requests-per-minute and tokens-per-minute buckets, and the hold a 429's
//! `Retry-After` puts on every call. A call waits here for its turn; while it waits the
//! record holds its place in the scheduler, so the partitions' buffers fill and pause:
//! under a 429 storm consumption slows down instead of retries burning.
//!
//! The limit starts at 4 (slow start: the first answers may declare the provider's limits
//! before many calls are out), grows by one per answered call (doubling each round) until
//! the first decrease, and moves between `llm.min_concurrency` and
//! `enricher.max_in_flight`:
//! - a 429 halves it while no rate limit is known, once per round: only a call started
//!   after the last decrease can decrease it again (the 429s of calls already in flight
//!   are one congestion event). Scattered 429s (under a tenth of the last five seconds'
//!   calls, at least twenty answered) are an overloaded server's, not a limit this
//!   replica reached: the refused call waits its own `Retry-After`, and neither the
//!   limit nor the other calls change (halving on random refusals, as any AIMD does on
//!   random loss, held the limit near 1.2/√p: about 5 at 5% of 429s);
//! - rising latency (the recent average past `llm.latency_tolerance` times the long-run
//!   one) takes a tenth off, with the same once-per-round rule;
//! - every answered call while the limit is in use adds `1 / limit` (one per round).
//!
//! The rate buckets run at `llm.requests_per_minute` / `llm.tokens_per_minute`, or at the
//! limits the provider declares in its `x-ratelimit-limit-*` (OpenAI) or
//! `anthropic-ratelimit-*-limit` headers when those are lower or nothing is configured. A
//! concurrency limit alone cannot keep fast calls under a rate limit (one call at a time
//! of 20 ms is 50 a second), so once a rate limit is known a 429 lowers the rate instead
//! of the concurrency: it takes a fifth off (with the same once-per-round rule) and every
//! answered call gives back 2% of it.
//!
//! A provider that declares nothing still gets a requests bucket once its 429s are dense
//! (a third of recent calls: a rate limit reached, not an overloaded server's scattered
//! refusals): one inferred from the answers of the last few seconds (less a tenth). It grows by 0.5%
//! per answered call while no 429 comes, so it finds the limit from below, never falls
//! below half the rate it was inferred at (429s unrelated to the rate would take it down
//! without end), and is dropped after ten seconds without a 429 (a limit still there is
//! inferred again).

use enrich_common::shutdown::Shutdown;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Longest hold a `Retry-After` can put on the endpoint.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// Hold after a 429 that names no wait.
const DEFAULT_HOLD: Duration = Duration::from_millis(500);
/// Answers needed before latency can count as rising.
const LATENCY_WARMUP: u64 = 20;

#[derive(Debug, Clone)]
pub struct FlowSettings {
    pub max_concurrency: usize,
    pub min_concurrency: usize,
    pub adaptive: bool,
    /// 0: latency is not a signal.
    pub latency_tolerance: f64,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// What made a call wait (for `enrich_llm_flow_waits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCause {
    Concurrency,
    RequestsPerMinute,
    TokensPerMinute,
    RetryAfter,
}

impl WaitCause {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitCause::Concurrency => "concurrency",
            WaitCause::RequestsPerMinute => "requests_per_minute",
            WaitCause::TokensPerMinute => "tokens_per_minute",
            WaitCause::RetryAfter => "retry_after",
        }
    }
}

/// A token bucket refilled continuously, holding one second's allowance (at least one
/// call's worth is let through a full bucket, which may go into debt).
#[derive(Debug)]
struct Bucket {
    /// The rate configured or declared by the provider, per minute.
    per_minute: u32,
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        let capacity = (f64::from(per_minute) / 60.0).max(1.0);
        Self { per_minute, capacity, level: capacity, at: now }
    }

    /// The refill rate per second, scaled by the adaptive factor.
    fn per_sec(&self, factor: f64) -> f64 {
        f64::from(self.per_minute) / 60.0 * factor
    }

    fn refill(&mut self, now: Instant, factor: f64) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_sec(factor)).min(self.capacity);
        self.at = now;
    }

    fn wait_for(&self, n: f64, factor: f64) -> Duration {
        let missing = n.min(self.capacity) - self.level;
        if missing <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(missing / self.per_sec(factor)) }
    }

    /// Runs at a new rate from now on (what it holds is kept, up to the new capacity).
    fn set_rate(&mut self, per_minute: u32, now: Instant, factor: f64) {
        self.refill(now, factor);
        self.per_minute = per_minute;
        self.capacity = (f64::from(per_minute) / 60.0).max(1.0);
        self.level = self.level.min(self.capacity);
    }

    fn add(&mut self, n: f64) {
        self.level = (self.level + n).min(self.capacity);
    }
}

/// An exponentially weighted moving average.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma(Option<f64>);

impl Ewma {
    fn update(&mut self, x: f64, alpha: f64) -> f64 {
        let v = match self.0 {
            None => x,
            Some(v) => v + alpha * (x - v),
        };
        self.0 = Some(v);
        v
    }
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    limit: f64,
    hold_until: Option<Instant>,
    last_decrease: Option<Instant>,
    recent: Ewma,
    long_run: Ewma,
    answers: u64,
    /// 429s so far.
    refusals: u64,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// The adaptive share of the buckets' rates, in [MIN_RATE_FACTOR, 1].
    rate_factor: f64,
    /// The requests bucket was inferred from 429s (nothing configured or declared).
    inferred: bool,
    /// The lowest an inferred rate goes: half the rate it was inferred at. 429s that have
    /// nothing to do with the rate (an overloaded server's) would otherwise take it down
    /// without end, as random loss does to any AIMD.
    inferred_floor: u32,
    /// When answers and 429s came, over the last `RATE_WINDOW`.
    answered_at: std::collections::VecDeque<Instant>,
    refused_at: std::collections::VecDeque<Instant>,
    last_429: Option<Instant>,
}

/// The span over which the answer rate is observed.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Answers in the last `RATE_WINDOW` needed to infer a rate from (before, the hold and the
/// concurrency limit act alone).
const MIN_ANSWERS_TO_INFER: usize = 5;
/// The share of 429s among the answers of the last `RATE_WINDOW` that says a rate limit is
/// reached (percent).
const MIN_REFUSED_SHARE_PCT: usize = 30;
/// A 429 while fewer than this share (percent) of the last `RATE_WINDOW`'s calls were
/// refused, with at least `MIN_ANSWERS_SCATTERED` answered, is scattered: no hold, no
/// decrease (while no rate limit is known).
const SCATTERED_SHARE_PCT: usize = 10;
const MIN_ANSWERS_SCATTERED: usize = 20;
/// An inferred requests bucket is dropped after this long without a 429 (if the limit is
/// still there, the next 429s infer it again).
const INFERRED_FOR: Duration = Duration::from_secs(10);

/// The limits a provider declares in its answers' headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeclaredLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// What the provider says is left now (`x-ratelimit-remaining-*`).
    pub requests_remaining: Option<u32>,
    pub tokens_remaining: Option<u32>,
}

/// The concurrency limit a replica starts at (at most `enricher.max_in_flight`).
const SLOW_START: usize = 4;

/// The lowest share of the rate a run of 429s can bring the buckets to.
const MIN_RATE_FACTOR: f64 = 0.1;

pub struct Flow {
    settings: FlowSettings,
    state: Mutex<State>,
    changed: Notify,
    /// Called with the new limit whenever it changes (the metric).
    on_limit: Box<dyn Fn(usize) + Send + Sync>,
}

/// Calls answered and refused (429) by the endpoint so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub answered: u64,
    pub refused: u64,
}

/// One admitted call. Dropping it frees its slot; report how it ended first.
pub struct Permit<'a> {
    flow: &'a Flow,
    started: Instant,
    estimated_tokens: u32,
}

impl Flow {
    pub fn new(settings: FlowSettings, on_limit: Box<dyn Fn(usize) + Send + Sync>) -> Self {
        let now = Instant::now();
        let state = State {
            in_flight: 0,
            // Slow start: a few calls first (their answers may declare the limits), then
            // doubling each round until the first decrease.
            // Without adaptation, the ceiling from the start.
            limit: if settings.adaptive {
                settings.max_concurrency.min(SLOW_START).max(settings.min_concurrency)
            } else {
                settings.max_concurrency
            } as f64,
            hold_until: None,
            last_decrease: None,
            recent: Ewma::default(),
            long_run: Ewma::default(),
            answers: 0,
            refusals: 0,
            requests: (settings.requests_per_minute > 0).then(|| Bucket::new(settings.requests_per_minute, now)),
            tokens: (settings.tokens_per_minute > 0).then(|| Bucket::new(settings.tokens_per_minute, now)),
            rate_factor: 1.0,
            inferred: false,
            inferred_floor: 1,
            answered_at: std::collections::VecDeque::new(),
            refused_at: std::collections::VecDeque::new(),
            last_429: None,
        };
        on_limit(state.limit as usize);
        Self { settings, state: Mutex::new(state), changed: Notify::new(), on_limit }
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit as usize).unwrap_or(self.settings.max_concurrency)
    }

    /// Every call so far: answered, and refused with a 429 (for telling a record the
    /// endpoint refuses from an endpoint that refuses everyone).
    pub fn tally(&self) -> Tally {
        self.state.lock().map(|s| Tally { answered: s.answers, refused: s.refusals }).unwrap_or_default()
    }

    /// Waits until a call estimated at `estimated_tokens` may start; None if shutdown
    /// came first. `waited` hears each cause that made it wait.
    pub async fn admit(
        &self,
        estimated_tokens: u32,
        shutdown: &Shutdown,
        waited: impl Fn(WaitCause),
    ) -> Option<Permit<'_>> {
        let mut last_cause = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (cause, wait) = {
                let Ok(mut s) = self.state.lock() else {
                    return Some(Permit { flow: self, started: Instant::now(), estimated_tokens: 0 });
                };
                match self.try_admit(&mut s, estimated_tokens, Instant::now()) {
                    Ok(()) => return Some(Permit { flow: self, started: Instant::now(), estimated_tokens }),
                    Err(w) => w,
                }
            };
            if last_cause != Some(cause) {
                waited(cause);
                last_cause = Some(cause);
            }
            let sleep = async {
                match wait {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = &mut notified => {}
                _ = sleep => {}
            }
        }
    }

    /// Takes a slot and the buckets' allowance, or says what is missing and for how long
    /// (None: until a slot frees).
    fn try_admit(&self, s: &mut State, tokens: u32, now: Instant) -> Result<(), (WaitCause, Option<Duration>)> {
        if let Some(until) = s.hold_until {
            if until > now {
                return Err((WaitCause::RetryAfter, Some(until - now)));
            }
            s.hold_until = None;
        }
        if s.inferred && s.last_429.is_some_and(|t| now.saturating_duration_since(t) > INFERRED_FOR) {
            tracing::info!("no 429 for ten seconds: the inferred LLM rate limit is dropped");
            s.requests = None;
            s.inferred = false;
        }
        if s.in_flight >= (s.limit as usize).max(1) {
            return Err((WaitCause::Concurrency, None));
        }
        let need = f64::from(tokens);
        let factor = s.rate_factor;
        if let Some(b) = &mut s.requests {
            b.refill(now, factor);
            let w = b.wait_for(1.0, factor);
            if !w.is_zero() {
                return Err((WaitCause::RequestsPerMinute, Some(w)));
            }
        }
        if let Some(b) = &mut s.tokens {
            b.refill(now, factor);
            let w = b.wait_for(need, factor);
            if !w.is_zero() {
                return Err((WaitCause::TokensPerMinute, Some(w)));
            }
        }
        if let Some(b) = &mut s.requests {
            b.level -= 1.0;
        }
        if let Some(b) = &mut s.tokens {
            b.level -= need;
        }
        s.in_flight += 1;
        Ok(())
    }

    /// Takes the limits the provider declared: a bucket runs at the declared rate when
    /// nothing lower is configured.
    pub fn learn(&self, declared: DeclaredLimits) {
        // Most endpoints declare nothing: no lock taken per answer for them.
        if declared == DeclaredLimits::default() {
            return;
        }
        let Ok(mut guard) = self.state.lock() else { return };
        let s = &mut *guard;
        let now = Instant::now();
        let factor = s.rate_factor;
        if declared.requests_per_minute.is_some_and(|d| d > 0) {
            // A declared limit replaces an inferred one.
            s.inferred = false;
        }
        let pairs = [
            (
                &mut s.requests,
                self.settings.requests_per_minute,
                declared.requests_per_minute,
                declared.requests_remaining,
            ),
            (&mut s.tokens, self.settings.tokens_per_minute, declared.tokens_per_minute, declared.tokens_remaining),
        ];
        for (bucket, configured, declared, remaining) in pairs {
            if let Some(declared) = declared.filter(|d| *d > 0) {
                let rate = if configured > 0 { configured.min(declared) } else { declared };
                match bucket {
                    Some(b) if b.per_minute != rate => {
                        tracing::info!(per_minute = rate, "LLM rate limit taken from the provider's headers");
                        b.set_rate(rate, now, factor);
                    }
                    Some(_) => {}
                    None => {
                        tracing::info!(per_minute = rate, "LLM rate limit taken from the provider's headers");
                        *bucket = Some(Bucket::new(rate, now));
                    }
                }
            }
            // Never more allowance than the provider says is left.
            if let (Some(b), Some(left)) = (bucket.as_mut(), remaining) {
                b.refill(now, factor);
                b.level = b.level.min(f64::from(left));
            }
        }
    }

    fn set_limit(&self, s: &mut State, limit: f64) {
        let limit = limit.clamp(self.settings.min_concurrency as f64, self.settings.max_concurrency as f64);
        let before = s.limit as usize;
        s.limit = limit;
        if limit as usize != before {
            (self.on_limit)(limit as usize);
        }
    }

    /// A decrease, unless one was made after this call started.
    fn decrease(&self, s: &mut State, started: Instant, factor: f64) -> bool {
        if !self.settings.adaptive || s.last_decrease.is_some_and(|t| started <= t) {
            return false;
        }
        s.last_decrease = Some(Instant::now());
        let limit = s.limit * factor;
        self.set_limit(s, limit);
        true
    }

    fn set_rate_factor(&self, s: &mut State, factor: f64) {
        let now = Instant::now();
        let before = s.rate_factor;
        for b in [&mut s.requests, &mut s.tokens].into_iter().flatten() {
            b.refill(now, before);
        }
        s.rate_factor = factor.clamp(MIN_RATE_FACTOR, 1.0);
    }
}

/// Forgets what happened before the last `RATE_WINDOW`.
fn trim(times: &mut std::collections::VecDeque<Instant>, now: Instant) {
    while times.front().is_some_and(|t| now.saturating_duration_since(*t) > RATE_WINDOW) {
        times.pop_front();
    }
}

impl Permit<'_> {
    /// The call was answered after `latency`, using `tokens` in all.
    pub fn answered(self, latency: Duration, tokens: u32) {
        let flow = self.flow;
        if let Ok(mut s) = flow.state.lock() {
            if let Some(b) = &mut s.tokens {
                b.add(f64::from(self.estimated_tokens) - f64::from(tokens));
            }
            // Slow calls of a heavy tail are not congestion: each sample counts at most
            // 1.5 times the tolerance over the long-run average, so the recent average
            // passes the tolerance only when most recent calls are slow: latency that has
            // risen, not a tail.
            let mut x = latency.as_secs_f64();
            if let Some(long_run) = s.long_run.0
                && flow.settings.latency_tolerance > 0.0
            {
                x = x.min(long_run * flow.settings.latency_tolerance * 1.5);
            }
            let recent = s.recent.update(x, 0.1);
            let long_run = s.long_run.update(x, 0.01);
            s.answers += 1;
            let slow = flow.settings.latency_tolerance > 0.0
                && s.answers > LATENCY_WARMUP
                && recent > flow.settings.latency_tolerance * long_run;
            if !(slow && flow.decrease(&mut s, self.started, 0.9))
                && flow.settings.adaptive
                && (s.in_flight as f64) * 2.0 >= s.limit
            {
                let step = if s.last_decrease.is_none() { 1.0 } else { 1.0 / s.limit };
                let limit = s.limit + step;
                flow.set_limit(&mut s, limit);
            }
            let now = Instant::now();
            s.answered_at.push_back(now);
            trim(&mut s.answered_at, now);
            if flow.settings.adaptive && s.rate_factor < 1.0 {
                let factor = s.rate_factor + 0.02;
                flow.set_rate_factor(&mut s, factor);
            } else if s.inferred
                && let Some(b) = &mut s.requests
            {
                let grown = (f64::from(b.per_minute) * 1.005).ceil() as u32;
                b.set_rate(grown, now, 1.0);
            }
        }
    }

    /// The endpoint answered 429: every call waits `retry_after` (or a short default), and
    /// the limit halves.
    pub fn rate_limited(self, retry_after: Option<Duration>) {
        let flow = self.flow;
        let Ok(mut guard) = flow.state.lock() else { return };
        let s = &mut *guard;
        let now = Instant::now();
        s.last_429 = Some(now);
        s.refusals += 1;
        s.refused_at.push_back(now);
        trim(&mut s.refused_at, now);
        trim(&mut s.answered_at, now);
        let (answered, refused) = (s.answered_at.len(), s.refused_at.len());
        let scattered = s.requests.is_none()
            && s.tokens.is_none()
            && answered >= MIN_ANSWERS_SCATTERED
            && refused * 100 < (answered + refused) * SCATTERED_SHARE_PCT;
        if scattered && flow.settings.adaptive {
            return;
        }
        let until = now + retry_after.unwrap_or(DEFAULT_HOLD).min(MAX_HOLD);
        s.hold_until = Some(s.hold_until.map_or(until, |u| u.max(until)));
        // The provider has nothing left: neither have the buckets.
        let factor = s.rate_factor;
        for b in [&mut s.requests, &mut s.tokens].into_iter().flatten() {
            b.refill(now, factor);
            b.level = b.level.min(0.0);
        }
        // One reaction per round: the 429s of calls started before the last one are the
        // same congestion event.
        if !flow.settings.adaptive || s.last_decrease.is_some_and(|t| self.started <= t) {
            return;
        }
        s.last_decrease = Some(now);
        if s.inferred {
            // An inferred rate overshot: it comes down itself (growing back 0.5% per
            // answer), rather than through the factor it would outgrow.
            let (factor, floor) = (s.rate_factor, s.inferred_floor);
            if let Some(b) = &mut s.requests {
                let lower = ((f64::from(b.per_minute) * 0.8) as u32).max(floor);
                b.set_rate(lower, now, factor);
            }
        } else if s.requests.is_some() || s.tokens.is_some() {
            // A known rate limit (configured or declared): the rate is what comes down.
            let factor = s.rate_factor * 0.8;
            flow.set_rate_factor(s, factor);
        } else {
            // No rate known: fewer calls at once, and once answers give a rate to go by,
            // pace at it.
            let limit = s.limit * 0.5;
            flow.set_limit(s, limit);
            // A rate limit refuses most calls once it is reached; scattered 429s (an
            // overloaded server's) say nothing about a rate.
            let (answered, refused) = (s.answered_at.len(), s.refused_at.len());
            if answered >= MIN_ANSWERS_TO_INFER && refused * 10 >= (answered + refused) * MIN_REFUSED_SHARE_PCT / 10 {
                let span = s
                    .answered_at
                    .front()
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t))
                    .max(Duration::from_secs(1));
                let per_minute = (s.answered_at.len() as f64 / span.as_secs_f64() * 60.0 * 0.9).max(1.0) as u32;
                tracing::info!(
                    per_minute,
                    "429 from an endpoint that declares no limits: pacing requests at the recent answer rate"
                );
                let mut bucket = Bucket::new(per_minute, now);
                bucket.level = 0.0;
                s.requests = Some(bucket);
                s.inferred = true;
                s.inferred_floor = (per_minute / 2).max(1);
            }
        }
    }

    /// The call failed otherwise: no answer was paid for, give the tokens back.
    pub fn failed(self) {
        if let Ok(mut s) = self.flow.state.lock()
            && let Some(b) = &mut s.tokens
        {
            b.add(f64::from(self.estimated_tokens));
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.flow.state.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        self.flow.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings(max: usize, rpm: u32, tpm: u32) -> FlowSettings {
        FlowSettings {
            max_concurrency: max,
            min_concurrency: 1,
            adaptive: true,
            latency_tolerance: 2.0,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    /// A flow and the limit it last reported.
    fn new_flow(max: usize, rpm: u32, tpm: u32) -> (Flow, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        (Flow::new(settings(max, rpm, tpm), Box::new(move |l| s.store(l, Ordering::SeqCst))), seen)
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_limit_once_per_round_and_answers_grow_it_back() {
        let (flow, limit) = new_flow(16, 0, 0);
        let shutdown = Shutdown::new();
        assert_eq!(limit.load(Ordering::SeqCst), 4, "slow start");
        warm_up(&flow, &shutdown, 16).await;
        assert_eq!(limit.load(Ordering::SeqCst), 16);
        let mut permits = Vec::new();
        for _ in 0..16 {
            permits.push(flow.admit(0, &shutdown, |_| {}).await.unwrap());
        }
        // Sixteen calls of one round answer 429: one decrease.
        for p in permits.drain(..) {
            p.rate_limited(Some(Duration::from_millis(100)));
        }
        assert_eq!(flow.limit(), 8);
        // Nobody starts during the hold.
        let t = Instant::now();
        let p = flow.admit(0, &shutdown, |_| {}).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        // A call started after the decrease can decrease again.
        assert!(!flow.state.lock().unwrap().inferred, "one 429 round in many answers is no rate limit");
        p.rate_limited(None);
        assert_eq!(flow.limit(), 4);
        // Healthy answers with the limit in use grow it back by one per round.
        for _ in 0..200 {
            let batch: Vec<_> = futures_join(&flow, &shutdown, flow.limit()).await;
            for p in batch {
                p.answered(Duration::from_millis(50), 10);
            }
        }
        assert_eq!(flow.limit(), 16);
        assert_eq!(limit.load(Ordering::SeqCst), 16);
    }

    #[tokio::test(start_paused = true)]
    async fn scattered_429s_neither_hold_the_calls_nor_lower_the_limit() {
        let (flow, _) = new_flow(16, 0, 0);
        let shutdown = Shutdown::new();
        warm_up(&flow, &shutdown, 16).await;
        // One call in twenty refused, over a few seconds: an overloaded server's 429s.
        for i in 0..400 {
            let p = flow.admit(0, &shutdown, |_| {}).await.unwrap();
            if i % 20 == 19 {
                p.rate_limited(Some(Duration::from_millis(200)));
            } else {
                p.answered(Duration::from_millis(50), 10);
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(flow.limit(), 16, "the limit stays at its ceiling");
        let t = Instant::now();
        drop(flow.admit(0, &shutdown, |_| {}).await.unwrap());
        assert_eq!(t.elapsed(), Duration::ZERO, "no hold after a scattered 429");
        // Dense 429s (half the calls) are a limit reached: the limit comes down.
        for i in 0..150 {
            let p = flow.admit(0, &shutdown, |_| {}).await.unwrap();
            if i % 2 == 0 {
                p.rate_limited(Some(Duration::from_millis(10)));
            } else {
                p.answered(Duration::from_millis(50), 10);
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        assert!(flow.limit() < 16, "limit {}", flow.limit());
    }

    async fn futures_join<'a>(flow: &'a Flow, shutdown: &Shutdown, n: usize) -> Vec<Permit<'a>> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(flow.admit(0, shutdown, |_| {}).await.unwrap());
        }
        v
    }

    /// Rounds of healthy answers until the slow start has reached the ceiling.
    async fn warm_up(flow: &Flow, shutdown: &Shutdown, max: usize) {
        while flow.limit() < max {
            for p in futures_join(flow, shutdown, flow.limit()).await {
                p.answered(Duration::from_millis(100), 10);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rising_latency_takes_the_limit_down() {
        let (flow, _) = new_flow(10, 0, 0);
        let shutdown = Shutdown::new();
        warm_up(&flow, &shutdown, 10).await;
        for _ in 0..50 {
            let batch = futures_join(&flow, &shutdown, 5).await;
            for p in batch {
                p.answered(Duration::from_millis(100), 10);
            }
        }
        assert_eq!(flow.limit(), 10);
        for _ in 0..10 {
            let p = flow.admit(0, &shutdown, |_| {}).await.unwrap();
            p.answered(Duration::from_millis(1000), 10);
        }
        assert!(flow.limit() < 10, "limit {}", flow.limit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_heavy_tail_alone_does_not_lower_the_limit() {
        let (flow, _) = new_flow(10, 0, 0);
        let shutdown = Shutdown::new();
        warm_up(&flow, &shutdown, 10).await;
        // One call in fifty takes 100 times as long: the tail of a slow LLM, not congestion.
        for i in 0..500 {
            let batch = futures_join(&flow, &shutdown, 5).await;
            for (j, p) in batch.into_iter().enumerate() {
                let ms = if (i * 5 + j) % 50 == 49 { 20_000 } else { 200 };
                p.answered(Duration::from_millis(ms), 10);
            }
        }
        assert_eq!(flow.limit(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_buckets_pace_calls() {
        // 120 requests per minute: two per second after the first second's two.
        let (flow, _) = new_flow(100, 120, 0);
        let shutdown = Shutdown::new();
        let t = Instant::now();
        let causes = std::sync::Mutex::new(Vec::new());
        for _ in 0..6 {
            flow.admit(0, &shutdown, |c| causes.lock().unwrap().push(c)).await.unwrap().answered(Duration::ZERO, 0);
        }
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2100), "{elapsed:?}");
        assert!(causes.lock().unwrap().iter().all(|c| *c == WaitCause::RequestsPerMinute));
        // Tokens: 600 per minute is 10 per second; a call estimated at 10 waits a second
        // after the first, and the real use is settled after it.
        let (flow, _) = new_flow(100, 0, 600);
        let t = Instant::now();
        flow.admit(10, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 5);
        // 5 given back: the next 10 need half a second.
        flow.admit(10, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 10);
        assert_eq!(t.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn declared_limits_pace_calls_and_a_429_slows_the_rate() {
        let (flow, _) = new_flow(100, 0, 0);
        let shutdown = Shutdown::new();
        flow.learn(DeclaredLimits { requests_per_minute: Some(120), ..Default::default() });
        // Two a second: the bucket's two, then one per 500 ms.
        let t = Instant::now();
        for _ in 0..4 {
            flow.admit(0, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 0);
        }
        assert_eq!(t.elapsed(), Duration::from_secs(1));
        // A 429 takes a fifth off the rate: the next call comes 625 ms later, not 500.
        flow.admit(0, &shutdown, |_| {}).await.unwrap().rate_limited(Some(Duration::ZERO));
        let t = Instant::now();
        flow.admit(0, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 0);
        let waited = t.elapsed().as_secs_f64();
        assert!((waited - 0.625).abs() < 0.002, "{waited}");
        // A configured rate lower than the declared one stays.
        let (flow, _) = new_flow(100, 60, 0);
        flow.learn(DeclaredLimits { requests_per_minute: Some(120), ..Default::default() });
        let t = Instant::now();
        for _ in 0..3 {
            flow.admit(0, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 0);
        }
        assert_eq!(t.elapsed(), Duration::from_secs(2), "one a second");
        // Nothing left, says the provider: the next call waits for the refill.
        flow.learn(DeclaredLimits { requests_per_minute: Some(60), requests_remaining: Some(0), ..Default::default() });
        let t = Instant::now();
        flow.admit(0, &shutdown, |_| {}).await.unwrap().answered(Duration::ZERO, 0);
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_declared_limits_paces_at_the_recent_answer_rate() {
        let (flow, _) = new_flow(100, 0, 0);
        let shutdown = Shutdown::new();
        let call = || async { flow.admit(0, &shutdown, |_| {}).await.unwrap() };
        // A 429 before any answer gives no rate to go by: the hold alone.
        call().await.rate_limited(Some(Duration::from_millis(100)));
        let t = Instant::now();
        for _ in 0..20 {
            call().await.answered(Duration::from_millis(10), 0);
        }
        assert_eq!(t.elapsed(), Duration::from_millis(100), "not paced, only held");
        tokio::time::advance(Duration::from_secs(10)).await;
        infer_at_ten_a_second(&flow, &shutdown).await;
        // Paced from now on: 9 a second (less a fifth after the 429, growing back), a
        // bucket of one second's allowance.
        let t = Instant::now();
        for _ in 0..36 {
            call().await.answered(Duration::from_millis(10), 0);
        }
        let paced = t.elapsed().as_secs_f64();
        assert!((2.5..4.0).contains(&paced), "36 calls took {paced} s");
        // Ten seconds without a 429: the inferred limit goes, calls are no longer paced.
        tokio::time::advance(Duration::from_secs(11)).await;
        call().await.answered(Duration::from_millis(10), 0);
        let t = Instant::now();
        for _ in 0..100 {
            call().await.answered(Duration::from_millis(10), 0);
        }
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    /// Ten answers a second, then 429s for most calls: a rate limit reached.
    async fn infer_at_ten_a_second(flow: &Flow, shutdown: &Shutdown) {
        for _ in 0..10 {
            flow.admit(0, shutdown, |_| {}).await.unwrap().answered(Duration::from_millis(10), 0);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        for _ in 0..5 {
            flow.admit(0, shutdown, |_| {}).await.unwrap().rate_limited(Some(Duration::from_millis(1)));
            let s = flow.state.lock().unwrap();
            assert_eq!(s.inferred, s.refused_at.len() == 5, "inferred once a third of the calls are refused");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unrelated_429s_take_an_inferred_rate_down_to_half_at_most() {
        let (flow, _) = new_flow(100, 0, 0);
        let shutdown = Shutdown::new();
        let call = || async { flow.admit(0, &shutdown, |_| {}).await.unwrap() };
        infer_at_ten_a_second(&flow, &shutdown).await;
        let rate = || flow.state.lock().unwrap().requests.as_ref().map(|b| b.per_minute);
        let inferred = rate().unwrap();
        assert!((530..=540).contains(&inferred), "ten a second, less a tenth: {inferred}");
        // An overloaded server answering 429 whatever the pace: every round is cut.
        for _ in 0..50 {
            call().await.rate_limited(Some(Duration::ZERO));
        }
        assert_eq!(rate(), Some(inferred / 2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_adaptation_the_limit_is_the_ceiling_from_the_start() {
        let flow = Flow::new(FlowSettings { adaptive: false, ..settings(64, 0, 0) }, Box::new(|_| {}));
        let shutdown = Shutdown::new();
        let permits = futures_join(&flow, &shutdown, 64).await;
        assert_eq!(permits.len(), 64);
        for p in permits {
            p.rate_limited(Some(Duration::ZERO));
        }
        assert_eq!(flow.limit(), 64, "429s do not lower it either");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_limit_waits_for_a_slot() {
        let (flow, _) = new_flow(2, 0, 0);
        let shutdown = Shutdown::new();
        let a = flow.admit(0, &shutdown, |_| {}).await.unwrap();
        let _b = flow.admit(0, &shutdown, |_| {}).await.unwrap();
        let third = flow.admit(0, &shutdown, |_| {});
        tokio::pin!(third);
        assert!(tokio::time::timeout(Duration::from_secs(1), &mut third).await.is_err(), "no third slot");
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(1), third).await.expect("the freed slot is taken");
        shutdown.cancel();
        assert!(flow.admit(0, &shutdown, |_| {}).await.is_none(), "shutdown ends the wait");
    }
}
