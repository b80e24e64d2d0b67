//! Flow control of the LLM calls against llm-sim's rate limits, and fallback models:
//! a rate-limited endpoint slows the enricher down instead of burning retries, the
//! adaptive concurrency limit falls after 429s and recovers, an unavailable model is
//! replaced by the next fallback (at its own price).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::headers;
use enrich_e2e::loadgen::kafka_io::{header, produce_all, read_to_end};
use enrich_e2e::loadgen::workload::marked_tickets;
use enrich_e2e::{StageKind, TestEnv, free_port, scrape_metrics, wait_for};
use std::collections::HashMap;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

fn metric(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// `n` tickets through an endpoint allowing 20 calls a second, answering in 20 ms: 32
/// slots could call 1,600 times a second. The enricher is not told the limit: it takes it
/// from llm-sim's x-ratelimit-* headers (`declare`) or infers it from the first 429s.
async fn rate_limited(n: usize, declare: bool, most_refused_per_100: u64) -> anyhow::Result<()> {
    const RPM: u64 = 1200; // 20 a second
    let port = free_port()?;
    let overrides =
        [("ENRICH_ENRICHER__MAX_IN_FLIGHT", "32".to_string()), ("ENRICH_ENRICHER__HTTP_PORT", port.to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(20)), &overrides).await?;
    env.sim.set_limits(llm_sim::RateLimits { rpm: RPM, burst_secs: 1.0, tpm: 0, declare });
    let records = marked_tickets(&env.id, n, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let started = tokio::time::Instant::now();
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    let took = started.elapsed();
    let m = scrape_metrics(port).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (n as i64, 0), "all complete: {acct:?}");
    assert_eq!(env.sim.completions(), n as u64, "one answered call per ticket");
    let refused = env.sim.rate_limited();
    let calls = env.sim.requests().len();
    println!(
        "rate limit {RPM}/min (declared: {declare}): {n} tickets in {:.1} s, {calls} requests, {refused} answered 429 ({:.1}% of requests), limit now {}",
        took.as_secs_f64(),
        refused as f64 * 100.0 / calls as f64,
        metric(&m, "enrich_llm_concurrency_limit"),
    );
    // The enricher saw each 429 llm-sim sent.
    assert_eq!(metric(&m, "enrich_llm_calls_total{outcome=\"rate_limited\"}"), refused as f64);
    // Paced by the limit, 429s stay a small share of the requests.
    assert!(refused * 100 <= most_refused_per_100 * n as u64, "{refused} 429s for {n} tickets");
    assert!(metric(&m, "enrich_llm_flow_waits_total{cause=\"requests_per_minute\"}") > 0.0, "calls were paced");
    // At most the limit's rate (20 a second, after a first second's burst of 20).
    assert!(took >= Duration::from_secs((n as u64 - 20) / 20), "{took:?}");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_endpoint_that_declares_its_limit_sees_almost_no_429s() -> anyhow::Result<()> {
    rate_limited(300, true, 3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_endpoint_that_declares_nothing_slows_the_enricher_instead_of_burning_retries()
-> anyhow::Result<()> {
    // The first rounds, before answers give a rate to go by, meet 429s (the slow start
    // keeps them few); after that the inferred rate keeps them rare.
    rate_limited(600, false, 10).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_concurrency_limit_falls_after_429s_and_recovers() -> anyhow::Result<()> {
    const N: usize = 1200;
    const MAX: f64 = 16.0;
    let port = free_port()?;
    let overrides =
        [("ENRICH_ENRICHER__MAX_IN_FLIGHT", "16".to_string()), ("ENRICH_ENRICHER__HTTP_PORT", port.to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(100)), &overrides).await?;
    let records = marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));

    // Healthy: from its slow start the limit reaches the ceiling, and the calls in flight
    // with it.
    let most = std::sync::atomic::AtomicU64::new(0);
    let in_flight_reaches = |target: u64| {
        let most = &most;
        move || async move {
            // The stage may not be listening yet.
            let Ok(m) = scrape_metrics(port).await else { return Ok(None) };
            let now = metric(&m, "enrich_in_flight") as u64;
            let seen = most.fetch_max(now, std::sync::atomic::Ordering::SeqCst).max(now);
            let limit = metric(&m, "enrich_llm_concurrency_limit");
            Ok((limit >= MAX && seen >= target).then_some(limit))
        }
    };
    wait_for("the concurrency limit to reach the ceiling", DEADLINE, in_flight_reaches(8)).await?;
    let before = most.swap(0, std::sync::atomic::Ordering::SeqCst);

    // Then two calls a second, and no x-ratelimit-* headers to say so: 429s (with
    // Retry-After) are all the enricher hears. The limit falls.
    env.sim.set_limits(llm_sim::RateLimits { rpm: 120, tpm: 0, burst_secs: 1.0, declare: false });
    let fallen = wait_for("the concurrency limit to fall", DEADLINE, || async {
        let m = scrape_metrics(port).await?;
        let limit = metric(&m, "enrich_llm_concurrency_limit");
        let refused = metric(&m, "enrich_llm_calls_total{outcome=\"rate_limited\"}");
        Ok((refused > 0.0 && limit < MAX).then_some((limit, refused)))
    })
    .await?;
    // The calls let in before the limit fell end within a round (a 429 answers at once);
    // from then on, while the endpoint stays limited, calls in flight stay low (two calls
    // a second of 100 ms: well under one on average).
    wait_for("the calls let in before the fall to end", DEADLINE, || async {
        let m = scrape_metrics(port).await?;
        Ok((metric(&m, "enrich_in_flight") <= 4.0).then_some(()))
    })
    .await?;
    let mut most_in_flight = 0f64;
    for _ in 0..20 {
        let m = scrape_metrics(port).await?;
        most_in_flight = most_in_flight.max(metric(&m, "enrich_in_flight"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most_in_flight <= 4.0, "in flight while limited: {most_in_flight}");
    let answered = env.sim.completions();
    assert!(answered + 400 < N as u64, "work is left for the recovery: {answered} answered");

    // The limit is lifted: the inferred rate goes after ten seconds without a 429, the
    // concurrency limit grows back to the ceiling and the calls in flight with it.
    env.sim.set_limits(llm_sim::RateLimits::default());
    most.store(0, std::sync::atomic::Ordering::SeqCst);
    let recovered = wait_for("the concurrency limit to recover", DEADLINE, in_flight_reaches(8)).await?;
    println!(
        "healthy: limit {MAX}, {before} calls seen in flight; limited: the limit fell to {} after {} 429s, at most {most_in_flight} in flight, {answered} calls answered by then; lifted: back to {recovered}, {} in flight",
        fallen.0,
        fallen.1,
        most.load(std::sync::atomic::Ordering::SeqCst)
    );
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (N as i64, 0), "all complete: {acct:?}");
    env.teardown().await;
    Ok(())
}

/// One record the endpoint always refuses with a 429 (`Retry-After: 1`) among records it
/// answers: its 429s are charged to it (the endpoint answers the others meanwhile), so
/// after `llm.max_rate_limited` of them per delivery its attempts count and it reaches
/// the DLQ after `llm.max_attempts`, after a bounded number of calls; the others are
/// published once and the concurrency limit recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_endpoint_always_refuses_spends_its_429s_and_reaches_the_dlq() -> anyhow::Result<()> {
    const FIRST: usize = 100;
    const CHUNK: usize = 20;
    const MOST: usize = 6000;
    const BURST: usize = 300;
    const MAX: f64 = 16.0;
    const MAX_ATTEMPTS: u64 = 3;
    const MAX_RATE_LIMITED: u64 = 3;
    const BAD: usize = 3;
    let port = free_port()?;
    let overrides = [
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "16".to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", port.to_string()),
        ("ENRICH_LLM__MAX_ATTEMPTS", MAX_ATTEMPTS.to_string()),
        ("ENRICH_LLM__MAX_RATE_LIMITED", MAX_RATE_LIMITED.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &overrides).await?;
    let records = std::sync::Arc::new(marked_tickets(&env.id, MOST + BURST, &[(BAD, "always-429")]));
    let mut produced = produce_all(&env.settings, env.source_topic(), &records[..FIRST], |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    // Good tickets keep coming while the refused record runs (its 429s are charged only
    // while the endpoint answers others): a chunk every half second, until it is
    // dead-lettered.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = tokio::spawn({
        let (settings, topic, records, stop) =
            (env.settings.clone(), env.source_topic().to_string(), records.clone(), stop.clone());
        async move {
            let (mut produced, mut next) = (Vec::new(), FIRST);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && next + CHUNK <= MOST {
                produced.extend(produce_all(&settings, &topic, &records[next..next + CHUNK], |_| false, |_| {}).await?);
                next += CHUNK;
                tokio::time::sleep(Duration::from_millis(500)).await; // the pace, not a wait for an event
            }
            anyhow::Ok((produced, next))
        }
    });

    // The refused record ends in the DLQ while the others flow.
    let pipeline = env.settings.pipeline.name.clone();
    let dead = wait_for("the always-429 record to be dead-lettered", Duration::from_secs(120), || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
        Ok((n > 0).then_some(()))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (streamed, next) = feeder.await??;
    dead?;
    produced.extend(streamed);
    let refused_calls = env.sim.failed();
    // Then a backlog: the concurrency limit grows back to the ceiling.
    produced
        .extend(produce_all(&env.settings, env.source_topic(), &records[next..next + BURST], |_| false, |_| {}).await?);
    let recovered = wait_for("the concurrency limit to recover", DEADLINE, || async {
        let m = scrape_metrics(port).await?;
        let limit = metric(&m, "enrich_llm_concurrency_limit");
        Ok((limit >= MAX).then_some(limit))
    })
    .await?;
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    let n = produced.len();
    println!(
        "always-429 record: {refused_calls} calls refused before it was dead-lettered, among {n} tickets; limit back to {recovered}; {acct:?}"
    );
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((n - 1) as i64, 1), "{acct:?}");
    assert_eq!(env.sim.completions(), (n - 1) as u64, "one answered call per good ticket");
    assert_eq!(env.sim.failed(), refused_calls, "no call for the record after its dead letter");
    // Per delivery: a first 429 (nothing to compare with yet), then the charged ones up to
    // one past the budget; a 429 that came while no other call was answered is not
    // charged, hence the slack.
    let least = MAX_ATTEMPTS * (MAX_RATE_LIMITED + 2);
    assert!(
        (least..=least * 3).contains(&refused_calls),
        "{refused_calls} calls for the always-429 record (at least {least})"
    );
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    let keys: std::collections::HashSet<_> =
        output.iter().filter_map(|m| header(m, headers::IDEMPOTENCY_KEY)).collect();
    assert_eq!((output.len(), keys.len()), (n - 1, n - 1), "every good ticket published once");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert_eq!(dlq.len(), 1);
    let h = |name: &str| header(&dlq[0], name).unwrap_or_else(|| panic!("DLQ header {name}"));
    assert_eq!(h(headers::DLQ_REASON), "max_attempts");
    assert_eq!(h(headers::DLQ_ATTEMPTS), MAX_ATTEMPTS.to_string());
    assert!(h(headers::DLQ_ERROR).contains("429"), "{}", h(headers::DLQ_ERROR));
    assert!(h(headers::IDEMPOTENCY_KEY).ends_with(&records[BAD].ticket.as_ref().unwrap().id));
    // Its attempts went through the retry topic: one delayed retry per attempt but the last.
    let retries = read_to_end(&env.settings, &env.settings.topics.retry, Duration::from_secs(30))?;
    assert_eq!(retries.len() as u64, MAX_ATTEMPTS - 1);
    env.teardown().await;
    Ok(())
}

/// A record whose first answer is invalid and whose repair call the endpoint always
/// refuses with 429 while it answers others: the repair does not wait for ever; past
/// `llm.max_rate_limited` charged 429s the record is dead-lettered with its validation
/// error (its first call was paid: no new attempt pays again), and the others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repair_the_endpoint_always_refuses_is_dead_lettered_with_its_validation_error() -> anyhow::Result<()> {
    const FIRST: usize = 50;
    const CHUNK: usize = 20;
    const MOST: usize = 4000;
    const BAD: usize = 3;
    let overrides =
        [("ENRICH_ENRICHER__MAX_IN_FLIGHT", "16".to_string()), ("ENRICH_LLM__MAX_RATE_LIMITED", "2".into())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &overrides).await?;
    let records = std::sync::Arc::new(marked_tickets(&env.id, MOST, &[(BAD, "429-on-repair")]));
    let mut produced = produce_all(&env.settings, env.source_topic(), &records[..FIRST], |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    // Good tickets keep coming while the repair is refused (its 429s are charged only
    // while the endpoint answers others).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = tokio::spawn({
        let (settings, topic, records, stop) =
            (env.settings.clone(), env.source_topic().to_string(), records.clone(), stop.clone());
        async move {
            let (mut produced, mut next) = (Vec::new(), FIRST);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && next + CHUNK <= MOST {
                produced.extend(produce_all(&settings, &topic, &records[next..next + CHUNK], |_| false, |_| {}).await?);
                next += CHUNK;
                tokio::time::sleep(Duration::from_millis(500)).await; // the pace, not a wait for an event
            }
            anyhow::Ok(produced)
        }
    });
    let pipeline = env.settings.pipeline.name.clone();
    let dead = wait_for("the record whose repair is refused to be dead-lettered", Duration::from_secs(120), || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
        Ok((n > 0).then_some(()))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    produced.extend(feeder.await??);
    dead?;
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    let n = produced.len();
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((n - 1) as i64, 1), "{acct:?}");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert_eq!(dlq.len(), 1);
    let h = |name: &str| header(&dlq[0], name).unwrap_or_else(|| panic!("DLQ header {name}"));
    assert_eq!(h(headers::DLQ_REASON), "invalid_json");
    assert!(h(headers::DLQ_ERROR).contains("repair call was refused (429)"), "{}", h(headers::DLQ_ERROR));
    assert_eq!(h(headers::DLQ_ATTEMPTS), "1", "the paid first call was not paid again");
    assert!(h(headers::IDEMPOTENCY_KEY).ends_with(&records[BAD].ticket.as_ref().unwrap().id));
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unavailable_model_falls_back_to_the_next_at_its_own_price() -> anyhow::Result<()> {
    const N: usize = 20;
    let port = free_port()?;
    let prices = r#"{"sim-primary" = {input_usd_per_mtok = 100.0, output_usd_per_mtok = 100.0},
        "sim-fallback" = {input_usd_per_mtok = 1.0, output_usd_per_mtok = 2.0}}"#;
    let overrides = [
        ("ENRICH_LLM__MODEL", "sim-primary".to_string()),
        ("ENRICH_LLM__FALLBACK_MODELS", r#"["sim-fallback"]"#.to_string()),
        ("ENRICH_LLM__PRICES", prices.to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", port.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    env.sim.set_faults(llm_sim::Faults { unavailable_models: vec!["sim-primary".into()], ..Default::default() });
    let records = marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    let m = scrape_metrics(port).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (N as i64, 0), "{acct:?}");
    // Each ticket: one 503 from the primary, one answer from the fallback.
    let requests = env.sim.requests();
    let by_model = |name: &str| requests.iter().filter(|r| r["body"]["model"] == name).count();
    assert_eq!((by_model("sim-primary"), by_model("sim-fallback")), (N, N));
    assert_eq!(metric(&m, "enrich_llm_fallbacks_total{model=\"sim-fallback\"}"), N as f64);
    assert_eq!(metric(&m, "enrich_llm_calls_total{outcome=\"unavailable\"}"), N as f64);
    assert_eq!(metric(&m, "enrich_llm_breaker_open"), 0.0, "the endpoint answers: no outage");
    // The results name the model that answered; the cost is at its price.
    let results = read_to_end(&env.settings, &env.settings.topics.results, Duration::from_secs(30))?;
    assert_eq!(results.len(), N);
    for r in &results {
        let e = enrich_common::Envelope::decode_from(rdkafka::Message::payload(r).unwrap())?;
        assert_eq!(e.result().map(|r| r.model.as_str()), Some("sim-fallback"));
    }
    let (sim_in, sim_out) = env.sim.tokens();
    let expected = (sim_in as f64 * 1.0 + sim_out as f64 * 2.0) / 1e6;
    assert!((metric(&m, "enrich_llm_cost_usd_total") - expected).abs() < 1e-9, "the fallback's prices");
    // The audit shows both calls of each attempt.
    let steps: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT model, status, count(*) FROM step_outcomes WHERE pipeline = $1 AND step = 'llm_call'
         GROUP BY model, status ORDER BY model",
    )
    .bind(&env.settings.pipeline.name)
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(
        steps,
        vec![
            ("sim-fallback".to_string(), "ok".to_string(), N as i64),
            ("sim-primary".into(), "failed".into(), N as i64)
        ]
    );
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_while_calls_wait_for_their_turn_leaves_no_attempt_behind() -> anyhow::Result<()> {
    const N: usize = 20;
    let port = free_port()?;
    // One call every ten seconds: after the first, every record waits for its turn.
    let overrides =
        [("ENRICH_LLM__REQUESTS_PER_MINUTE", "6".to_string()), ("ENRICH_ENRICHER__HTTP_PORT", port.to_string())];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let [ingest, enricher, publisher] =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    wait_for("records to wait for their turn", DEADLINE, || async {
        let Ok(m) = scrape_metrics(port).await else { return Ok(None) };
        Ok((metric(&m, "enrich_llm_flow_waits_total{cause=\"requests_per_minute\"}") >= 5.0).then_some(()))
    })
    .await?;
    enricher.stop().await?;
    // Only calls made count as attempts, and no lease is left to make a record look like
    // it died mid-call.
    let pipeline = &env.settings.pipeline.name;
    let (attempts, leased): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(attempts), 0)::bigint, count(*) FILTER (WHERE lease_owner IS NOT NULL)
         FROM enrich_state WHERE pipeline = $1",
    )
    .bind(pipeline)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((attempts, leased), (env.sim.requests().len() as i64, 0));
    // Restarted without the limit, every record completes with one call.
    let enricher = env.spawn_with(StageKind::Enricher, |s| s.llm.requests_per_minute = 0);
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in [ingest, enricher, publisher] {
        s.stop().await?;
    }
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (N as i64, 0), "{acct:?}");
    assert_eq!(env.sim.completions(), N as u64);
    env.teardown().await;
    Ok(())
}
