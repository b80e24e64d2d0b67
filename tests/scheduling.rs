//! The enricher's scheduler on the real stack: order per key under random LLM latency,
//! and replicas joining and leaving mid-run.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::headers;
use enrich_e2e::loadgen::accounting::account;
use enrich_e2e::loadgen::kafka_io::{Produced, header, produce_all, read_to_end};
use enrich_e2e::loadgen::tickets::ticket;
use enrich_e2e::loadgen::workload::{Kind, Record};
use enrich_e2e::{StageKind, TestEnv, count_in_states, wait_for};
use rdkafka::Message;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(240);

/// `n` distinct tickets spread over `keys` Kafka keys, in ticket order.
fn keyed_tickets(run: &str, n: usize, keys: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let t = ticket(run, i);
            Record {
                kind: Kind::Unique,
                key: Some(format!("customer-{}", i % keys).into_bytes()),
                value: Some(t.to_json()),
                ticket: Some(t),
            }
        })
        .collect()
}

async fn wait_all_published(env: &TestEnv, produced: &[Produced]) -> anyhow::Result<()> {
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("every record to be published", DEADLINE, || async {
        let a = account(&env.pool, &env.settings.pipeline.name, env.source_topic(), produced).await?;
        let done = a.complete(produced.len())
            && enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?;
        Ok(done.then_some(()))
    })
    .await
}

/// Output records, checked to hold every ticket exactly once.
fn read_output_once(env: &TestEnv, n: usize) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(60))?;
    let keys: HashSet<String> = output.iter().filter_map(|m| header(m, headers::IDEMPOTENCY_KEY)).collect();
    assert_eq!(output.len(), n, "one output record per ticket");
    assert_eq!(keys.len(), n, "no idempotency key twice");
    Ok(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_of_one_key_are_published_in_source_order_under_random_latency() -> anyhow::Result<()> {
    const N: usize = 2_000;
    const KEYS: usize = 50;
    let latency = llm_sim::Latency::parse("uniform:1-40").map_err(anyhow::Error::msg)?;
    let overrides = [("ENRICH_ENRICHER__MAX_IN_FLIGHT", "64".to_string())];
    let env = TestEnv::new(latency, &overrides).await?;
    let records = keyed_tickets(&env.id, N, KEYS);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_all_published(&env, &produced).await?;
    for s in stages {
        s.stop().await?;
    }

    let output = read_output_once(&env, N)?;
    // Per Kafka key, the ticket numbers must come out in the order they went in.
    let mut last: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut by_partition: HashMap<i32, Vec<&rdkafka::message::OwnedMessage>> = HashMap::new();
    for m in &output {
        by_partition.entry(m.partition()).or_default().push(m);
    }
    for messages in by_partition.values_mut() {
        messages.sort_by_key(|m| m.offset());
        for m in messages.iter() {
            let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap())?;
            let n: usize = value["id"].as_str().unwrap().rsplit('-').next().unwrap().parse()?;
            let key = m.key().unwrap().to_vec();
            if let Some(prev) = last.insert(key.clone(), n) {
                assert!(n > prev, "key {} published {n} after {prev}", String::from_utf8_lossy(&key));
            }
        }
    }
    assert_eq!(last.len(), KEYS);
    // Concurrency inside partitions did happen: the records were not run one at a time.
    assert_eq!(env.sim.completions(), N as u64);
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_joining_and_leaving_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    const N: usize = 2_000;
    let overrides = [
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "16".to_string()),
        ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000".to_string()),
        ("ENRICH_KAFKA__CLIENT__HEARTBEAT.INTERVAL.MS", "500".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(15)), &overrides).await?;
    let records = keyed_tickets(&env.id, N, 400);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;

    let ingest = env.spawn(StageKind::Ingest);
    let publisher = env.spawn(StageKind::Publisher);
    let first = env.spawn_with(StageKind::Enricher, |s| s.enricher.instance_id = Some("replica-a".into()));
    wait_for("the first replica to get going", DEADLINE, || async {
        Ok((count_in_states(&env, &["enriched", "published"]).await? >= 200).then_some(()))
    })
    .await?;
    // No call starts while the second replica joins (the kill switch), so the first cannot
    // finish everything before the group has rebalanced, however fast this machine is.
    let pipeline = env.settings.pipeline.name.clone();
    dlq_replayer::replay::set_paused(&env.pool, &pipeline, true, Some("a replica joins")).await?;
    let port = enrich_e2e::free_port()?;
    let second = env.spawn_with(StageKind::Enricher, |s| {
        s.enricher.instance_id = Some("replica-b".into());
        s.enricher.http_port = port;
    });
    wait_for("the second replica to be assigned partitions", DEADLINE, || async {
        let Ok(m) = enrich_e2e::scrape_metrics(port).await else { return Ok(None) };
        Ok(m.keys().any(|k| k.starts_with("enrich_consumer_lag{")).then_some(()))
    })
    .await?;
    dlq_replayer::replay::set_paused(&env.pool, &pipeline, false, None).await?;
    let by_worker = |worker: &'static str| {
        let pool = env.pool.clone();
        let pipeline = env.settings.pipeline.name.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM run_history WHERE pipeline = $1 AND stage = 'enricher' AND status = 'enriched' AND worker = $2",
            )
            .bind(&pipeline)
            .bind(worker)
            .fetch_one(&pool)
            .await?;
            anyhow::Ok(n)
        }
    };
    wait_for("the second replica to take partitions and enrich", DEADLINE, || async {
        Ok((by_worker("replica-b").await? >= 100).then_some(()))
    })
    .await?;
    first.stop().await?;
    let done_when_a_left = count_in_states(&env, &["enriched", "published"]).await?;
    assert!(done_when_a_left < N as i64, "replica A left with work remaining ({done_when_a_left} done)");

    wait_all_published(&env, &produced).await?;
    for s in [ingest, second, publisher] {
        s.stop().await?;
    }
    read_output_once(&env, N)?;
    let (a, b) = (by_worker("replica-a").await?, by_worker("replica-b").await?);
    assert!(a > 0 && b > 0, "both replicas enriched records: a={a} b={b}");
    assert_eq!(a + b, N as i64, "each ticket enriched once, by one replica");
    assert_eq!(env.sim.completions(), N as u64, "no paid call repeated across the rebalances");
    env.teardown().await;
    Ok(())
}
