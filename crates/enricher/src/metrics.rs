use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct EnricherMetrics {
    pub consumed: Family<Labels, Counter>,
    /// Records by outcome: enriched, reused, dead_lettered.
    pub records: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    /// LLM calls by outcome (ok, or the failure reason).
    pub llm_calls: Family<Labels, Counter>,
    pub llm_tokens: Family<Labels, Counter>,
    pub llm_latency: Histogram,
    pub in_flight: Gauge,
    pub batch_retries: Counter,
}

impl EnricherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            consumed: Family::default(),
            records: Family::default(),
            dead_letters: Family::default(),
            llm_calls: Family::default(),
            llm_tokens: Family::default(),
            llm_latency: Histogram::new([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            in_flight: Gauge::default(),
            batch_retries: Counter::default(),
        };
        registry.register(
            "enrich_records_consumed",
            "Records read from Kafka, per topic",
            m.consumed.clone(),
        );
        registry.register(
            "enrich_enricher_records",
            "Requests by outcome",
            m.records.clone(),
        );
        registry.register(
            "enrich_dead_letters",
            "Records sent to the DLQ, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "enrich_llm_calls",
            "LLM calls by outcome",
            m.llm_calls.clone(),
        );
        registry.register(
            "enrich_llm_tokens",
            "LLM tokens, by direction (input, output)",
            m.llm_tokens.clone(),
        );
        registry.register(
            "enrich_llm_latency_seconds",
            "LLM call latency",
            m.llm_latency.clone(),
        );
        registry.register(
            "enrich_in_flight",
            "Keys being enriched now",
            m.in_flight.clone(),
        );
        registry.register(
            "enrich_batch_retries",
            "Batches that failed and were retried",
            m.batch_retries.clone(),
        );
        m
    }

    pub fn inc(family: &Family<Labels, Counter>, label: &'static str, value: &str) {
        family
            .get_or_create(&vec![(label, value.to_string())])
            .inc();
    }
}
