use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Default)]
pub struct IngestMetrics {
    /// Source records read, per topic.
    pub consumed: Family<Labels, Counter>,
    /// Source records by what became of them: forwarded, duplicate, redelivered, dead_lettered.
    pub records: Family<Labels, Counter>,
    /// Dead letters by reason.
    pub dead_letters: Family<Labels, Counter>,
    /// Batches that failed and were retried.
    pub batch_retries: Counter,
}

impl IngestMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "enrich_records_consumed",
            "Records read from Kafka, per topic",
            m.consumed.clone(),
        );
        registry.register(
            "enrich_ingest_records",
            "Source records by outcome",
            m.records.clone(),
        );
        registry.register(
            "enrich_dead_letters",
            "Records sent to the DLQ, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "enrich_batch_retries",
            "Batches that failed and were retried",
            m.batch_retries.clone(),
        );
        m
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.records
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }
}
