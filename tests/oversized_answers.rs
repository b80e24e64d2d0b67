//! Answers too large to carry: an LLM answer whose body passes `llm.max_response_bytes`
//! fails the call (`bad_response`, not read further), and an enrichment result the
//! producer refuses for the results topic (`MSG_SIZE_TOO_LARGE`) is dead-lettered
//! `too_large` once, never emitted again. The stages run with the producer's default
//! `message.max.bytes`; the tickets around them are published once.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::headers;
use enrich_e2e::loadgen::kafka_io::{header, produce_all, read_to_end};
use enrich_e2e::loadgen::tickets::ticket;
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, count_in_states};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);
const N: usize = 20;

/// Runs `records` through the three stages; the DLQ and output once every record is
/// accounted for. No stage may stop on the way.
async fn run(
    env: &TestEnv,
    records: &[workload::Record],
) -> anyhow::Result<(Vec<rdkafka::message::OwnedMessage>, usize)> {
    let produced = produce_all(&env.settings, env.source_topic(), records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    env.wait_accounted(&produced, DEADLINE).await?;
    let dead = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    Ok((dead, output.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_body_over_the_cap_is_dead_lettered_bad_response() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    assert_eq!(env.settings.llm.max_response_bytes, 4 * 1024 * 1024, "the default cap");
    // A valid answer of 5 MB: past the cap.
    let records = workload::marked_tickets(&env.id, N, &[(5, "answer-bytes:5000000")]);
    let (dead, published) = run(&env, &records).await?;

    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("enricher"));
    assert_eq!(header(&dead[0], headers::DLQ_REASON).as_deref(), Some("bad_response"));
    assert_eq!(header(&dead[0], headers::DLQ_REASON_CLASS).as_deref(), Some("permanent"));
    let error = header(&dead[0], headers::DLQ_ERROR).unwrap_or_default();
    assert!(error.contains("llm.max_response_bytes"), "the message names the cap: {error}");
    assert_eq!(published, N - 1, "every other ticket published once");
    assert_eq!(count_in_states(&env, &["published"]).await?, (N - 1) as i64);
    // Permanent: the answer was asked for once, never again.
    assert_eq!(env.sim.completions(), N as u64, "one call per ticket");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_too_large_for_the_results_topic_is_dead_lettered_once() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    assert_eq!(env.settings.kafka.message_max_bytes(), 1_000_000, "the producer's default");
    let mut records = workload::marked_tickets(&env.id, N, &[]);
    // 600 KB the prompt never sees (ingest forwards it: under its budget) and an answer of
    // 500 KB (under the response cap, valid): together over the results topic's limit.
    let mut big = ticket(&env.id, N);
    big.body = format!("{} [[sim:answer-bytes:500000]]", big.body);
    let mut value: serde_json::Value = serde_json::from_slice(&big.to_json())?;
    value["attachment"] = serde_json::Value::String("a".repeat(600 * 1024));
    let big_id = big.id.clone();
    records.insert(
        7,
        workload::Record {
            kind: workload::Kind::Unique,
            key: Some(big_id.clone().into_bytes()),
            value: Some(serde_json::to_vec(&value)?),
            ticket: Some(big),
        },
    );
    let (dead, published) = run(&env, &records).await?;

    assert_eq!(dead.len(), 1, "one dead letter, written once");
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("enricher"));
    assert_eq!(header(&dead[0], headers::DLQ_REASON).as_deref(), Some("too_large"));
    let error = header(&dead[0], headers::DLQ_ERROR).unwrap_or_default();
    assert!(error.contains("message.max.bytes"), "the message says why: {error}");
    assert!(header(&dead[0], headers::IDEMPOTENCY_KEY).unwrap_or_default().ends_with(&big_id));
    assert_eq!(published, N, "every other ticket published once");
    let state: (String, bool) = sqlx::query_as(
        "SELECT state, result IS NOT NULL FROM enrich_state WHERE pipeline = $1 AND idempotency_key LIKE '%' || $2",
    )
    .bind(&env.settings.pipeline.name)
    .bind(&big_id)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(state, ("dead_lettered".to_string(), true), "dead-lettered, its paid answer kept");
    let listed: (i64,) =
        sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND reason = 'too_large'")
            .bind(&env.settings.pipeline.name)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(listed.0, 1, "listed once in dead_letters");
    assert_eq!(env.sim.completions(), (N + 1) as u64, "one paid call per ticket");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_output_the_broker_refuses_as_too_large_is_dead_lettered_once() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    // The output topic takes less than the producer does: the broker refuses the record
    // at delivery, inside the publisher's transaction.
    let output = env.settings.topics.output.clone();
    enrich_common::kafka::ensure_topics(&env.settings, &[&output]).await?;
    let admin: AdminClient<DefaultClientContext> = enrich_common::kafka::base_config(&env.settings).create()?;
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&output)).set("max.message.bytes", "100000");
    for r in admin.alter_configs(&[alter], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("cannot lower max.message.bytes: {e}"))?;
    }
    let mut records = workload::marked_tickets(&env.id, N, &[]);
    let big = ticket(&env.id, N);
    let mut value: serde_json::Value = serde_json::from_slice(&big.to_json())?;
    // Text that does not compress (the producer compresses; the broker checks the
    // compressed batch).
    // Under the 256 KiB a dead letter keeps, so it can be replayed whole.
    value["attachment"] = serde_json::Value::String(incompressible(200 * 1024));
    let big_id = big.id.clone();
    records.insert(
        7,
        workload::Record {
            kind: workload::Kind::Unique,
            key: Some(big_id.clone().into_bytes()),
            value: Some(serde_json::to_vec(&value)?),
            ticket: Some(big),
        },
    );
    let (dead, published) = run(&env, &records).await?;

    let seen: Vec<_> = dead
        .iter()
        .map(|m| {
            let h = |n| header(m, n).unwrap_or_default();
            (h(headers::DLQ_STAGE), h(headers::DLQ_REASON), h(headers::IDEMPOTENCY_KEY), h(headers::DLQ_ERROR))
        })
        .collect();
    assert_eq!(dead.len(), 1, "one dead letter, written once: {seen:?}");
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("publisher"));
    assert_eq!(header(&dead[0], headers::DLQ_REASON).as_deref(), Some("too_large"));
    let error = header(&dead[0], headers::DLQ_ERROR).unwrap_or_default();
    assert!(error.contains("too large"), "the message says why: {error}");
    assert!(header(&dead[0], headers::IDEMPOTENCY_KEY).unwrap_or_default().ends_with(&big_id));
    assert_eq!(published, N, "every other ticket published once");
    let state: (String,) =
        sqlx::query_as("SELECT state FROM enrich_state WHERE pipeline = $1 AND idempotency_key LIKE '%' || $2")
            .bind(&env.settings.pipeline.name)
            .bind(&big_id)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(state.0, "dead_lettered");

    // The operator raises the topic's limit and replays the dead letter: the key's stored
    // result is published, not paid for again.
    let calls = env.sim.completions();
    let raise = AlterConfig::new(ResourceSpecifier::Topic(&output)).set("max.message.bytes", "1000000");
    for r in admin.alter_configs(&[raise], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("cannot raise max.message.bytes: {e}"))?;
    }
    let replayer = env.replayer()?;
    let replayed = replayer.replay(&dlq_replayer::replay::Filter::default(), false, None).await?;
    assert_eq!(replayed.replayed.len(), 1, "the dead letter replayed: {:?}", replayed.refused);
    let stages = [StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let output_topic = env.settings.topics.output.clone();
    enrich_e2e::wait_for("the replayed key published", DEADLINE, || async {
        let out = tokio::task::block_in_place(|| read_to_end(&env.settings, &output_topic, Duration::from_secs(30)))?;
        Ok((out.len() > N).then_some(out))
    })
    .await?;
    let out = read_to_end(&env.settings, &output_topic, Duration::from_secs(30))?;
    let big_out = out.iter().filter(|m| header(m, headers::IDEMPOTENCY_KEY).unwrap_or_default().ends_with(&big_id));
    assert_eq!(big_out.count(), 1, "the replayed key published once");
    println!("LLM calls: {calls} before the replay, {} after", env.sim.completions());
    assert_eq!(env.sim.completions(), calls, "the replay publishes the stored result, paid once");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// `len` characters from a 64-letter alphabet, pseudo-random.
fn incompressible(len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x >> 58) as usize] as char
        })
        .collect()
}

/// A topic the stage writes to that takes smaller records than the producer sends: the
/// stage refuses to start and names the topic and the setting (before, ingest started and
/// retried for ever a forward the broker refused; the enricher dead-lettered every result
/// of a refused batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_whose_topic_takes_smaller_records_than_its_producer_refuses_to_start() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let requests = env.settings.topics.requests.clone();
    enrich_common::kafka::ensure_topics(&env.settings, &[&requests]).await?;
    let admin: AdminClient<DefaultClientContext> = enrich_common::kafka::base_config(&env.settings).create()?;
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&requests)).set("max.message.bytes", "500000");
    for r in admin.alter_configs(&[alter], &AdminOptions::new()).await? {
        r.map_err(|(_, e)| anyhow::anyhow!("cannot lower max.message.bytes: {e}"))?;
    }
    let started = tokio::time::timeout(
        DEADLINE,
        ingest_dedup::run(env.settings.clone(), tokio_util::sync::CancellationToken::new()),
    )
    .await?;
    let error = format!("{:#}", started.expect_err("ingest started on a topic smaller than its producer's records"));
    println!("ingest: {error}");
    assert!(
        error.contains(&requests) && error.contains("max.message.bytes") && error.contains("500000"),
        "the error names the topic and the setting: {error}"
    );
    env.teardown().await;
    Ok(())
}
