use enrich_common::service::{Labels, inc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct IngestMetrics {
    /// Source records by what became of them: forwarded, duplicate, redelivered, dead_lettered.
    pub records: Family<Labels, Counter>,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("enrich_ingest_records", "Source records by outcome", m.records.clone());
        m
    }

    pub fn outcome(&self, outcome: &'static str) {
        inc(&self.records, "outcome", outcome);
    }
}
