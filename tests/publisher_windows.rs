//! The publisher's windows, each fault landed at its exact instant through the
//! publisher's test hooks (cargo feature `failpoints`) and the outcome read from outside:
//! a `read_committed` reader of the output topic, the DLQ topic, the admin API.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use dlq_replayer::cli::Client;
use dlq_replayer::replay::Filter;
use enrich_common::envelope::{EnrichmentResult, Envelope, Outcome};
use enrich_common::headers;
use enrich_e2e::loadgen::kafka_io::{Produced, group_caught_up, header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, wait_for};
use publisher::failpoints::{self, Instant};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

async fn wait_published(env: &TestEnv, produced: &[Produced]) -> anyhow::Result<()> {
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    let results = env.settings.topics.results.clone();
    env.wait_accounted(produced, DEADLINE).await?;
    wait_for("the publisher to consume every result", DEADLINE, || async {
        Ok(group_caught_up(&env.settings, &group, &results)?.then_some(()))
    })
    .await
}

/// The publisher's PostgreSQL sessions are terminated right after its first Kafka
/// commit, before it has written anything about that batch: the batch is in the output
/// topic, and nothing may be published a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_session_lost_right_after_the_kafka_commit_publishes_nothing_twice() -> anyhow::Result<()> {
    const N: usize = 120;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let fired = Arc::new(AtomicBool::new(false));
    let terminated = Arc::new(AtomicI64::new(0));
    {
        let (pool, fired, terminated) = (env.pool.clone(), fired.clone(), terminated.clone());
        failpoints::set(
            &env.settings.pipeline.name,
            Instant::AfterKafkaCommit,
            Arc::new(move || {
                let (pool, fired, terminated) = (pool.clone(), fired.clone(), terminated.clone());
                Box::pin(async move {
                    if fired.swap(true, Ordering::SeqCst) {
                        return;
                    }
                    let (n,): (i64,) = sqlx::query_as(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = 'publisher'",
                    )
                    .fetch_one(&pool)
                    .await
                    .expect("terminate the publisher's sessions");
                    terminated.store(n, Ordering::SeqCst);
                })
            }),
        );
    }
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_published(&env, &produced).await?;

    assert!(fired.load(Ordering::SeqCst), "the hook ran after a Kafka commit");
    assert!(terminated.load(Ordering::SeqCst) >= 1, "at least one publisher session was terminated");
    let counts = enrich_e2e::output_counts(&env)?;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} of {} keys published more than once, e.g. {:?}",
        twice.len(),
        counts.len(),
        twice.first()
    );
    if counts.len() != N {
        // Which keys are missing, and where PostgreSQL says their outputs were bound.
        let rows: Vec<(String, String, Option<i32>, Option<i64>)> = sqlx::query_as(
            "SELECT idempotency_key, state, publish_partition, publish_offset FROM enrich_state
              WHERE pipeline = $1 AND NOT (idempotency_key = ANY($2)) ORDER BY 3, 4 LIMIT 10",
        )
        .bind(&env.settings.pipeline.name)
        .bind(counts.keys().cloned().collect::<Vec<_>>())
        .fetch_all(&env.pool)
        .await?;
        panic!("{} of {N} tickets on the output topic; missing, with their bindings: {rows:?}", counts.len());
    }
    assert_eq!(enrich_e2e::count_in_states(&env, &["published"]).await?, N as i64, "every key marked published");
    // Settling clears a binding: the partial index of bindings waiting to be settled
    // (read when partitions are assigned) holds none once everything is published.
    let (bindings,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND publish_offset IS NOT NULL")
            .bind(&env.settings.pipeline.name)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(bindings, 0, "no binding left once every key is settled");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Records the publisher cannot publish — bytes that are no envelope (twice), an envelope with
/// no result, a key whose source is no JSON object — are dead letters like any other: in
/// the DLQ topic, in `dead_letters` (listed by the admin API, replayable), and the key
/// that could not be merged ends `dead_lettered`, not `published`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_the_publisher_dead_letters_are_listed_and_never_marked_published() -> anyhow::Result<()> {
    const N: usize = 20;
    let port = enrich_e2e::free_port()?;
    let token = "publisher-dlq-token-0123456789".to_string();
    let overrides =
        [("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()), ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));

    // Two foreign records straight onto the results topic, and the result of a key
    // (enriched, as far as PostgreSQL knows) whose source payload is no JSON object.
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    let envelope = |id: &str, payload: &[u8], result: Option<&str>| Envelope {
        schema: enrich_common::envelope::SCHEMA.into(),
        pipeline: pipeline.clone(),
        idempotency_key: format!("{pipeline}:{id}"),
        payload: payload.to_vec(),
        outcome: result.map(|json| Outcome::Result(EnrichmentResult { json: json.into(), ..Default::default() })),
        ..Default::default()
    };
    let no_result = envelope("no-result", br#"{"id":"no-result"}"#, None);
    let not_an_object = envelope("not-an-object", b"[1, 2]", Some(r#"{"category":"billing"}"#));
    sqlx::query(
        "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset)
         VALUES ($1, $2, 'enriched', 'elsewhere', 0, 0)",
    )
    .bind(&pipeline)
    .bind(&not_an_object.idempotency_key)
    .execute(&env.pool)
    .await?;
    let results = env.settings.topics.results.clone();
    // The same bytes twice: two dead letters of one key (the DLQ topic has both, the
    // admin API lists the key once).
    for (key, value) in [
        ("garbage", b"\x00\xffnot an envelope".to_vec()),
        ("garbage", b"\x00\xffnot an envelope".to_vec()),
        ("no-result", no_result.encode_to_bytes()),
        ("not-an-object", not_an_object.encode_to_bytes()),
    ] {
        producer
            .send(FutureRecord::to(&results).key(key).payload(&value), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
    }
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    wait_published(&env, &produced).await?;

    let client = Client::new(format!("http://127.0.0.1:{port}"), Some(token));
    let from_publisher = Filter { stage: Some("publisher".into()), ..Default::default() };
    let listed = wait_for("the publisher's dead letters in the admin API", DEADLINE, || async {
        let dead = client.list("dead", &from_publisher).await.ok();
        Ok(dead.filter(|d| d.len() == 3))
    })
    .await?;
    let mut reasons: Vec<&str> = listed.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["invalid_envelope", "no_result", "not_an_object"]);
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    assert_eq!(dlq.len(), 4, "all four are in the DLQ topic");
    assert!(dlq.iter().all(|m| header(m, headers::DLQ_STAGE).as_deref() == Some("publisher")));
    let state = |key: String| {
        let pool = env.pool.clone();
        let pipeline = pipeline.clone();
        async move {
            sqlx::query_as::<_, (String,)>(
                "SELECT state FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
            )
            .bind(&pipeline)
            .bind(&key)
            .fetch_optional(&pool)
            .await
            .map(|r| r.map(|(s,)| s))
        }
    };
    assert_eq!(state(not_an_object.idempotency_key.clone()).await?.as_deref(), Some("dead_lettered"));
    assert_eq!(state(no_result.idempotency_key.clone()).await?, None, "a foreign key gets no state");

    // The dead-lettered key is replayable: it goes back to the enricher with a fresh start.
    let unmergeable = listed.iter().find(|d| d.reason == "not_an_object").expect("listed");
    let ids = Filter { ids: Some(vec![unmergeable.id]), ..Default::default() };
    let replayed = client.replay(&ids, false, Some("test")).await?;
    assert_eq!(replayed.replayed, vec![unmergeable.id], "refused: {:?}", replayed.refused);
    assert_ne!(state(not_an_object.idempotency_key.clone()).await?.as_deref(), Some("published"));
    assert_eq!(enrich_e2e::output_counts(&env)?.len(), N, "the good tickets are published");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A flood of records on `enrich.results` the publisher cannot publish (a rogue
/// producer, a broken enricher deploy): the DLQ limit holds the publisher as it holds
/// every stage — it stops dead-lettering, commits nothing past them, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_about_to_dead_letter_a_flood_holds_instead() -> anyhow::Result<()> {
    let port = enrich_e2e::free_port()?;
    let overrides =
        [("ENRICH_PUBLISHER__HTTP_PORT", port.to_string()), ("ENRICH_DLQ_LIMIT__MAX_CONSECUTIVE", "5".to_string())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    let results = env.settings.topics.results.clone();
    enrich_common::kafka::ensure_topics(&env.settings, &[&results]).await?;
    for i in 0..40 {
        let value = format!("\x00\u{ff}rogue record {i}");
        producer
            .send(
                FutureRecord::to(&results).key(&format!("rogue-{i}")).payload(value.as_bytes()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let publisher = env.spawn(StageKind::Publisher);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let reason = wait_for("the publisher to hold on the DLQ limit", DEADLINE, || async {
        let Ok(r) = reqwest::get(&readyz).await else { return Ok(None) };
        let body = r.text().await?;
        Ok(body.contains("DLQ limit").then_some(body))
    })
    .await?;
    assert!(reason.contains("dead letters in a row"), "{reason}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
    assert!(metrics.lines().any(|l| l == "enrich_dlq_limit_tripped 1"), "{metrics}");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert!(dlq.len() <= 5, "the limit held the flood back ({} dead letters)", dlq.len());
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    assert!(!group_caught_up(&env.settings, &group, &results)?, "the held records are not committed");
    publisher.stop().await?;
    env.teardown().await;
    Ok(())
}

/// Two publishers on one host with the default transactional id (bare processes often
/// have no `HOSTNAME`): each has its own (the port of its health endpoint is part of
/// it), so neither fences the other, both stay up, and every key is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_publishers_on_one_host_do_not_fence_each_other() -> anyhow::Result<()> {
    const N: usize = 60;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    assert!(env.settings.publisher.transactional_id.is_none(), "the default id is under test");
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_published(&env, &produced).await?;
    let counts = enrich_e2e::output_counts(&env)?;
    assert_eq!(counts.len(), N, "every key published");
    assert!(counts.values().all(|c| *c == 1), "each once: {counts:?}");
    for s in stages {
        assert!(!s.has_exited(), "the {:?} stage is still running (not fenced)", s.kind);
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Another publisher takes every partition in PostgreSQL while this one still has them
/// assigned (what a zombie that wakes and takes again does, or a take that outlived a
/// rebalance): this publisher's binds are refused for those partitions, and it must not
/// skip their records (and commit past them) as if their keys were bound elsewhere; it
/// takes the partitions again and publishes every key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_whose_partitions_were_taken_from_under_it_skips_nothing() -> anyhow::Result<()> {
    const N: usize = 20;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let first = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &first, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_published(&env, &produced).await?;
    let partitions: Vec<i32> = (0..env.settings.kafka.partitions).collect();
    enrich_common::key_state::publish::take_partitions(&env.pool, &pipeline, "another-publisher", &partitions).await?;
    let second: Vec<_> = workload::marked_tickets(&env.id, 2 * N, &[]).into_iter().skip(N).collect();
    let produced = produce_all(&env.settings, env.source_topic(), &second, |_| false, |_| {}).await?;
    wait_published(&env, &produced).await?;
    let counts = enrich_e2e::output_counts(&env)?;
    println!("published after the partitions were taken from under the publisher: {} keys", counts.len());
    assert_eq!(counts.len(), 2 * N, "every key published");
    assert!(counts.values().all(|c| *c == 1), "each once: {counts:?}");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// The partitions of `topic` the stage whose metrics are on `port` reports lag for (its
/// assignment, refreshed every 5 s); `None` while it does not answer.
async fn assigned(port: u16, topic: &str) -> Option<Vec<i32>> {
    let m = enrich_e2e::scrape_metrics(port).await.ok()?;
    let series = format!("enrich_consumer_lag{{topic=\"{topic}\",partition=\"");
    let mut partitions: Vec<i32> =
        m.keys().filter_map(|k| k.strip_prefix(&series)?.split('"').next()?.parse().ok()).collect();
    partitions.sort_unstable();
    Some(partitions)
}

/// Some partitions are revoked from a publisher while it gathers a batch (a second
/// publisher joins), the second publisher dead-letters their records and commits, then
/// leaves, and the partitions come back to the first before its batch is complete. The
/// first publisher must read them again from where the other committed: each foreign
/// record dead-lettered once (before, it rewound to its own batch's first records, below
/// the other's commit, and wrote their DLQ records a second time).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_revoked_and_given_back_while_a_batch_gathers_is_read_from_where_its_other_owner_committed()
-> anyhow::Result<()> {
    let overrides = [
        ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000".to_string()),
        ("ENRICH_KAFKA__CLIENT__HEARTBEAT.INTERVAL.MS", "500".to_string()),
        ("ENRICH_DLQ_LIMIT__MAX_SHARE", "1.0".to_string()),
        ("ENRICH_DLQ_LIMIT__MAX_CONSECUTIVE", "100000".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let partitions = env.settings.kafka.partitions;
    let results = env.settings.topics.results.clone();
    // The first publisher's batch ends when it holds two records per partition and one
    // more: the record the test sends once the partitions are back.
    let per_partition = 2;
    let batch = (per_partition * partitions + 1) as usize;
    let (port_a, port_b) = (enrich_e2e::free_port()?, enrich_e2e::free_port()?);
    let a = env.spawn_with(StageKind::Publisher, |s| {
        s.publisher.http_port = port_a;
        s.publisher.batch_size = batch;
        // Long enough for the second publisher to join, dead-letter and leave.
        s.publisher.batch_linger_ms = 45_000;
    });
    let all = partitions as usize;
    wait_for("the first publisher to hold every partition", DEADLINE, || async {
        Ok((assigned(port_a, &results).await.map(|p| p.len()) == Some(all)).then_some(()))
    })
    .await?;
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    let send = |partition: i32, n: i32| {
        let (producer, results) = (producer.clone(), results.clone());
        async move {
            let value = format!("\u{0}foreign record {n} of partition {partition}");
            producer
                .send(
                    FutureRecord::to(&results).partition(partition).key(&value).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            anyhow::Ok(())
        }
    };
    for p in 0..partitions {
        for n in 0..per_partition {
            send(p, n).await?;
        }
    }

    let b = env.spawn_with(StageKind::Publisher, |s| s.publisher.http_port = port_b);
    let (kept, taken) = wait_for("the second publisher to take some partitions", DEADLINE, || async {
        let (pa, pb) = (assigned(port_a, &results).await, assigned(port_b, &results).await);
        Ok(match (pa, pb) {
            (Some(pa), Some(pb)) if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == all => {
                Some((pa, pb.len()))
            }
            _ => None,
        })
    })
    .await?;
    let dlq = env.settings.topics.dlq.clone();
    wait_for("the second publisher to dead-letter its partitions' records", DEADLINE, || async {
        let n = read_to_end(&env.settings, &dlq, Duration::from_secs(30))?.len();
        Ok((n >= taken * per_partition as usize).then_some(()))
    })
    .await?;
    b.stop().await?;
    wait_for("the partitions to come back to the first publisher", DEADLINE, || async {
        Ok((assigned(port_a, &results).await.map(|p| p.len()) == Some(all)).then_some(()))
    })
    .await?;
    // Nothing of the first publisher's batch is committed yet: it still gathers.
    let before = read_to_end(&env.settings, &dlq, Duration::from_secs(30))?.len();
    assert_eq!(before, taken * per_partition as usize, "only the second publisher's dead letters so far");
    // The record that completes the batch, on a partition the first publisher kept.
    send(kept[0], per_partition).await?;

    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    let caught_up = || async { Ok(group_caught_up(&env.settings, &group, &results)?.then_some(())) };
    wait_for("the first publisher to commit its batch", DEADLINE, caught_up).await?;
    // One more batch's worth, so whatever the first publisher reads next (the fillers
    // alone, or records it read again) is published rather than left lingering.
    for n in 0..batch {
        send(kept[0], per_partition + 1 + n as i32).await?;
    }
    wait_for("the first publisher to consume every record", DEADLINE, caught_up).await?;
    a.stop().await?;
    let letters = read_to_end(&env.settings, &dlq, Duration::from_secs(30))?;
    let mut seen: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
    for m in &letters {
        let at = (
            header(m, headers::DLQ_ORIGINAL_PARTITION).unwrap_or_default(),
            header(m, headers::DLQ_ORIGINAL_OFFSET).unwrap_or_default(),
        );
        *seen.entry(at).or_default() += 1;
    }
    println!(
        "{} DLQ records for {} foreign records ({taken} partitions moved and came back)",
        letters.len(),
        2 * batch
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records dead-lettered more than once: {twice:?}");
    assert_eq!(seen.len(), 2 * batch, "every foreign record dead-lettered");
    env.teardown().await;
    Ok(())
}
