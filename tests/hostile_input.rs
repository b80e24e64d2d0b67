//! Bytes a rogue producer can send that the Rust Kafka client cannot even express: a
//! header name that is not UTF-8 (sent with kcat, which passes its bytes through). The
//! record ends in the DLQ with a readable reason, no stage stops, and the good records
//! around it are published once.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::headers;
use enrich_e2e::loadgen::kafka_io::{header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, wait_for};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

/// Produces one record with kcat: `key`, `value`, and one header given as raw bytes
/// `name=value`.
fn kcat_produce(env: &TestEnv, topic: &str, key: &str, value: &[u8], raw_header: &[u8]) -> anyhow::Result<()> {
    let mut child = std::process::Command::new("kcat")
        .args(["-P", "-b", &env.settings.kafka.bootstrap_servers, "-t", topic, "-k", key, "-H"])
        .arg(OsStr::from_bytes(raw_header))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("kcat (make deps installs it): {e}"))?;
    child.stdin.take().expect("stdin").write_all(value)?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "kcat exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_stops_no_stage() -> anyhow::Result<()> {
    const N: usize = 30;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let source = env.source_topic().to_string();
    let hostile = format!(r#"{{"id":"{}-hostile","subject":"hello","body":"a header name of bytes"}}"#, env.id);
    kcat_produce(&env, &source, "hostile", hostile.as_bytes(), b"\xff\xfe\x80name=value")?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, &source, &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));

    let dlq_topic = env.settings.topics.dlq.clone();
    let dead = wait_for("the hostile record in the DLQ", DEADLINE, || async {
        let dead = tokio::task::block_in_place(|| read_to_end(&env.settings, &dlq_topic, Duration::from_secs(30)));
        Ok(dead.ok().filter(|d| !d.is_empty()))
    })
    .await?;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(header(&dead[0], headers::DLQ_REASON).as_deref(), Some("invalid_header_name"));
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("ingest-dedup"));
    env.wait_accounted(&produced, DEADLINE).await?;
    let counts = enrich_e2e::output_counts(&env)?;
    assert_eq!(counts.len(), N, "every good ticket published");
    assert!(counts.values().all(|n| *n == 1), "each once");
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A ticket whose subject holds U+0000: llm-sim's summary repeats the subject, so the
/// answer holds it too, and PostgreSQL's jsonb cannot store it. The answer is invalid
/// output (repaired once, then dead-lettered at the enricher), and the tickets stored
/// beside it are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_holding_nul_is_dead_lettered_and_holds_nothing_up() -> anyhow::Result<()> {
    const N: usize = 30;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let mut records = workload::marked_tickets(&env.id, N, &[]);
    let mut nul = enrich_e2e::loadgen::tickets::ticket(&env.id, N);
    nul.subject = "Refund\u{0} now".into();
    records.push(workload::Record::of_ticket(nul));
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    env.wait_accounted(&produced, DEADLINE).await?;

    let dead = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("enricher"));
    let error = header(&dead[0], headers::DLQ_ERROR).unwrap_or_default();
    assert!(error.contains("NUL"), "the reason says why: {error}");
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(60))?;
    assert_eq!(output.len(), N, "every other ticket published once");
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Two tickets whose numeric ids differ only past the 17 digits an f64 keeps: each is its
/// own key (neither is taken for a duplicate of the other) and its output carries the id
/// digit for digit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_beyond_u64_keep_every_digit() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let run = u32::from_str_radix(&env.id, 16)?;
    let ids: Vec<String> = (0..2).map(|d| format!("98765432109876543210{run:010}{d}")).collect();
    let records: Vec<workload::Record> = ids
        .iter()
        .map(|id| {
            let value = format!(
                r#"{{"id": {id}, "customer": "c-1", "subject": "Refund request", "body": "Please refund order {id}.", "created_at": "2026-12-03T10:00:00Z"}}"#
            );
            workload::Record {
                kind: workload::Kind::Unique,
                ticket: None,
                key: Some(id.clone().into_bytes()),
                value: Some(value.into_bytes()),
            }
        })
        .collect();
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let output = wait_for("both tickets published", DEADLINE, || async {
        // The output topic may not be known to the broker's metadata yet.
        let Ok(output) = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30)) else {
            return Ok(None);
        };
        Ok((output.len() >= 2).then_some(output))
    })
    .await?;
    let duplicates: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM run_history WHERE pipeline = $1 AND stage = 'ingest-dedup' AND status = 'duplicate'",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(duplicates.0, 0, "an id beyond u64 was taken for a duplicate of another");
    assert_eq!(output.len(), 2, "one output per ticket");
    for id in &ids {
        let carried = output.iter().any(|m| {
            let text = String::from_utf8_lossy(rdkafka::Message::payload(m).unwrap_or_default()).to_string();
            text.contains(&format!(r#""id":{id}"#)) || text.contains(&format!(r#""id": {id}"#))
        });
        assert!(carried, "the output carries id {id} digit for digit");
    }
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Commits `group`'s offsets at the end of every partition of `topic`: a group that
/// starts there reads only what is produced afterwards.
fn skip_to_end(env: &TestEnv, group: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let mut config = enrich_common::kafka::base_config(&env.settings);
    config.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut ends = rdkafka::TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        ends.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(high))?;
    }
    consumer.commit(&ends, CommitMode::Sync)?;
    Ok(())
}

/// A rogue or stale record on `enrich.results` for an enriched key, carrying another
/// enrichment under the key's `idempotency-key` header: the publisher publishes the
/// result stored for the key, not the one the record carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_results_record_publishes_the_stored_result() -> anyhow::Result<()> {
    use enrich_common::envelope::{Envelope, Outcome};
    use rdkafka::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    const N: usize = 5;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher].map(|k| env.spawn(k));
    let results = env.settings.topics.results.clone();
    let genuine = wait_for("every key enriched and emitted", DEADLINE, || async {
        // The topic may not exist yet.
        let read = tokio::task::block_in_place(|| read_to_end(&env.settings, &results, Duration::from_secs(30)));
        let Ok(emitted) = read else { return Ok(None) };
        let enriched = enrich_e2e::count_in_states(&env, &["enriched"]).await?;
        Ok((emitted.len() >= N && enriched == N as i64).then_some(emitted))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    // The publisher starts past the genuine copies: only the forged ones reach it.
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    tokio::task::block_in_place(|| skip_to_end(&env, &group, &results))?;
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    let forged_json = r#"{"category":"forged","sentiment":"negative","priority":"urgent","language":"xx","summary":"forged","tags":["forged"]}"#;
    for m in &genuine {
        let mut envelope = Envelope::decode_from(m.payload().unwrap())?;
        let Some(Outcome::Result(result)) = envelope.outcome.as_mut() else { panic!("a result") };
        result.json = forged_json.into();
        let key = envelope.idempotency_key.clone();
        let h = headers::owned(&[(headers::IDEMPOTENCY_KEY, &key)]);
        producer
            .send(
                FutureRecord::to(&results).key(m.key().unwrap()).payload(&envelope.encode_to_bytes()).headers(h),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let publisher = env.spawn(StageKind::Publisher);
    wait_for("every key published", DEADLINE, || async {
        Ok((enrich_e2e::count_in_states(&env, &["published"]).await? == N as i64).then_some(()))
    })
    .await?;
    publisher.stop().await?;

    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N, "one output per key");
    for m in &output {
        let key = header(m, headers::IDEMPOTENCY_KEY).expect("an idempotency key");
        let (stored,): (serde_json::Value,) =
            sqlx::query_as("SELECT result FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2")
                .bind(&env.settings.pipeline.name)
                .bind(&key)
                .fetch_one(&env.pool)
                .await?;
        let out: serde_json::Value = serde_json::from_slice(m.payload().unwrap())?;
        assert_eq!(out["enrichment"], stored, "{key}: the output carries the stored enrichment, not the forged one");
    }
    env.teardown().await;
    Ok(())
}

/// An envelope of this pipeline on `enrich.results` with a 600 KB idempotency key and no
/// result: its dead letter would repeat the key as a header and not fit the producer's
/// limit. It is taken for a foreign record (its key hashed) and dead-lettered once; the
/// publisher goes on with the tickets behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_envelope_with_a_huge_key_on_the_results_topic_is_dead_lettered_and_holds_nothing_up() -> anyhow::Result<()>
{
    use enrich_common::envelope::Envelope;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    const N: usize = 10;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let results = env.settings.topics.results.clone();
    enrich_common::kafka::ensure_topics(&env.settings, &[&results]).await?;
    let rogue = Envelope {
        schema: enrich_common::envelope::SCHEMA.into(),
        pipeline: env.settings.pipeline.name.clone(),
        idempotency_key: "k".repeat(600 * 1024),
        ..Default::default()
    };
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    producer
        .send(FutureRecord::to(&results).key("rogue").payload(&rogue.encode_to_bytes()), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    env.wait_accounted(&produced, DEADLINE).await?;
    let dead = wait_for("the rogue envelope in the DLQ", DEADLINE, || async {
        let dead = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
        Ok((!dead.is_empty()).then_some(dead))
    })
    .await?;
    assert_eq!(dead.len(), 1, "one dead letter");
    assert_eq!(header(&dead[0], headers::DLQ_REASON).as_deref(), Some("invalid_envelope"));
    assert_eq!(header(&dead[0], headers::DLQ_STAGE).as_deref(), Some("publisher"));
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N, "every ticket published once");
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A provider's 400 whose message quotes the request, and a refusal that quotes the
/// ticket (both seen in the field): neither the DLQ record's error, nor the listed dead
/// letter, nor the audit carries the ticket's text; the error still says what happened
/// (the status and the provider's error type, or that the model refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_error_or_refusal_quoting_the_ticket_is_dead_lettered_without_its_text() -> anyhow::Result<()> {
    const N: usize = 20;
    const SECRET: &str = "card 4111-1111-1111-1111 of Jane Roe";
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let mut records = workload::marked_tickets(&env.id, N, &[]);
    for (i, marker) in ["[[sim:400-echo]]", "[[sim:refuse]]"].iter().enumerate() {
        let mut t = enrich_e2e::loadgen::tickets::ticket(&env.id, N + i);
        t.body = format!("Please charge my {SECRET} again {marker}");
        records.push(workload::Record::of_ticket(t));
    }
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    env.wait_accounted(&produced, DEADLINE).await?;

    let dead = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            (header(d, headers::DLQ_REASON).unwrap_or_default(), header(d, headers::DLQ_ERROR).unwrap_or_default())
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "two dead letters: {reasons:?}");
    assert_eq!(reasons[0].0, "bad_request", "{reasons:?}");
    assert!(reasons[0].1.contains("HTTP 400") && reasons[0].1.contains("invalid_request_error"), "{reasons:?}");
    assert_eq!(reasons[1].0, "refusal", "{reasons:?}");
    assert!(reasons[1].1.contains("refused"), "{reasons:?}");
    for (_, error) in &reasons {
        assert!(!error.contains("4111"), "the DLQ record's error quotes the ticket: {error}");
    }
    let listed: Vec<(String,)> = sqlx::query_as("SELECT error FROM dead_letters WHERE pipeline = $1")
        .bind(&env.settings.pipeline.name)
        .fetch_all(&env.pool)
        .await?;
    assert_eq!(listed.len(), 2, "both listed");
    let audited: Vec<(String,)> = sqlx::query_as(
        "SELECT error FROM step_outcomes WHERE pipeline = $1 AND error IS NOT NULL
         UNION ALL SELECT detail FROM run_history WHERE pipeline = $1 AND detail IS NOT NULL",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_all(&env.pool)
    .await?;
    for (error,) in listed.iter().chain(audited.iter()) {
        assert!(!error.contains("4111"), "a listed dead letter or an audited step quotes the ticket: {error}");
    }
    let counts = enrich_e2e::output_counts(&env)?;
    assert_eq!(counts.len(), N, "every other ticket published");
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}
