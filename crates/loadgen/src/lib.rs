//! Workloads for the demo, the end-to-end tests and the benchmarks: deterministic
//! support tickets with duplicates and malformed records, a producer that records where
//! each record landed, and an accounting of what became of each one.

pub mod accounting;
pub mod bench;
pub mod chaos;
pub mod kafka_io;
pub mod measure;
pub mod procs;
pub mod tickets;
pub mod traces;
pub mod workload;

/// `ENRICH_*` overrides that give a pipeline named `p` its own source topic (`p.raw`, key
/// `/id`) and its own intermediate and output topics: what tests and benchmarks use to stay
/// apart on one broker.
pub fn isolated_pipeline_env(p: &str) -> Vec<(String, String)> {
    let topic = |suffix: &str| format!("{p}.{suffix}");
    vec![
        ("ENRICH_PIPELINE__NAME".into(), p.to_string()),
        (
            "ENRICH_PIPELINE__SOURCES".into(),
            format!(r#"[{{topic = "{}", key = {{strategy = "json_pointer", pointers = ["/id"]}}}}]"#, topic("raw")),
        ),
        ("ENRICH_TOPICS__REQUESTS".into(), topic("requests")),
        ("ENRICH_TOPICS__RETRY".into(), topic("retry")),
        ("ENRICH_TOPICS__RESULTS".into(), topic("results")),
        ("ENRICH_TOPICS__OUTPUT".into(), topic("enriched")),
        ("ENRICH_TOPICS__DLQ".into(), topic("dlq")),
    ]
}
