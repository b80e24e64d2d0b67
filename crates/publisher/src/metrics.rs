use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Default)]
pub struct PublisherMetrics {
    pub consumed: Family<Labels, Counter>,
    /// Results by outcome: published, already_published, duplicate_result.
    pub records: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    /// Transactions aborted and retried.
    pub batch_retries: Counter,
}

impl PublisherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "enrich_records_consumed",
            "Records read from Kafka, per topic",
            m.consumed.clone(),
        );
        registry.register(
            "enrich_publisher_records",
            "Results by outcome",
            m.records.clone(),
        );
        registry.register(
            "enrich_dead_letters",
            "Records sent to the DLQ, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "enrich_batch_retries",
            "Transactions aborted and retried",
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
