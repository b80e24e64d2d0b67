//! The enricher's call path at its instants: a lease outlived while a record waits for
//! its call, a settlement that fails after a paid call, a pause while records wait for
//! their turn. Each outcome is read from outside: llm-sim's counters (what was paid),
//! the output topic, PostgreSQL.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::config::{BudgetWindow, Stage};
use enrich_e2e::loadgen::kafka_io::{group_caught_up, produce_all};
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, output_counts, scrape_metrics, wait_for};
use enricher::failpoints::{self, Instant};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

/// One call slot, 1.5 s calls and a 2.5 s lease: the second record of each pair holds
/// its lease while it waits 1.5 s for the slot, then calls for 1.5 s, so its lease
/// would run out in the middle of its call. A second delivery of every request reaches
/// another replica meanwhile (as after a rebalance: an enricher of another consumer
/// group, which reads the requests topic from its start). Every key must be paid for
/// once: the waiting replica keeps its leases alive, and each call checks its lease
/// right before it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_outlived_while_waiting_for_a_call_slot_is_paid_once_after_a_second_delivery() -> anyhow::Result<()> {
    const N: usize = 6;
    let overrides = [
        ("ENRICH_ENRICHER__LEASE_MS", "2500".to_string()),
        ("ENRICH_LLM__REQUEST_TIMEOUT_MS", "2000".to_string()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "1".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(1500)), &overrides).await?;
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_for("the first replica to call", DEADLINE, || async { Ok((!env.sim.requests().is_empty()).then_some(())) })
        .await?;
    let pipeline = env.settings.pipeline.name.clone();
    let second = env.spawn_with(StageKind::Enricher, |s| {
        s.enricher.group_id = Some(format!("{}.enricher.second", s.pipeline.name));
        s.enricher.instance_id = Some("second-replica".into());
    });

    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "every ticket published: {acct:?}");
    let second_group = format!("{pipeline}.enricher.second");
    let requests = env.settings.topics.requests.clone();
    let results = env.settings.topics.results.clone();
    let (first_group, publisher) = (env.settings.group_id(Stage::Enricher), env.settings.group_id(Stage::Publisher));
    wait_for("both replicas and the publisher to catch up", DEADLINE, || async {
        let done = group_caught_up(&env.settings, &first_group, &requests)?
            && group_caught_up(&env.settings, &second_group, &requests)?
            && group_caught_up(&env.settings, &publisher, &results)?;
        Ok(done.then_some(()))
    })
    .await?;

    let counts = output_counts(&env)?;
    assert_eq!(counts.len(), N, "every key on the output topic: {counts:?}");
    assert!(counts.values().all(|c| *c == 1), "no key published twice: {counts:?}");
    assert_eq!(env.sim.completions(), N as u64, "one paid call per key ({N} keys)");
    second.stop().await?;
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// The first ticket's first call answers 429 asking for 15 s, six times the 2.5 s
/// lease; the others arrive during that hold and wait for their turn under their leases.
/// Meanwhile a second replica joins the group and takes some of the partitions (a real
/// rebalance): it reads their records while the first replica still holds them. Each key
/// must be paid for once, in one attempt: the waiting replica keeps its leases alive, so
/// the new owner waits for the answer and re-emits it instead of taking the key over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_outlived_by_a_429_hold_then_a_rebalance_is_paid_once() -> anyhow::Result<()> {
    const N: usize = 16;
    let overrides = [
        ("ENRICH_ENRICHER__LEASE_MS", "2500".to_string()),
        ("ENRICH_LLM__REQUEST_TIMEOUT_MS", "2000".to_string()),
        ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000".to_string()),
        ("ENRICH_KAFKA__CLIENT__HEARTBEAT.INTERVAL.MS", "500".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &overrides).await?;
    let records = workload::marked_tickets(&env.id, N, &[(0, "429-once:15000")]);
    let mut produced = produce_all(&env.settings, env.source_topic(), &records[..1], |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Publisher].map(|k| env.spawn(k));
    let first = env.spawn_with(StageKind::Enricher, |s| s.enricher.instance_id = Some("replica-a".into()));
    wait_for("the endpoint to answer the 429", DEADLINE, || async { Ok((env.sim.failed() > 0).then_some(())) }).await?;
    produced.extend(produce_all(&env.settings, env.source_topic(), &records[1..], |_| false, |_| {}).await?);
    let pipeline = env.settings.pipeline.name.clone();
    let leased_by_first = || async {
        let keys: Vec<(String,)> = sqlx::query_as(
            "SELECT idempotency_key FROM enrich_state
             WHERE pipeline = $1 AND lease_owner = 'replica-a' AND lease_until > now() AND state = 'enriching'",
        )
        .bind(&pipeline)
        .fetch_all(&env.pool)
        .await?;
        anyhow::Ok(keys.into_iter().map(|(k,)| k).collect::<Vec<_>>())
    };
    let waiting = wait_for("the other tickets to be leased by the first replica", DEADLINE, || async {
        let keys = leased_by_first().await?;
        Ok((keys.len() == N - 1).then_some(keys))
    })
    .await?;
    let port = enrich_e2e::free_port()?;
    let second = env.spawn_with(StageKind::Enricher, |s| {
        s.enricher.instance_id = Some("replica-b".into());
        s.enricher.http_port = port;
    });
    wait_for("the second replica to be assigned partitions", DEADLINE, || async {
        let Ok(m) = scrape_metrics(port).await else { return Ok(None) };
        Ok(m.keys().any(|k| k.starts_with("enrich_consumer_lag{")).then_some(()))
    })
    .await?;
    // (The first ticket gave its lease back while it waits out its own 429: the second
    // replica may have taken it and called already.)
    let still = leased_by_first().await?;
    assert_eq!(still.len(), waiting.len(), "the rebalance finished while the tickets waited out the 429's hold");

    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "every ticket published: {acct:?}");
    let requests = env.settings.topics.requests.clone();
    let results = env.settings.topics.results.clone();
    let (group, publisher) = (env.settings.group_id(Stage::Enricher), env.settings.group_id(Stage::Publisher));
    wait_for("the replicas and the publisher to catch up", DEADLINE, || async {
        let done =
            group_caught_up(&env.settings, &group, &requests)? && group_caught_up(&env.settings, &publisher, &results)?;
        Ok(done.then_some(()))
    })
    .await?;
    first.stop().await?;
    second.stop().await?;
    for s in stages {
        s.stop().await?;
    }

    // The second replica read some of the held records and found them answered by the
    // first (it waited for the live lease; by then the key may be published already),
    // rather than taking them over.
    let (reread,): (i64,) = sqlx::query_as(
        "SELECT count(DISTINCT idempotency_key) FROM run_history
         WHERE pipeline = $1 AND stage = 'enricher' AND worker = 'replica-b'
           AND status IN ('reused', 'already_published')
           AND idempotency_key = ANY($2)",
    )
    .bind(&pipeline)
    .bind(&waiting)
    .fetch_one(&env.pool)
    .await?;
    assert!(reread > 0, "the rebalance gave the second replica records the first still held");
    let attempts: Vec<(String, i32)> =
        sqlx::query_as("SELECT idempotency_key, attempts FROM enrich_state WHERE pipeline = $1 AND attempts <> 1")
            .bind(&pipeline)
            .fetch_all(&env.pool)
            .await?;
    assert!(attempts.is_empty(), "each key enriched in one attempt, none taken over: {attempts:?}");
    let counts = output_counts(&env)?;
    assert_eq!(counts.len(), N, "every key on the output topic: {counts:?}");
    assert!(counts.values().all(|c| *c == 1), "no key published twice: {counts:?}");
    assert_eq!(env.sim.completions(), N as u64, "one paid call per key ({N} keys)");
    env.teardown().await;
    Ok(())
}

/// The budget's settlement of a paid call fails once (the database refuses the
/// statement, as a failover or a dropped session would). The answer must be stored on
/// retry, the call not paid again, and the window charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_failing_after_a_paid_call_is_retried_and_not_paid_again() -> anyhow::Result<()> {
    let overrides =
        [("ENRICH_LLM__INPUT_USD_PER_MTOK", "1.0".to_string()), ("ENRICH_LLM__OUTPUT_USD_PER_MTOK", "2.0".to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &overrides).await?;
    let records = workload::marked_tickets(&env.id, 1, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;

    // Right after the paid call, the next update of the budget windows (the settlement)
    // fails once.
    let hook = enrich_e2e::fail_once_hook(env.pool.clone(), "settle_fault", "budget_windows", "UPDATE");
    failpoints::set(&env.settings.pipeline.name, Instant::AfterPaidCall, hook);
    let stages = [
        env.spawn(StageKind::Ingest),
        env.spawn_with(StageKind::Enricher, |s| s.llm.budgets = vec![BudgetWindow { usd: 100.0, window_secs: 3600 }]),
        env.spawn(StageKind::Publisher),
    ];
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, 1, "the ticket is published: {acct:?}");

    let fault_fired = enrich_e2e::fail_once_count(&env.pool, "settle_fault").await?;
    assert!(fault_fired >= 2, "the settlement failed once and was tried again (sequence at {fault_fired})");
    assert_eq!(env.sim.completions(), 1, "the call was paid once");
    let (calls, spent): (i64, f64) = sqlx::query_as(
        "SELECT calls, spent_usd::float8 FROM budget_windows WHERE pipeline = $1 AND window_secs = 3600",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(calls, 1, "the window is charged for one call");
    assert!(spent > 0.0, "the call's cost is spent in the window");
    let counts = output_counts(&env)?;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1], "published once: {counts:?}");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// One call slot, and the first call held in flight by llm-sim until the test lets it
/// answer: while it runs, the next record holds its lease and waits for the slot. The
/// operator pauses enrichment: once the pause has returned, no call may start, not even
/// the one that was already waiting for its turn. (Held rather than slow: with a fixed
/// 2 s latency the "one running, one waiting" instant could pass between two polls, or
/// never come when the records reached the enricher more than one call apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_holds_the_calls_already_waiting_for_their_turn() -> anyhow::Result<()> {
    const N: usize = 4;
    let admin_port = enrich_e2e::free_port()?;
    let enricher_port = enrich_e2e::free_port()?;
    let token = "kill-switch-token-0123".to_string();
    let overrides = [
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", admin_port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "1".to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", enricher_port.to_string()),
        // The held call must not time out while the test waits for the second record
        // (llm-sim's own server ends a request after 60 s).
        ("ENRICH_LLM__REQUEST_TIMEOUT_MS", "50000".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(200)), &overrides).await?;
    env.sim.hold(true);
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    wait_for("one call running and a record waiting for the slot", DEADLINE, || async {
        let (enriching,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND state = 'enriching'")
                .bind(&pipeline)
                .fetch_one(&env.pool)
                .await?;
        Ok((env.sim.requests().len() == 1 && enriching >= 2).then_some(()))
    })
    .await?;

    let client = dlq_replayer::cli::Client::new(format!("http://127.0.0.1:{admin_port}"), Some(token));
    client.set_paused(true, Some("provider incident")).await?;
    let calls_at_pause = env.sim.requests().len();
    // The call in flight ends; the record waiting for the slot gets it and reaches its call.
    env.sim.hold(false);
    let held = wait_for("the waiting record to reach its call", DEADLINE, || async {
        let metrics = scrape_metrics(enricher_port).await?;
        let held = metrics.get("enrich_llm_flow_waits_total{cause=\"paused\"}").copied().unwrap_or(0.0);
        Ok((held >= 1.0 || env.sim.requests().len() > calls_at_pause).then_some(held))
    })
    .await?;
    assert_eq!(
        env.sim.requests().len(),
        calls_at_pause,
        "no call starts after the pause has returned (held at the call: {held})"
    );

    client.set_paused(false, None).await?;
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "every ticket published after the resume: {acct:?}");
    assert_eq!(env.sim.completions(), N as u64, "one call per ticket");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// During an LLM outage (the breaker open after one failure), the first attempt's
/// lease and attempt are given back while the record waits; the database refuses that
/// write once. The give-back is retried: the record keeps its attempt and is published
/// when the endpoint answers again, with `llm.max_attempts = 1` not dead-lettered.
/// Before, the refused write failed the record's handling, which found its own lease
/// left on the key, took it for an attempt that died with its process, and, its one
/// attempt spent, dead-lettered a healthy record during an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_give_back_the_database_refuses_during_an_outage_spends_no_attempt() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    env.sim.set_outage(Some(503));
    let hook = enrich_e2e::fail_once_hook(env.pool.clone(), "give_back_fault", "enrich_state", "UPDATE");
    failpoints::set(&env.settings.pipeline.name, Instant::BeforeGiveBack, hook);
    let stages = [
        env.spawn(StageKind::Ingest),
        env.spawn_with(StageKind::Enricher, |s| {
            s.llm.max_attempts = 1;
            s.llm.quick_retries = 0;
            s.llm.breaker_failures = 1;
            s.llm.breaker_open_ms = 500;
        }),
        env.spawn(StageKind::Publisher),
    ];
    wait_for("the give-back refused once and tried again", DEADLINE, || async {
        let n = enrich_e2e::fail_once_count(&env.pool, "give_back_fault").await.unwrap_or(0);
        Ok((n >= 2).then_some(()))
    })
    .await?;
    env.sim.set_outage(None);
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    println!("after a refused give-back during the outage: {acct:?}");
    assert_eq!(acct.published, 1, "the ticket is published, not dead-lettered: {acct:?}");
    let counts = output_counts(&env)?;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1], "published once: {counts:?}");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Storing the result of a paid call fails once (the database refuses the key's row
/// update, as a failover or a dropped session would): the answer is stored on retry and
/// the call is not paid again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storing_a_paid_answer_failing_once_is_retried_and_not_paid_again() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &[]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    // Right after the paid call, the next update of the key's row (storing the result)
    // fails once.
    let hook = enrich_e2e::fail_once_hook(env.pool.clone(), "store_fault", "enrich_state", "UPDATE");
    failpoints::set(&env.settings.pipeline.name, Instant::AfterPaidCall, hook);
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, 1, "the ticket is published: {acct:?}");
    let fault_fired = enrich_e2e::fail_once_count(&env.pool, "store_fault").await?;
    assert!(fault_fired >= 2, "the store failed once and was tried again (sequence at {fault_fired})");
    assert_eq!(env.sim.completions(), 1, "the call was paid once");
    let counts = output_counts(&env)?;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1], "published once: {counts:?}");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}
