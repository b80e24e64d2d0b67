//! End to end on the real stack: tickets in, one enriched record per ticket out,
//! duplicates recorded, malformed records dead-lettered, one LLM call per ticket —
//! also when the enricher is stopped halfway and started again.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::{TraceContext, headers};
use enrich_e2e::loadgen::accounting::{Accounting, account};
use enrich_e2e::loadgen::kafka_io::{Produced, header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload::{self, Kind, Record, Spec};
use enrich_e2e::{StageKind, TestEnv, wait_for};
use rdkafka::Message;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const UNIQUE: usize = 500;
const DUPLICATES: usize = 100;
const MALFORMED: usize = 5;
const DEADLINE: Duration = Duration::from_secs(180);

fn spec(env: &TestEnv) -> Spec {
    Spec { run: env.id.clone(), unique: UNIQUE, duplicates: DUPLICATES, malformed: MALFORMED }
}

async fn wait_complete(env: &TestEnv, produced: &[Produced]) -> anyhow::Result<Accounting> {
    let pipeline = env.settings.pipeline.name.clone();
    let topic = env.source_topic().to_string();
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("every record to be accounted for", DEADLINE, || async {
        let a = account(&env.pool, &pipeline, &topic, produced).await?;
        // The publisher must also have consumed every result, so no late copy is pending.
        let caught_up = a.complete(produced.len())
            && enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?;
        Ok(caught_up.then_some(a))
    })
    .await
}

/// Checks everything the issue promises about the end state.
async fn assert_end_state(
    env: &TestEnv,
    records: &[Record],
    produced: &[Produced],
    acct: &Accounting,
) -> anyhow::Result<()> {
    assert_eq!(acct.read, (UNIQUE + DUPLICATES + MALFORMED) as i64, "{acct:?}");
    assert_eq!(acct.forwarded, UNIQUE as i64, "{acct:?}");
    assert_eq!(acct.duplicates, DUPLICATES as i64, "{acct:?}");
    assert_eq!(acct.dead_lettered_at_ingest, MALFORMED as i64, "{acct:?}");
    assert_eq!(acct.published, UNIQUE as i64, "{acct:?}");
    assert_eq!(acct.llm_calls, UNIQUE as i64, "audit records one paid call per key: {acct:?}");
    assert_eq!(env.sim.completions(), UNIQUE as u64, "llm-sim served exactly one call per unique ticket");

    let pipeline = &env.settings.pipeline.name;
    let published: (i64,) =
        sqlx::query_as("SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND state = 'published'")
            .bind(pipeline)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(published.0, UNIQUE as i64);

    // Which source record owns each key, and the trace it was sent with.
    let owners: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT idempotency_key, source_partition, source_offset FROM enrich_state WHERE pipeline = $1")
            .bind(pipeline)
            .fetch_all(&env.pool)
            .await?;
    let by_coords: HashMap<(i32, i64), usize> =
        produced.iter().enumerate().map(|(i, p)| ((p.partition, p.offset), i)).collect();
    let owner_trace: HashMap<String, Option<TraceContext>> = owners
        .into_iter()
        .map(|(k, p, o)| (k, by_coords.get(&(p, o)).and_then(|&i| produced[i].trace.clone())))
        .collect();

    let prompt = enricher::prompt::PromptTemplate::new(&env.settings.llm)?;
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(60))?;
    assert_eq!(output.len(), UNIQUE, "exactly one output record per unique ticket");
    let mut seen = HashSet::new();
    let mut traced = 0;
    for m in &output {
        let key = header(m, headers::IDEMPOTENCY_KEY).expect("idempotency-key header");
        assert!(seen.insert(key.clone()), "{key} published twice");
        let value: serde_json::Value = serde_json::from_slice(m.payload().expect("payload"))?;
        let id = value["id"].as_str().expect("id");
        assert_eq!(key, format!("{pipeline}:{id}"));
        let kafka_key = String::from_utf8(m.key().expect("key").to_vec())?;
        assert!(kafka_key == id || kafka_key.starts_with("resend-"), "output key {kafka_key} for {id}");

        // The enrichment is exactly what llm-sim computes for the rendered ticket.
        let mut source = value.clone();
        let enrichment = source.as_object_mut().and_then(|o| o.remove("enrichment")).expect("enrichment object");
        let expected = llm_sim::rules::enrich(&prompt.render(&source).map_err(|e| anyhow::anyhow!("{e}"))?.user);
        assert_eq!(enrichment, expected, "enrichment of {id}");

        let tp = header(m, headers::TRACEPARENT).expect("traceparent header");
        let trace = TraceContext::parse(&tp, None).expect("valid traceparent");
        if let Some(Some(source_trace)) = owner_trace.get(&key) {
            assert_eq!(trace.trace_id, source_trace.trace_id, "{id} stays in its source trace");
            traced += 1;
        }
    }
    assert!(traced > 100, "the test sends a third of the records with a traceparent ({traced} checked)");

    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    assert_eq!(dlq.len(), MALFORMED, "exactly the malformed records are dead-lettered");
    let expected: HashMap<(i32, i64), &str> = records
        .iter()
        .zip(produced)
        .filter_map(|(r, p)| match r.kind {
            Kind::Malformed { reason } => Some(((p.partition, p.offset), reason)),
            _ => None,
        })
        .collect();
    for m in &dlq {
        let partition: i32 = header(m, headers::DLQ_ORIGINAL_PARTITION).expect("partition header").parse()?;
        let offset: i64 = header(m, headers::DLQ_ORIGINAL_OFFSET).expect("offset header").parse()?;
        let reason = header(m, headers::DLQ_REASON).expect("reason header");
        assert_eq!(
            expected.get(&(partition, offset)).copied(),
            Some(reason.as_str()),
            "DLQ record at {partition}/{offset}"
        );
        assert_eq!(header(m, headers::DLQ_ORIGINAL_TOPIC).as_deref(), Some(env.source_topic()));
        assert_eq!(header(m, headers::DLQ_STAGE).as_deref(), Some("ingest-dedup"));
        assert_eq!(header(m, headers::DLQ_REASON_CLASS).as_deref(), Some("invalid_input"));
        assert!(!header(m, headers::DLQ_ERROR).unwrap_or_default().is_empty());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_ticket_is_enriched_once_and_duplicates_and_malformed_records_are_accounted_for() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = workload::build(&spec(&env));
    let produced = produce_all(&env.settings, env.source_topic(), &records, |i| i % 3 == 0, |_| {}).await?;

    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = wait_complete(&env, &produced).await?;
    for stage in stages {
        stage.stop().await?;
    }
    assert_end_state(&env, &records, &produced, &acct).await?;
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_enricher_halfway_loses_nothing_and_pays_for_nothing_twice() -> anyhow::Result<()> {
    // Small batches and a slower LLM so the stop lands in the middle of the work.
    let overrides =
        [("ENRICH_ENRICHER__BATCH_SIZE", "16".to_string()), ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "8".to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(20)), &overrides).await?;
    let records = workload::build(&spec(&env));
    let produced = produce_all(&env.settings, env.source_topic(), &records, |i| i % 3 == 0, |_| {}).await?;

    let ingest = env.spawn(StageKind::Ingest);
    let publisher = env.spawn(StageKind::Publisher);
    let first = env.spawn(StageKind::Enricher);
    let pipeline = env.settings.pipeline.name.clone();
    let count_done = || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND state IN ('enriched', 'published')",
        )
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
        anyhow::Ok(n)
    };
    wait_for("a first part of the tickets to be enriched", DEADLINE, || async {
        Ok((count_done().await? >= 100).then_some(()))
    })
    .await?;
    first.stop().await?;
    let done_at_stop = count_done().await?;
    assert!(done_at_stop < UNIQUE as i64, "the enricher was stopped with work left ({done_at_stop} done)");

    let second = env.spawn(StageKind::Enricher);
    let acct = wait_complete(&env, &produced).await?;
    for stage in [ingest, second, publisher] {
        stage.stop().await?;
    }
    assert_end_state(&env, &records, &produced, &acct).await?;
    env.teardown().await;
    Ok(())
}
