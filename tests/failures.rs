//! Failure semantics on the real stack: an LLM outage pauses enrichment instead of
//! dead-lettering healthy events, and everything completes once the endpoint is back;
//! poison records, crash loops, repairs, replays and strict-key ordering.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use dlq_replayer::cli::Client;
use dlq_replayer::replay::Filter;
use enrich_common::envelope::Envelope;
use enrich_common::{TraceContext, headers};
use enrich_e2e::loadgen::accounting::account;
use enrich_e2e::loadgen::kafka_io::{header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload::{self, Spec};
use enrich_e2e::{StageKind, TestEnv, count_in_states, wait_for};
use rdkafka::Message;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_llm_outage_opens_the_breaker_and_dead_letters_nothing() -> anyhow::Result<()> {
    const N: usize = 60;
    let enrichers_port = enrich_e2e::free_port()?;
    let endpoint = |path: &str| format!("http://127.0.0.1:{enrichers_port}{path}");
    let overrides = [
        ("ENRICH_LLM__MAX_ATTEMPTS", "3".to_string()),
        ("ENRICH_LLM__BREAKER_FAILURES", "5".to_string()),
        ("ENRICH_LLM__BREAKER_OPEN_MS", "300".to_string()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "4".to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", enrichers_port.to_string()),
    ];
    // Each call takes 100 ms, so the run is still going when llm-sim stops.
    let latency = llm_sim::Latency::Fixed(Duration::from_millis(100));
    let mut env = TestEnv::new(latency, &overrides).await?;
    let records = workload::build(&Spec { run: env.id.clone(), unique: N, duplicates: 0, malformed: 0 });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));

    // Mid-run, llm-sim stops for 20 s: connections are refused.
    wait_for("the first records to be enriched", DEADLINE, || async { Ok((env.sim.completions() >= 4).then_some(())) })
        .await?;
    env.sim.stop().await;
    let stopped_at = tokio::time::Instant::now();
    let before_outage = env.sim.completions();
    assert!(before_outage < N as u64, "the outage starts mid-run ({before_outage} calls done)");

    // The operator sees why: /readyz and the breaker metric.
    let reason = wait_for("the breaker to open", DEADLINE, || async {
        let Ok(r) = reqwest::get(endpoint("/readyz")).await else { return Ok(None) };
        Ok((r.status().as_u16() == 503).then_some(r.text().await?))
    })
    .await?;
    assert!(reason.contains("breaker open"), "{reason}");
    let metrics = reqwest::get(endpoint("/metrics")).await?.text().await?;
    assert!(metrics.lines().any(|l| l == "enrich_llm_breaker_open 1"), "breaker metric:\n{metrics}");

    // The outage lasts its 20 s; without a breaker, the records in flight would have
    // used up their 3 attempts and been dead-lettered long before.
    tokio::time::sleep_until(stopped_at + Duration::from_secs(20)).await;
    assert_eq!(count_in_states(&env, &["dead_lettered"]).await?, 0, "nothing dead-lettered during the outage");
    assert_eq!(env.sim.completions(), before_outage, "llm-sim answered nothing while stopped");
    let (max_attempts,): (i32,) =
        sqlx::query_as("SELECT COALESCE(max(attempts), 0) FROM enrich_state WHERE pipeline = $1")
            .bind(&env.settings.pipeline.name)
            .fetch_one(&env.pool)
            .await?;
    assert!(max_attempts < 3, "failed calls during an outage do not use up attempts ({max_attempts})");
    let (failed_calls,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM step_outcomes WHERE pipeline = $1 AND step = 'llm_call' AND status = 'failed'",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_one(&env.pool)
    .await?;
    // 20 s at one probe every 300 ms is about 67 probes; a consumer without a breaker
    // would have tried every record in flight over and over.
    assert!(failed_calls < 150, "calls paused while the breaker was open ({failed_calls} failed calls in 20 s)");

    env.sim.restart().await?;
    env.wait_accounted(&produced, DEADLINE).await?;
    let metrics = reqwest::get(endpoint("/metrics")).await?.text().await?;
    assert!(metrics.lines().any(|l| l == "enrich_llm_breaker_open 0"), "the breaker closed again");
    assert_eq!(reqwest::get(endpoint("/readyz")).await?.status().as_u16(), 200);
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(count_in_states(&env, &["published"]).await?, N as i64);
    assert_eq!(env.sim.completions(), N as u64, "one successful call per record");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert!(dlq.is_empty(), "the DLQ stayed empty ({} records)", dlq.len());
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_reach_the_dlq_after_exactly_the_attempt_limit() -> anyhow::Result<()> {
    const N: usize = 200;
    let poison: Vec<(usize, &str)> = [7, 50, 99, 120, 181].iter().map(|&i| (i, "always-500")).collect();
    let overrides = [("ENRICH_LLM__MAX_ATTEMPTS", "3".to_string())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::marked_tickets(&env.id, N, &poison);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |i| i % 2 == 0, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(acct.published, (N - poison.len()) as i64);
    assert_eq!(acct.dead_lettered_at_enricher, poison.len() as i64);
    assert_eq!(env.sim.failed(), 3 * poison.len() as u64, "each poison record was tried exactly 3 times");
    assert_eq!(env.sim.completions(), (N - poison.len()) as u64);

    // Two attempts in process (llm.quick_retries = 1), the third after a delayed retry
    // through the retry topic.
    let retries = read_to_end(&env.settings, &env.settings.topics.retry, Duration::from_secs(30))?;
    assert_eq!(retries.len(), poison.len(), "one delayed retry per poison record");
    for m in &retries {
        assert_eq!(header(m, headers::RETRY_COUNT).as_deref(), Some("1"));
        let due: i64 = header(m, headers::RETRY_DUE_MS).expect("a due time").parse()?;
        let written = m.timestamp().to_millis().expect("a timestamp");
        assert!(due >= written + 300, "due about llm.retry_delay_ms after it was written ({due} vs {written})");
        assert_eq!(Envelope::decode_from(m.payload().unwrap())?.attempt, 2);
    }
    let (scheduled,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM run_history WHERE pipeline = $1 AND stage = 'enricher' AND status = 'retry_scheduled'",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(scheduled, poison.len() as i64, "each delayed retry is in the run history");

    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert_eq!(dlq.len(), poison.len());
    for m in &dlq {
        let h = |name: &str| header(m, name).unwrap_or_else(|| panic!("DLQ header {name}"));
        assert_eq!(h(headers::DLQ_REASON), "max_attempts");
        assert_eq!(h(headers::DLQ_REASON_CLASS), "transient");
        assert_eq!(h(headers::DLQ_STAGE), "enricher");
        assert_eq!(h(headers::DLQ_ATTEMPTS), "3");
        assert!(h(headers::DLQ_ERROR).contains("500"));
        // The coordinates are those of the source record, not of enrich.requests.
        assert_eq!(h(headers::DLQ_ORIGINAL_TOPIC), env.source_topic());
        let (p, o): (i32, i64) =
            (h(headers::DLQ_ORIGINAL_PARTITION).parse()?, h(headers::DLQ_ORIGINAL_OFFSET).parse()?);
        let index = produced.iter().position(|x| x.partition == p && x.offset == o).expect("a produced record");
        assert!(poison.iter().any(|(i, _)| *i == index), "record {index} was not a poison record");
        let key = h(headers::IDEMPOTENCY_KEY);
        assert!(key.ends_with(&records[index].ticket.as_ref().unwrap().id));
        assert!(TraceContext::parse(&h(headers::TRACEPARENT), None).is_some());
        let envelope = Envelope::decode_from(m.payload().unwrap())?;
        assert_eq!(envelope.failure().unwrap().reason, "max_attempts");
        assert_eq!(
            envelope.payload,
            records[index].value.clone().unwrap(),
            "the DLQ record carries the original payload"
        );
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_output_gets_one_repair_call_and_then_the_dlq() -> anyhow::Result<()> {
    const N: usize = 20;
    let marked = [
        (2, "invalid-json-once"),
        (5, "invalid-json-once"),
        (9, "invalid-json-once"),
        (12, "schema-violation"),
        (17, "invalid-json"),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let records = workload::marked_tickets(&env.id, N, &marked);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(acct.published, 18, "the three repaired records are published: {acct:?}");
    assert_eq!(acct.dead_lettered_at_enricher, 2);
    // 15 clean calls, and two calls (answer + repair) for each of the five marked records.
    assert_eq!(env.sim.completions(), 15 + 2 * 5);
    let reasons: Vec<String> = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?
        .iter()
        .filter_map(|m| header(m, headers::DLQ_REASON))
        .collect();
    let mut reasons = reasons;
    reasons.sort();
    assert_eq!(reasons, vec!["invalid_json".to_string(), "schema_violation".to_string()]);
    let (repairs,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM step_outcomes WHERE pipeline = $1 AND step = 'llm_repair' AND status = 'ok'",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(repairs, 5, "every repair call is in the audit");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_and_server_errors_are_retried_until_every_record_is_published() -> anyhow::Result<()> {
    const N: usize = 300;
    let overrides = [
        // Each attempt that is not a 429 fails with p = 0.125: ten in a row for one of 300
        // records has odds of about 3 in 10 million (six had about 1 in 1,000).
        ("ENRICH_LLM__MAX_ATTEMPTS", "10".to_string()),
        ("ENRICH_LLM__BREAKER_FAILURES", "20".to_string()),
        ("ENRICH_LLM__BREAKER_OPEN_MS", "500".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    env.sim.set_faults(llm_sim::Faults {
        markers: true,
        rate_429: 0.2,
        rate_500: 0.1,
        rate_hang: 0.0,
        ..Default::default()
    });
    let records = workload::build(&Spec { run: env.id.clone(), unique: N, duplicates: 0, malformed: 0 });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(acct.published, N as i64, "{acct:?}");
    assert_eq!(acct.dead_lettered_at_enricher, 0);
    assert!(env.sim.failed() > 30, "faults were injected ({} failed calls)", env.sim.failed());
    assert_eq!(env.sim.completions(), N as u64, "one successful call per record");
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N, "each record published exactly once");
    assert!(read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?.is_empty());
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_shown_and_replayed_once_the_cause_is_fixed() -> anyhow::Result<()> {
    const N: usize = 30;
    let port = enrich_e2e::free_port()?;
    let token = "replay-token-0123456789".to_string();
    let overrides = [
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
        ("ENRICH_DLQ_REPLAYER__MAX_REPLAYS_PER_KEY", "1".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let poison = [(4, "always-500"), (11, "always-500"), (23, "always-500")];
    let records = workload::marked_tickets(&env.id, N, &poison);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |i| i % 2 == 0, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((N - 3) as i64, 3));

    let api = format!("http://127.0.0.1:{port}");
    let client = Client::new(api.clone(), Some(token.clone()));
    let by_reason = Filter { reason: Some("max_attempts".into()), ..Default::default() };
    let dead =
        wait_for("the dlq-replayer API", DEADLINE, || async { Ok(client.list("dead", &by_reason).await.ok()) }).await?;
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.stage == "enricher" && d.attempts == 2 && d.error.contains("500")));
    let shown = client.show(dead[0].id).await?;
    assert!(shown["payload"].as_str().unwrap().contains("[[sim:always-500]]"));
    let failed_calls = shown["steps"].as_array().unwrap().iter().filter(|s| s["status"] == "failed").count();
    assert_eq!(failed_calls, 2, "the history shows both failed calls");

    // The operator's CLI: the table, then a replay by reason. Reads and mutations need the
    // token.
    let cli_env = [("ENRICH_ADMIN_API", api.as_str())];
    let with_token = [("ENRICH_ADMIN_API", api.as_str()), ("ENRICH_ADMIN_TOKEN", token.as_str())];
    let list_args = ["list", "--reason", "max_attempts"];
    let (ok, _, err) = enrich_e2e::run_cli("dlq-replayer", &list_args, &cli_env).await?;
    assert!(!ok && err.contains("401"), "a read refused without the token: {err}");
    let (ok, table, _) = enrich_e2e::run_cli("dlq-replayer", &list_args, &with_token).await?;
    assert!(ok && table.contains("3 dead letter(s)"), "{table}");
    let by_reason_args = ["replay", "--reason", "max_attempts", "--note", "sim fixed"];
    let (ok, _, err) = enrich_e2e::run_cli("dlq-replayer", &by_reason_args, &cli_env).await?;
    assert!(!ok && err.contains("401"), "refused without the token: {err}");

    // Fix the cause, preview, replay.
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    let preview = client.replay(&by_reason, true, Some("sim fixed")).await?;
    assert_eq!((preview.matched, preview.replayed.len()), (3, 3));
    assert_eq!(client.list("dead", &by_reason).await?.len(), 3, "a dry run changes nothing");
    let (ok, out, progress) = enrich_e2e::run_cli("dlq-replayer", &by_reason_args, &with_token).await?;
    assert!(ok, "{out}{progress}");
    assert!(out.contains("3 matched: 3 to replay, 0 refused") && out.contains("replayed 3, refused 0"), "{out}");
    assert!(progress.contains("replayed 3/3"), "progress is shown: {progress}");
    wait_for("the replayed records to be published", DEADLINE, || async {
        Ok((count_in_states(&env, &["published"]).await? == N as i64).then_some(()))
    })
    .await?;
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("the publisher to catch up", DEADLINE, || async {
        Ok(enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?
            .then_some(()))
    })
    .await?;

    // The same ids again: refused, nothing produced.
    let ids: Vec<i64> = dead.iter().map(|d| d.id).collect();
    let again = client.replay(&Filter { ids: Some(ids), ..Default::default() }, false, None).await?;
    assert!(again.replayed.is_empty());
    assert_eq!(again.refused.len(), 3, "{again:?}");
    for s in stages {
        s.stop().await?;
    }
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N, "every record published once, the replayed ones included");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_that_crashes_the_enricher_is_dead_lettered_after_the_attempt_limit() -> anyhow::Result<()> {
    const N: usize = 20;
    let overrides = [
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
        ("ENRICH_ENRICHER__FAILPOINTS", "true".to_string()),
        // Each process is a new lease owner: a dead one's leases run out after 1.5 s.
        ("ENRICH_ENRICHER__LEASE_MS", "1500".to_string()),
        ("ENRICH_LLM__REQUEST_TIMEOUT_MS", "1000".to_string()),
        // A crashed consumer leaves the group after the session timeout.
        ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000".to_string()),
        ("ENRICH_KAFKA__CLIENT__HEARTBEAT.INTERVAL.MS", "500".to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", enrich_e2e::free_port()?.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let mut records = workload::marked_tickets(&env.id, N, &[]);
    let crasher = 7;
    let mut t = records[crasher].ticket.clone().unwrap();
    t.body = format!("{} [[enricher:abort]]", t.body);
    records[crasher].value = Some(t.to_json());
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Publisher].map(|k| env.spawn(k));

    // A supervisor, as Kubernetes would be: restart the enricher whenever it dies.
    let pipeline = env.settings.pipeline.name.clone();
    let mut enricher = env.spawn_process("enricher")?;
    let mut crashes = 0;
    let started = std::time::Instant::now();
    let acct = loop {
        if let Some(status) = enricher.try_wait()? {
            assert!(!status.success(), "the enricher only stops by crashing here");
            crashes += 1;
            assert!(crashes <= 5, "the crash loop did not end");
            enricher = env.spawn_process("enricher")?;
        }
        let a = account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
        if a.complete(N) {
            break a;
        }
        assert!(started.elapsed() < DEADLINE, "not finished: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(enricher.try_wait()?.is_none(), "the enricher keeps running once the record is dead-lettered");
    let _ = enricher.kill();
    let _ = enricher.wait();
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(crashes, 2, "one crash per counted attempt (llm.max_attempts = 2), then the DLQ");
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((N - 1) as i64, 1));
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], headers::DLQ_REASON).as_deref(), Some("max_attempts"));
    assert_eq!(header(&dlq[0], headers::DLQ_ATTEMPTS).as_deref(), Some("2"));
    let offset: i64 = header(&dlq[0], headers::DLQ_ORIGINAL_OFFSET).unwrap().parse()?;
    assert_eq!(offset, produced[crasher].offset);
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_about_to_dead_letter_most_of_a_topic_pauses_instead() -> anyhow::Result<()> {
    let port = enrich_e2e::free_port()?;
    let overrides = [
        ("ENRICH_INGEST__HTTP_PORT", port.to_string()),
        ("ENRICH_DLQ_LIMIT__WINDOW", "50".to_string()),
        ("ENRICH_DLQ_LIMIT__MIN_RECORDS", "10".to_string()),
        ("ENRICH_DLQ_LIMIT__MAX_SHARE", "0.5".to_string()),
        ("ENRICH_DLQ_LIMIT__MAX_CONSECUTIVE", "20".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    // A "bad deploy": 10 tickets, then 60 records the key strategy cannot read.
    let records = workload::build(&Spec { run: env.id.clone(), unique: 10, duplicates: 0, malformed: 60 });
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let ingest = env.spawn(StageKind::Ingest);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let reason = wait_for("ingest to pause on the DLQ limit", DEADLINE, || async {
        let Ok(r) = reqwest::get(&readyz).await else { return Ok(None) };
        let body = r.text().await?;
        Ok(body.contains("DLQ limit").then_some(body))
    })
    .await?;
    assert!(reason.contains("dead letters"), "{reason}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
    assert!(metrics.lines().any(|l| l == "enrich_dlq_limit_tripped 1"), "{metrics}");
    // Nothing was dead-lettered and nothing committed: the records wait for a fix.
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert!(dlq.len() <= 20, "the limit held the flood back ({} dead letters)", dlq.len());
    let group = env.settings.group_id(enrich_common::config::Stage::Ingest);
    assert!(!enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, env.source_topic())?);
    ingest.stop().await?;
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_key_ordering_parks_a_key_behind_its_dead_letter_and_releases_it_in_order() -> anyhow::Result<()> {
    const OTHERS: usize = 10;
    let port = enrich_e2e::free_port()?;
    let token = "strict-token-0123456789".to_string();
    let overrides = [
        ("ENRICH_ENRICHER__ORDERING", "strict-key".to_string()),
        ("ENRICH_LLM__MAX_ATTEMPTS", "3".to_string()),
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    // Three tickets of one customer (one Kafka key), the first one poison; and tickets
    // of other customers.
    let customer = format!("customer-{}", env.id);
    let mut records = workload::marked_tickets(&env.id, 3 + OTHERS, &[(0, "always-500")]);
    for r in records.iter_mut().take(3) {
        r.key = Some(customer.clone().into_bytes());
    }
    let ids: Vec<String> = records.iter().take(3).map(|r| r.ticket.as_ref().unwrap().id.clone()).collect();
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));

    // The first is dead-lettered (two quick attempts, a delayed retry, the third); the
    // other two wait behind it; other customers are not held up.
    let pipeline = env.settings.pipeline.name.clone();
    wait_for("the poison ticket in the DLQ and the others published", DEADLINE, || async {
        let a = account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
        Ok((a.published == OTHERS as i64 && a.dead_lettered_at_enricher == 1).then_some(a))
    })
    .await?;
    let parked: Vec<(String,)> =
        sqlx::query_as("SELECT idempotency_key FROM parked WHERE pipeline = $1 AND kafka_key = $2 ORDER BY seq")
            .bind(&pipeline)
            .bind(customer.as_bytes())
            .fetch_all(&env.pool)
            .await?;
    let parked: Vec<&str> = parked.iter().map(|(k,)| k.rsplit(':').next().unwrap_or_default()).collect();
    assert_eq!(parked, vec![ids[1].as_str(), ids[2].as_str()], "the later two are parked, in order");
    assert_eq!(count_in_states(&env, &["enriched", "published"]).await?, OTHERS as i64);

    // Fix the cause and replay the dead letter: all three are published, in source order.
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    let client = Client::new(format!("http://127.0.0.1:{port}"), Some(token));
    let by_reason = Filter { reason: Some("max_attempts".into()), ..Default::default() };
    let done = wait_for("the dlq-replayer API", DEADLINE, || async {
        Ok(client.replay(&by_reason, false, Some("sim fixed")).await.ok())
    })
    .await?;
    assert_eq!(done.replayed.len(), 1);
    wait_for("the customer's three tickets to be published", DEADLINE, || async {
        Ok((count_in_states(&env, &["published"]).await? == (3 + OTHERS) as i64).then_some(()))
    })
    .await?;
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("the publisher to catch up", DEADLINE, || async {
        Ok(enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?
            .then_some(()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), 3 + OTHERS, "each ticket published once");
    let in_order: Vec<String> = output
        .iter()
        .filter(|m| m.key() == Some(customer.as_bytes()))
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(in_order, ids, "the customer's tickets come out in source order");
    let (blocks,): (i64,) = sqlx::query_as("SELECT count(*) FROM key_blocks WHERE pipeline = $1")
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(blocks, 0, "the block is lifted once nothing waits behind it");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_grpc_admin_api_lists_shows_discards_and_replays_with_the_token() -> anyhow::Result<()> {
    use dlq_replayer::grpc::DeadLettersClient;
    use dlq_replayer::grpc::pb;
    const N: usize = 12;
    let grpc_port = enrich_e2e::free_port()?;
    let token = "grpc-token-0123456789".to_string();
    let overrides = [
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
        ("ENRICH_DLQ_REPLAYER__GRPC_PORT", grpc_port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = workload::marked_tickets(&env.id, N, &[(3, "always-500"), (8, "always-500")]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((N - 2) as i64, 2));

    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let mut client = wait_for("the gRPC admin API", DEADLINE, || async {
        Ok(DeadLettersClient::connect(endpoint.clone()).await.ok())
    })
    .await?;
    let by_reason = || Some(pb::Filter { reason: Some("max_attempts".into()), ..Default::default() });
    let list = |status: &str| pb::ListRequest { status: status.into(), filter: by_reason(), after_id: 0, limit: 10 };
    fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }
    let dead = client.list(with_token(list("dead"), &token)).await?.into_inner().items;
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.stage == "enricher" && d.attempts == 2 && d.reason_class == "transient"));
    let shown =
        client.show(with_token(pb::ShowRequest { id: dead[0].id, ..Default::default() }, &token)).await?.into_inner();
    assert!(String::from_utf8(shown.payload)?.contains("[[sim:always-500]]"));
    assert_eq!(shown.steps.iter().filter(|s| s.step == "llm_call" && s.status == "failed").count(), 2);
    assert!(shown.runs.iter().any(|r| r.stage == "enricher" && r.status == "dead_lettered"));

    // Mutations without the token are refused, and change nothing.
    let anonymous = client.replay(pb::ReplayRequest { filter: by_reason(), dry_run: false, note: String::new() }).await;
    assert_eq!(anonymous.unwrap_err().code(), tonic::Code::Unauthenticated);
    // Discard one, replay the other once the cause is fixed.
    let discarded = client
        .discard(with_token(pb::DiscardRequest { id: dead[0].id, note: "not needed".into() }, &token))
        .await?
        .into_inner();
    assert!(discarded.discarded);
    assert_eq!(client.list(with_token(list("discarded"), &token)).await?.into_inner().items.len(), 1);
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    let request = |dry_run| pb::ReplayRequest { filter: by_reason(), dry_run, note: "sim fixed".into() };
    let preview = client.replay(with_token(request(true), &token)).await?.into_inner();
    assert_eq!((preview.matched, preview.replayed.len()), (1, 1));
    let done = client.replay(with_token(request(false), &token)).await?.into_inner();
    assert_eq!(done.replayed, vec![dead[1].id]);
    wait_for("the replayed record to be published", DEADLINE, || async {
        Ok((count_in_states(&env, &["published"]).await? == (N - 1) as i64).then_some(()))
    })
    .await?;
    assert!(client.list(with_token(list("dead"), &token)).await?.into_inner().items.is_empty());
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// A replay whose request the broker refuses (here: the requests topic lowered below the
/// record's size): the replay fails, the dead letter stays listed, and the key goes back
/// to `dead_lettered` with its attempts, not left `requested` for a request that was
/// never written. Replayed once the broker takes it, the key is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_whose_request_cannot_be_written_leaves_the_key_dead_lettered_and_replayable() -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let env = TestEnv::new(llm_sim::Latency::default(), &[("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string())]).await?;
    let records = workload::marked_tickets(&env.id, 3, &[(1, "always-500")]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (2, 1), "{acct:?}");
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    let pipeline = env.settings.pipeline.name.clone();
    let state = || async {
        let row: (String, i32) = sqlx::query_as(
            "SELECT s.state, s.attempts FROM enrich_state s JOIN dead_letters d
               ON d.pipeline = s.pipeline AND d.idempotency_key = s.idempotency_key WHERE s.pipeline = $1",
        )
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
        anyhow::Ok(row)
    };
    assert_eq!(state().await?, ("dead_lettered".to_string(), 2));

    let requests = env.settings.topics.requests.clone();
    let admin: AdminClient<DefaultClientContext> = enrich_common::kafka::base_config(&env.settings).create()?;
    let limit = |bytes: &'static str| {
        let (admin, requests) = (&admin, requests.clone());
        async move {
            let alter = AlterConfig::new(ResourceSpecifier::Topic(&requests)).set("max.message.bytes", bytes);
            for r in admin.alter_configs(&[alter], &AdminOptions::new()).await? {
                r.map_err(|(_, e)| anyhow::anyhow!("cannot set max.message.bytes: {e}"))?;
            }
            anyhow::Ok(())
        }
    };
    limit("64").await?;
    let replayer = env.replayer()?;
    let filter = dlq_replayer::replay::Filter::default();
    let refused = replayer.replay(&filter, false, None).await;
    let why = refused.as_ref().err().map(ToString::to_string);
    println!("the replay with the requests topic at 64 bytes: {why:?}; the key: {:?}", state().await?);
    assert!(refused.is_err(), "the replay says it failed: {refused:?}");
    assert_eq!(state().await?, ("dead_lettered".to_string(), 2), "the key is dead-lettered again, with its attempts");
    let (listed,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(listed, 1, "the dead letter is still listed");

    limit("1048588").await?;
    let replayed = replayer.replay(&filter, false, None).await?;
    assert_eq!(replayed.replayed.len(), 1, "{replayed:?}");
    wait_for("the replayed key to be published", DEADLINE, || async {
        Ok((count_in_states(&env, &["published"]).await? == 3).then_some(()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    let counts = enrich_e2e::output_counts(&env)?;
    assert_eq!(counts.len(), 3, "every ticket published: {counts:?}");
    assert!(counts.values().all(|c| *c == 1), "each once: {counts:?}");
    env.teardown().await;
    Ok(())
}
