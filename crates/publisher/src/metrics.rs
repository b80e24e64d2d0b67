use enrich_common::service::{Labels, inc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct PublisherMetrics {
    /// Results by outcome: published, already_published, duplicate_result.
    pub records: Family<Labels, Counter>,
}

impl PublisherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("enrich_publisher_records", "Results by outcome", m.records.clone());
        m
    }

    pub fn outcome(&self, outcome: &str) {
        inc(&self.records, "outcome", outcome);
    }
}
