use enrich_common::service::{Labels, StageMetrics, inc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct EnricherMetrics {
    /// Consumed, dead letters, batch retries: what every stage counts.
    pub stage: StageMetrics,
    /// Requests by outcome: enriched, reused, dead_lettered.
    pub records: Family<Labels, Counter>,
    /// LLM calls by outcome (ok, or the failure reason).
    pub llm_calls: Family<Labels, Counter>,
    pub llm_tokens: Family<Labels, Counter>,
    /// USD spent on LLM calls, at the configured prices.
    pub llm_cost: Counter<f64, std::sync::atomic::AtomicU64>,
    pub llm_latency: Histogram,
    pub in_flight: Gauge,
    /// Flow control's concurrency limit now.
    pub concurrency_limit: Gauge,
    /// Calls that had to wait for their turn, by cause.
    pub flow_waits: Family<Labels, Counter>,
    /// Calls answered by a fallback model, by model.
    pub fallbacks: Family<Labels, Counter>,
    /// 1 while the LLM circuit breaker is open.
    pub breaker_open: Gauge,
    /// Records read from the retry topic and held until they are due.
    pub retries_waiting: Gauge,
    /// Delayed retries sent to the retry topic.
    pub retries_scheduled: Counter,
    /// 1 while a budget window is spent (calls wait for the next one).
    pub budget_exhausted: Gauge,
    /// 1 while the operator has paused enrichment.
    pub paused: Gauge,
    /// Response-cache lookups, and the hits among them (answers served without a call).
    pub cache_lookups: Counter,
    pub cache_hits: Counter,
    /// Records parked behind an earlier record of their key (`ordering = "strict-key"`).
    pub parked: Counter,
}

impl EnricherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            stage: StageMetrics::default(),
            records: Family::default(),
            llm_calls: Family::default(),
            llm_tokens: Family::default(),
            llm_cost: Counter::default(),
            llm_latency: Histogram::new([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            in_flight: Gauge::default(),
            concurrency_limit: Gauge::default(),
            flow_waits: Family::default(),
            fallbacks: Family::default(),
            breaker_open: Gauge::default(),
            retries_waiting: Gauge::default(),
            retries_scheduled: Counter::default(),
            parked: Counter::default(),
            cache_hits: Counter::default(),
            cache_lookups: Counter::default(),
            paused: Gauge::default(),
            budget_exhausted: Gauge::default(),
        };
        registry.register("enrich_enricher_records", "Requests by outcome", m.records.clone());
        registry.register("enrich_paused", "1 while the operator has paused enrichment", m.paused.clone());
        registry.register(
            "enrich_budget_exhausted",
            "1 while an LLM budget window is spent",
            m.budget_exhausted.clone(),
        );
        registry.register("enrich_llm_calls", "LLM calls by outcome", m.llm_calls.clone());
        registry.register("enrich_llm_tokens", "LLM tokens, by direction (input, output)", m.llm_tokens.clone());
        registry.register(
            "enrich_llm_cost_usd",
            "USD spent on LLM calls, at the configured prices",
            m.llm_cost.clone(),
        );
        registry.register("enrich_llm_latency_seconds", "LLM call latency", m.llm_latency.clone());
        registry.register("enrich_in_flight", "LLM calls in flight", m.in_flight.clone());
        registry.register(
            "enrich_llm_concurrency_limit",
            "Flow control's limit on LLM calls in flight (adaptive)",
            m.concurrency_limit.clone(),
        );
        registry.register(
            "enrich_llm_flow_waits",
            "LLM calls that waited for their turn, by cause (concurrency, requests_per_minute, tokens_per_minute, retry_after)",
            m.flow_waits.clone(),
        );
        registry.register(
            "enrich_llm_fallbacks",
            "LLM calls answered by a fallback model, by model",
            m.fallbacks.clone(),
        );
        registry.register("enrich_llm_breaker_open", "1 while the LLM circuit breaker is open", m.breaker_open.clone());
        registry.register(
            "enrich_retries_waiting",
            "Records read from the retry topic, held until due",
            m.retries_waiting.clone(),
        );
        registry.register(
            "enrich_retries_scheduled",
            "Delayed retries sent to the retry topic",
            m.retries_scheduled.clone(),
        );
        registry.register(
            "enrich_parked",
            "Records parked behind an earlier record of their key (strict-key)",
            m.parked.clone(),
        );
        registry.register(
            "enrich_llm_cache_hits",
            "Answers served from the response cache (no call made)",
            m.cache_hits.clone(),
        );
        registry.register("enrich_llm_cache_lookups", "Response cache lookups", m.cache_lookups.clone());
        m
    }

    pub fn outcome(&self, outcome: &str) {
        inc(&self.records, "outcome", outcome);
    }

    pub fn tokens(&self, input: u32, output: u32) {
        self.llm_tokens.get_or_create(&vec![("direction", "input".to_string())]).inc_by(u64::from(input));
        self.llm_tokens.get_or_create(&vec![("direction", "output".to_string())]).inc_by(u64::from(output));
    }

    pub fn cost(&self, usd: f64) {
        self.llm_cost.inc_by(usd);
    }

    pub fn flow_wait(&self, cause: &str) {
        inc(&self.flow_waits, "cause", cause);
    }

    pub fn fallback(&self, model: &str) {
        inc(&self.fallbacks, "model", model);
    }

    pub fn llm_call(&self, outcome: &str) {
        inc(&self.llm_calls, "outcome", outcome);
    }
}
