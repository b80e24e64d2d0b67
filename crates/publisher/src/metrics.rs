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
    /// Seconds per step of a batch: bind (the database transaction), produce (outputs
    /// sent and delivered), offsets, commit (the Kafka transaction's) and settle.
    pub phases: Family<Labels, Histogram, fn() -> Histogram>,
}

fn phase_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
}

impl PublisherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            records: Family::default(),
            end_to_end: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            phases: Family::new_with_constructor(phase_histogram),
        };
        registry.register("enrich_publisher_records", "Results by outcome", m.records.clone());
        registry.register(
            "enrich_end_to_end_latency_seconds",
            "From the source record's timestamp to its enriched output being committed",
            m.end_to_end.clone(),
        );
        registry.register(
            "enrich_publisher_batch_phase_seconds",
            "Seconds per step of a publisher batch: bind, produce, offsets, commit, settle",
            m.phases.clone(),
        );
        m
    }

    /// Records how long `phase` of a batch took since `since`, and restarts the clock.
    pub fn phase(&self, phase: &'static str, since: &mut std::time::Instant) {
        let now = std::time::Instant::now();
        self.phases.get_or_create(&vec![("phase", phase.to_string())]).observe((now - *since).as_secs_f64());
        *since = now;
    }

    pub fn outcome(&self, outcome: &str) {
        inc(&self.records, "outcome", outcome);
    }
}
