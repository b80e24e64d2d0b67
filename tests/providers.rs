//! Provider conformance against llm-sim, for both APIs the enricher speaks: the request's
//! shape (model, schema, authentication and extra headers), usage parsing, the repair
//! path and error mapping, end to end.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::headers;
use enrich_e2e::loadgen::accounting::account;
use enrich_e2e::loadgen::kafka_io::{header, produce_all, read_to_end};
use enrich_e2e::loadgen::tickets::ticket;
use enrich_e2e::loadgen::workload::{Record, marked_tickets};
use enrich_e2e::{StageKind, TestEnv, wait_for};
use serde_json::Value;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);

async fn conformance(provider: &str) -> anyhow::Result<()> {
    const N: usize = 8;
    let overrides = [
        ("ENRICH_LLM__PROVIDER", provider.to_string()),
        // Cargo sets this for every test process: a stand-in for a real key's variable.
        ("ENRICH_LLM__API_KEY_ENV", "CARGO_PKG_NAME".to_string()),
        ("ENRICH_LLM__EXTRA_HEADERS__X-TEAM", "enrichment-test".to_string()),
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records = marked_tickets(&env.id, N, &[(2, "invalid-json-once"), (5, "always-500")]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    // The repaired one is published; the always-500 one is dead-lettered as transient.
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), ((N - 1) as i64, 1), "{provider}: {acct:?}");
    let dlq = read_to_end(&env.settings, &env.settings.topics.dlq, Duration::from_secs(30))?;
    assert_eq!(header(&dlq[0], headers::DLQ_REASON).as_deref(), Some("max_attempts"));
    assert!(header(&dlq[0], headers::DLQ_ERROR).unwrap().contains("500"), "{provider}: the 500 is named");

    // The requests: where they went and what they carried.
    let requests = env.sim.requests();
    assert!(requests.len() >= N + 2, "{provider}: {} requests", requests.len());
    let schema: Value = serde_json::from_str(&env.settings.llm.output_schema)?;
    for r in &requests {
        let h = |name: &str| r["headers"][name].as_str().map(str::to_string);
        let body = &r["body"];
        assert_eq!(body["model"].as_str(), Some(env.settings.llm.model.as_str()));
        assert_eq!(h("x-team").as_deref(), Some("enrichment-test"), "{provider}: extra headers are sent");
        match provider {
            "openai" => {
                assert_eq!(r["path"], "/v1/chat/completions");
                assert_eq!(h("authorization").as_deref(), Some("Bearer enrich-e2e"));
                assert_eq!(body["response_format"]["type"], "json_schema");
                assert_eq!(body["response_format"]["json_schema"]["schema"], schema);
                assert_eq!(body["messages"][0]["role"], "system");
            }
            _ => {
                assert_eq!(r["path"], "/v1/messages");
                assert_eq!(h("x-api-key").as_deref(), Some("enrich-e2e"));
                assert!(h("authorization").is_none(), "no bearer token for Anthropic");
                assert_eq!(h("anthropic-version").as_deref(), Some("2023-06-01"));
                assert_eq!(body["tools"][0]["input_schema"], schema);
                assert_eq!(body["tool_choice"]["type"], "tool");
                assert_eq!(body["tool_choice"]["name"], body["tools"][0]["name"]);
                assert_eq!(body["system"].as_str().map(str::trim), Some(env.settings.llm.system_prompt.trim()));
                assert!(body["max_tokens"].as_u64().is_some());
                assert_eq!(body["messages"][0]["role"], "user");
            }
        }
    }
    // The repair call shows the model its previous answer.
    let repairs = requests
        .iter()
        .filter(|r| r["body"]["messages"].as_array().is_some_and(|m| m.iter().any(|m| m["role"] == "assistant")));
    assert_eq!(repairs.count(), 1, "{provider}: one repair call");

    // Usage parsed: the tokens recorded per call add up to what llm-sim reported.
    let (input, output): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(input_tokens), 0)::bigint, COALESCE(sum(output_tokens), 0)::bigint
         FROM step_outcomes WHERE pipeline = $1 AND step IN ('llm_call', 'llm_repair')",
    )
    .bind(&pipeline)
    .fetch_one(&env.pool)
    .await?;
    let (sim_in, sim_out) = env.sim.tokens();
    assert_eq!((input, output), (sim_in as i64, sim_out as i64), "{provider}: usage parsed");
    let output_records = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output_records.len(), N - 1);
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_api_conforms() -> anyhow::Result<()> {
    conformance("openai").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_anthropic_api_conforms() -> anyhow::Result<()> {
    conformance("anthropic").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fields_off_the_allow_list_never_reach_the_llm() -> anyhow::Result<()> {
    const N: usize = 10;
    let overrides = [
        // A template that renders the whole record: only the allow-list keeps the notes out.
        ("ENRICH_LLM__USER_TEMPLATE", "{{ record }}".to_string()),
        ("ENRICH_LLM__INPUT_FIELDS", r#"["subject", "body"]"#.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let records: Vec<Record> = (0..N)
        .map(|i| {
            let mut record = Record::of_ticket(ticket(&env.id, i));
            let mut value: Value = serde_json::from_slice(record.value.as_ref().unwrap()).unwrap();
            value["internal_notes"] = Value::String(format!("SECRET-NOTE-{i}"));
            record.value = Some(serde_json::to_vec(&value).unwrap());
            record
        })
        .collect();
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "{acct:?}");
    for s in stages {
        s.stop().await?;
    }
    let requests = env.sim.requests();
    assert_eq!(requests.len(), N);
    for r in &requests {
        let sent = r["body"].to_string();
        assert!(!sent.contains("SECRET-NOTE") && !sent.contains("internal_notes"), "{sent}");
        assert!(sent.contains("subject"), "the allowed fields are sent: {sent}");
    }
    // The output still carries every source field: only the LLM is kept from the notes.
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert!(output.iter().all(|m| {
        let v: Value = serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap();
        v["internal_notes"].as_str().is_some_and(|n| n.starts_with("SECRET-NOTE"))
    }));
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kill_switch_stops_new_calls_on_every_replica_and_resumes() -> anyhow::Result<()> {
    const N: usize = 200;
    let admin_port = enrich_e2e::free_port()?;
    let token = "kill-switch-token-0123".to_string();
    let overrides = [
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", admin_port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", token.clone()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "4".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(100)), &overrides).await?;
    let records = marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let ports = [enrich_e2e::free_port()?, enrich_e2e::free_port()?];
    let mut stages =
        vec![env.spawn(StageKind::Ingest), env.spawn(StageKind::Publisher), env.spawn(StageKind::DlqReplayer)];
    for (i, port) in ports.iter().enumerate() {
        stages.push(env.spawn_with(StageKind::Enricher, |s| {
            s.enricher.http_port = *port;
            s.enricher.instance_id = Some(format!("replica-{i}"));
        }));
    }
    wait_for("enrichment under way", DEADLINE, || async { Ok((env.sim.completions() >= 10).then_some(())) }).await?;

    let client = dlq_replayer::cli::Client::new(format!("http://127.0.0.1:{admin_port}"), Some(token));
    let anonymous = dlq_replayer::cli::Client::new(format!("http://127.0.0.1:{admin_port}"), None);
    assert!(anonymous.set_paused(true, None).await.unwrap_err().to_string().contains("401"));
    let state = client.set_paused(true, Some("provider incident")).await?;
    assert_eq!(state["paused"], true);
    // Every replica says so, and lets its calls in flight finish.
    for port in ports {
        wait_for("the replica to pause", DEADLINE, || async {
            let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await?;
            let paused = ready.status().as_u16() == 503 && ready.text().await?.contains("provider incident");
            let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
            let idle = metrics.lines().any(|l| l == "enrich_in_flight 0");
            Ok((paused && idle && metrics.lines().any(|l| l == "enrich_paused 1")).then_some(()))
        })
        .await?;
    }
    let calls_at_pause = env.sim.requests().len();
    let pipeline = env.settings.pipeline.name.clone();
    let before = account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
    assert!(before.published < N as i64, "work is left while paused ({before:?})");
    // An observation window: two seconds in which the replicas would have made dozens of calls.
    let window = tokio::time::Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        assert_eq!(env.sim.requests().len(), calls_at_pause, "no new LLM call starts while paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    client.set_paused(false, None).await?;
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "every ticket published after the resume: {acct:?}");
    for port in ports {
        wait_for("the replica to be ready again", DEADLINE, || async {
            Ok((reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await?.status().as_u16() == 200).then_some(()))
        })
        .await?;
    }
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(env.sim.completions(), N as u64, "one call per ticket, pause or not");
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_response_cache_answers_repeated_inputs_without_a_call() -> anyhow::Result<()> {
    const N: usize = 100;
    const DISTINCT: usize = 20;
    let overrides = [("ENRICH_LLM__CACHE_TTL_SECS", "3600".to_string())];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(50)), &overrides).await?;
    // 100 tickets, each its own id, over 20 distinct subjects and bodies.
    let records: Vec<Record> = (0..N)
        .map(|i| {
            let base = ticket(&env.id, i % DISTINCT);
            let mut t = ticket(&env.id, i);
            t.subject = base.subject;
            t.body = format!("{} (case {})", base.body, i % DISTINCT);
            Record::of_ticket(t)
        })
        .collect();
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let pipeline = env.settings.pipeline.name.clone();
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(acct.published, N as i64, "{acct:?}");
    for s in stages {
        s.stop().await?;
    }
    assert_eq!(env.sim.completions(), DISTINCT as u64, "one call per distinct input");
    let output = read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(30))?;
    assert_eq!(output.len(), N);
    // Cached answers are marked in the result and in the audit.
    let results = read_to_end(&env.settings, &env.settings.topics.results, Duration::from_secs(30))?;
    let cached = results
        .iter()
        .filter_map(|m| enrich_common::Envelope::decode_from(rdkafka::Message::payload(m).unwrap()).ok())
        .filter(|e| e.result().is_some_and(|r| r.cached))
        .count();
    assert_eq!(cached, N - DISTINCT);
    let (hits,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM step_outcomes WHERE pipeline = $1 AND step = 'cache_hit'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(hits, (N - DISTINCT) as i64);
    // Repeats get the same enrichment as their first.
    let mut by_body: std::collections::HashMap<String, Value> = std::collections::HashMap::new();
    for m in &output {
        let v: Value = serde_json::from_slice(rdkafka::Message::payload(m).unwrap())?;
        let e = by_body.entry(v["body"].as_str().unwrap().to_string()).or_insert_with(|| v["enrichment"].clone());
        assert_eq!(*e, v["enrichment"]);
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_budget_makes_calls_wait_for_the_next_window_and_never_overspends() -> anyhow::Result<()> {
    const N: usize = 200;
    let enricher_port = enrich_e2e::free_port()?;
    // About 0.18 USD per call at these prices (a ~700-character prompt, a ~50-token
    // answer; the reservation estimates 100 output tokens): 9 USD per 3-second window
    // covers about 50 calls.
    let overrides = [
        ("ENRICH_LLM__INPUT_USD_PER_MTOK", "1000".to_string()),
        ("ENRICH_LLM__OUTPUT_USD_PER_MTOK", "1000".to_string()),
        ("ENRICH_LLM__MAX_OUTPUT_TOKENS", "100".to_string()),
        ("ENRICH_LLM__BUDGETS", "[{usd = 9.0, window_secs = 3}]".to_string()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "32".to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", enricher_port.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(20)), &overrides).await?;
    let records = marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    // While a window is spent the enricher says so.
    let reason = wait_for("the budget to run out", DEADLINE, || async {
        let Ok(r) = reqwest::get(format!("http://127.0.0.1:{enricher_port}/readyz")).await else { return Ok(None) };
        let text = r.text().await?;
        Ok(text.contains("budget").then_some(text))
    })
    .await?;
    assert!(reason.contains("resume"), "{reason}");
    let pipeline = env.settings.pipeline.name.clone();
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    for s in stages {
        s.stop().await?;
    }
    assert_eq!((acct.published, acct.dead_lettered_at_enricher), (N as i64, 0), "none dead-lettered: {acct:?}");
    assert_eq!(env.sim.completions(), N as u64);
    let windows: Vec<(f64, f64, f64, i64)> = sqlx::query_as(
        "SELECT limit_usd, spent_usd, reserved_usd, calls FROM budget_windows WHERE pipeline = $1 ORDER BY window_start",
    )
    .bind(&pipeline)
    .fetch_all(&env.pool)
    .await?;
    assert!(windows.len() >= 4, "200 calls at ~50 per window take at least four windows: {windows:?}");
    // The most calls a window's budget covers, at the cheapest call's real cost.
    let (cheapest,): (f64,) = sqlx::query_as(
        "SELECT min(cost_usd)::float8 FROM step_outcomes WHERE pipeline = $1 AND step = 'llm_call' AND status = 'ok'",
    )
    .bind(&pipeline)
    .fetch_one(&env.pool)
    .await?;
    for (limit, spent, reserved, calls) in &windows {
        assert!(spent <= limit, "never over budget: {windows:?}");
        assert!(*reserved < 1e-9, "every reservation settled: {windows:?}");
        assert!(*calls as f64 <= (limit / cheapest).floor(), "no more calls than the budget covers: {windows:?}");
    }
    assert_eq!(windows.iter().map(|w| w.3).sum::<i64>(), N as i64, "every paid call counted once");
    env.teardown().await;
    Ok(())
}
