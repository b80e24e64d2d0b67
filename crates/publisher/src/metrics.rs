use enrich_common::service::{Labels, inc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct PublisherMetrics {
    /// Results by outcome: published, already_published, duplicate_result, and
    /// result_replaced (the record carried another result than the stored one).
    pub records: Family<Labels, Counter>,
    /// From the source record's timestamp to its output being committed.
    pub end_to_end: Histogram,
}

impl PublisherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            records: Family::default(),
            end_to_end: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
        };
        registry.register("enrich_publisher_records", "Results by outcome", m.records.clone());
        registry.register(
            "enrich_end_to_end_latency_seconds",
            "From the source record's timestamp to its enriched output being committed",
            m.end_to_end.clone(),
        );
        m
    }

    pub fn outcome(&self, outcome: &str) {
        inc(&self.records, "outcome", outcome);
    }
}
