//! The enricher's windows, each fault landed at its instant and the outcome read from
//! outside (the output topic, the DLQ topic).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use dlq_replayer::cli::Client;
use dlq_replayer::replay::Filter;
use enrich_common::config::Stage;
use enrich_common::headers;
use enrich_e2e::loadgen::kafka_io::{group_caught_up, header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, output_counts, wait_for};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

/// With one attempt allowed and a 3 s call, a second delivery of the request reaches
/// another replica while the only attempt is calling. It must wait for that attempt,
/// not dead-letter the key under it: the key ends published or dead-lettered, never
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_delivery_during_the_final_attempt_ends_the_key_once() -> anyhow::Result<()> {
    let latency = llm_sim::Latency::Fixed(Duration::from_secs(3));
    let env = TestEnv::new(latency, &[("ENRICH_LLM__MAX_ATTEMPTS", "1".to_string())]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[]);
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));

    let pipeline = env.settings.pipeline.name.clone();
    let key: String = wait_for("the only attempt to be calling", DEADLINE, || async {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT idempotency_key FROM enrich_state WHERE pipeline = $1 AND state = 'enriching' AND lease_owner IS NOT NULL",
        )
        .bind(&pipeline)
        .fetch_optional(&env.pool)
        .await?;
        Ok(row.map(|(k,)| k))
    })
    .await?;
    // The second delivery: another replica handed the request while the first still
    // calls (as after a rebalance): an enricher of another consumer group, which reads
    // the requests topic from its start.
    let second = env.spawn_with(StageKind::Enricher, |s| {
        s.enricher.group_id = Some(format!("{}.enricher.second", s.pipeline.name));
        s.enricher.instance_id = Some("second-replica".into());
    });
    let second_group = format!("{pipeline}.enricher.second");
    let requests_topic = env.settings.topics.requests.clone();
    let (enricher, publisher) = (env.settings.group_id(Stage::Enricher), env.settings.group_id(Stage::Publisher));
    let results_topic = env.settings.topics.results.clone();
    wait_for("both deliveries handled and their results consumed", DEADLINE, || async {
        let (state,): (String,) =
            sqlx::query_as("SELECT state FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2")
                .bind(&pipeline)
                .bind(&key)
                .fetch_one(&env.pool)
                .await?;
        let terminal = state == "published" || state == "dead_lettered";
        let done = terminal
            && group_caught_up(&env.settings, &enricher, &requests_topic).unwrap_or(false)
            && group_caught_up(&env.settings, &second_group, &requests_topic).unwrap_or(false)
            && group_caught_up(&env.settings, &publisher, &results_topic).unwrap_or(false);
        Ok(done.then_some(state))
    })
    .await?;

    let published = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(60))?
        .iter()
        .filter(|m| header(m, headers::IDEMPOTENCY_KEY).as_deref() == Some(key.as_str()))
        .count();
    let dead = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?.len();
    assert_eq!(
        (published, dead),
        (1, 0),
        "the key ends once: published {published} time(s), dead-lettered {dead} time(s)"
    );
    second.stop().await?;
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Bytes that are no envelope, straight onto the requests topic (a rogue producer on an
/// internal topic): a dead letter like any other, in the DLQ topic and in `dead_letters`,
/// listed by the admin API and replayable, and the tickets around it are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_record_on_the_requests_topic_is_listed_and_replayable() -> anyhow::Result<()> {
    const N: usize = 10;
    let port = enrich_e2e::free_port()?;
    let token = "enricher-dlq-token-0123456789".to_string();
    let overrides =
        [("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()), ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    producer
        .send(
            FutureRecord::to(&env.settings.topics.requests).key("rogue").payload(&b"\x00\xffnot an envelope"[..]),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "the tickets around it are published: {acct:?}");

    let client = Client::new(format!("http://127.0.0.1:{port}"), Some(token));
    let from_enricher = Filter { stage: Some("enricher".into()), ..Default::default() };
    let listed = wait_for("the foreign record in the admin API", DEADLINE, || async {
        Ok(client.list("dead", &from_enricher).await.ok().filter(|d| !d.is_empty()))
    })
    .await?;
    assert_eq!(listed.len(), 1, "one dead letter: {listed:?}");
    assert_eq!(listed[0].reason, "invalid_envelope");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    assert_eq!(dlq.len(), 1, "one DLQ record");
    assert_eq!(header(&dlq[0], headers::DLQ_STAGE).as_deref(), Some("enricher"));
    let ids = Filter { ids: Some(vec![listed[0].id]), ..Default::default() };
    let replayed = client.replay(&ids, false, Some("test")).await?;
    assert_eq!(replayed.replayed, vec![listed[0].id], "refused: {:?}", replayed.refused);
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A record whose answers break the schema (also on repair) is dead-lettered; right
/// after its DLQ record is written, the database refuses the next write to
/// `dead_letters` once. The key must be dead-lettered once (one DLQ record, one listed
/// dead letter) and its two calls (the answer and the repair) not paid again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettering_interrupted_after_its_dlq_record_is_written_once_and_not_paid_again() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(20)), &[]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[(0, "schema-violation")]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    // Right after the DLQ record, the next write to dead_letters fails once.
    let hook = enrich_e2e::fail_once_hook(env.pool.clone(), "dead_letter_fault", "dead_letters", "INSERT OR UPDATE");
    enricher::failpoints::set(
        &env.settings.pipeline.name,
        enricher::failpoints::Instant::AfterDeadLetterProduced,
        hook,
    );
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.dead_lettered_at_enricher, 1, "the record is dead-lettered: {acct:?}");
    let requests = env.settings.topics.requests.clone();
    let group = env.settings.group_id(Stage::Enricher);
    wait_for("the enricher to commit the record", DEADLINE, || async {
        Ok(group_caught_up(&env.settings, &group, &requests)?.then_some(()))
    })
    .await?;
    let fired = enrich_e2e::fail_once_count(&env.pool, "dead_letter_fault").await?;
    assert!(fired >= 2, "the write after the DLQ record failed once and was tried again (sequence at {fired})");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(60))?;
    assert_eq!(dlq.len(), 1, "one DLQ record for the key");
    let (listed,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
        .bind(&env.settings.pipeline.name)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(listed, 1, "one listed dead letter");
    assert_eq!(env.sim.requests().len(), 2, "the answer and its repair, not paid again");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A record on `enrich.retry` whose `retry-due-ms` header lies centuries ahead (a rogue
/// producer, a corrupted header): it is held no longer than `llm.retry_max_delay_ms`,
/// then enriched and published, and its retry partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_due_far_in_the_future_is_held_no_longer_than_the_longest_delay() -> anyhow::Result<()> {
    let overrides = [("ENRICH_LLM__RETRY_MAX_DELAY_MS", "2000".to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(20)), &overrides).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    let ticket = workload::marked_tickets(&env.id, 1, &[]).remove(0);
    let envelope = enrich_common::Envelope {
        schema: enrich_common::envelope::SCHEMA.into(),
        pipeline: pipeline.clone(),
        idempotency_key: format!("{pipeline}:rogue-due"),
        payload: ticket.value.clone().expect("a ticket has a value"),
        source: Some(enrich_common::envelope::SourceCoordinates {
            topic: env.source_topic().to_string(),
            partition: 0,
            offset: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let retry = env.settings.topics.retry.clone();
    enrich_common::kafka::ensure_topics(&env.settings, &[&retry]).await?;
    let producer: FutureProducer = enrich_common::kafka::producer(&env.settings, "test")?;
    let h = headers::owned(&[
        (headers::IDEMPOTENCY_KEY, envelope.idempotency_key.as_str()),
        (headers::RETRY_DUE_MS, "9000000000000000"),
        (headers::RETRY_COUNT, "1"),
    ]);
    let value = envelope.encode_to_bytes();
    producer
        .send(FutureRecord::to(&retry).key("rogue-due").payload(&value).headers(h), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    let key = envelope.idempotency_key.clone();
    wait_for("the rogue-due record to be published", DEADLINE, || async {
        // The output topic may not exist yet.
        let Ok(counts) = enrich_e2e::output_counts(&env) else { return Ok(None) };
        Ok(counts.get(&key).is_some_and(|n| *n == 1).then_some(()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// The database refuses, once, to mark the key `retry_scheduled` after its delayed
/// retry's record is written (a failover, a dropped session). The write is retried, not
/// the record's handling: handled again at once, the record found its own lease left set,
/// took it for an attempt that died with its process, and called again without the
/// delay, leaving no `retry_scheduled` run in the key's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn marking_a_delayed_retry_failing_once_is_retried_and_the_retry_waits_its_delay() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[(0, "500-once")]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let hook = enrich_e2e::fail_once_hook(env.pool.clone(), "retry_mark_fault", "enrich_state", "UPDATE");
    enricher::failpoints::set(&pipeline, enricher::failpoints::Instant::AfterRetryProduced, hook);
    let stages = [
        env.spawn(StageKind::Ingest),
        env.spawn_with(StageKind::Enricher, |s| {
            s.llm.max_attempts = 3;
            s.llm.quick_retries = 0;
            s.llm.retry_delay_ms = 1000;
        }),
        env.spawn(StageKind::Publisher),
    ];
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, 1, "the ticket is published: {acct:?}");
    let (requests, results) = (env.settings.topics.requests.clone(), env.settings.topics.results.clone());
    let retry = env.settings.topics.retry.clone();
    let (enricher, publisher) = (env.settings.group_id(Stage::Enricher), env.settings.group_id(Stage::Publisher));
    wait_for("the enricher and the publisher to catch up", DEADLINE, || async {
        let done = group_caught_up(&env.settings, &enricher, &requests)?
            && group_caught_up(&env.settings, &enricher, &retry)?
            && group_caught_up(&env.settings, &publisher, &results)?;
        Ok(done.then_some(()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    assert!(enrich_e2e::fail_once_count(&env.pool, "retry_mark_fault").await? >= 2, "the fault was landed");
    let runs: Vec<(String, i32)> = sqlx::query_as(
        "SELECT status, attempt FROM run_history WHERE pipeline = $1 AND stage = 'enricher' AND status NOT IN ('reused', 'already_published')
         ORDER BY recorded_at, id",
    )
    .bind(&pipeline)
    .fetch_all(&env.pool)
    .await?;
    println!("the key's enricher runs: {runs:?}");
    assert_eq!(
        runs,
        [("retry_scheduled".to_string(), 1), ("enriched".to_string(), 2)],
        "one delayed retry, then the attempt it was delayed for"
    );
    let counts = output_counts(&env)?;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1], "published once: {counts:?}");
    env.teardown().await;
    Ok(())
}

/// Three keys whose previous attempts died with their process (as a replica killed in
/// the middle of its calls leaves them: `enriching`, a lease expired, one attempt spent).
/// Each runs alone, one at a time (so a record that crashes its process is the only one
/// charged), and none may wait for ever for the isolation permit (in the code the
/// guarantees issue found, a key judged suspect a second time waited for the permit its
/// own task held, with no way out but a kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_whose_attempts_died_with_their_process_run_alone_and_all_finish() -> anyhow::Result<()> {
    const N: usize = 3;
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(200)), &[]).await?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let ingest = env.spawn(StageKind::Ingest);
    wait_for("every ticket forwarded", DEADLINE, || async {
        Ok((enrich_e2e::count_in_states(&env, &["requested"]).await? == N as i64).then_some(()))
    })
    .await?;
    // A replica died in the middle of these keys' calls.
    sqlx::query(
        "UPDATE enrich_state SET state = 'enriching', attempts = 1, lease_owner = 'a-replica-that-died',
                lease_until = now() - interval '1 second'
         WHERE pipeline = $1",
    )
    .bind(&pipeline)
    .execute(&env.pool)
    .await?;
    let stages = [env.spawn(StageKind::Enricher), env.spawn(StageKind::Publisher)];
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "every ticket published: {acct:?}");
    let attempts: Vec<(i32,)> = sqlx::query_as("SELECT attempts FROM enrich_state WHERE pipeline = $1")
        .bind(&pipeline)
        .fetch_all(&env.pool)
        .await?;
    assert_eq!(attempts, vec![(2,); N], "each charged the attempt that died and one more");
    ingest.stop().await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(env.sim.completions(), N as u64, "one paid call per key");
    env.teardown().await;
    Ok(())
}
