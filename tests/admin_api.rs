//! The admin API's protection, on the real stack: every read route (HTTP and gRPC) refuses
//! a caller without the read or admin token and works with either; the read token cannot
//! mutate; with no token configured reads stay open but never carry a payload; a key's
//! history is paged; a half-sent request cannot hold a connection, a slow one is cut, and
//! the connection limit holds; llm-sim's admin endpoint never returns request headers.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use dlq_replayer::grpc::{DeadLettersClient, pb};
use enrich_e2e::loadgen::kafka_io::produce_all;
use enrich_e2e::loadgen::workload::{self, Kind, Record};
use enrich_e2e::{StageKind, TestEnv, wait_for};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(120);
const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789";
/// What the malformed record holds: it must reach only a caller with a token.
const PII: &str = "jane.doe@example.com";

/// Three tickets and one malformed record (dead-lettered by ingest), all the way through.
async fn stack(tokens: &[(&str, &str)]) -> anyhow::Result<(TestEnv, Vec<enrich_e2e::RunningStage>, u16, u16)> {
    let (http, grpc) = (enrich_e2e::free_port()?, enrich_e2e::free_port()?);
    let mut overrides = vec![
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", http.to_string()),
        ("ENRICH_DLQ_REPLAYER__GRPC_PORT", grpc.to_string()),
    ];
    overrides.extend(tokens.iter().map(|(k, v)| (*k, v.to_string())));
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let mut records = workload::marked_tickets(&env.id, 3, &[]);
    records.push(Record {
        kind: Kind::Malformed { reason: "invalid_json" },
        ticket: None,
        key: Some(b"bad-1".to_vec()),
        value: Some(format!("{{\"id\": \"bad-1\", \"email\": \"{PII}\"").into_bytes()),
    });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer]
        .into_iter()
        .map(|k| env.spawn(k))
        .collect();
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!((acct.published, acct.dead_lettered_at_ingest), (3, 1), "{acct:?}");
    Ok((env, stages, http, grpc))
}

async fn get(url: &str, token: Option<&str>) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = reqwest::Client::new().get(url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_read_route_refuses_without_the_token_and_works_with_it() -> anyhow::Result<()> {
    let tokens = [("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", ADMIN), ("ENRICH_DLQ_REPLAYER__READ_TOKEN", READ)];
    let (env, stages, http, grpc) = stack(&tokens).await?;
    let api = format!("http://127.0.0.1:{http}");
    let ready = wait_for("the admin API", DEADLINE, || async {
        Ok(reqwest::get(format!("{api}/readyz")).await.ok().filter(|r| r.status().is_success()))
    });
    ready.await?;
    let (status, list) = get(&format!("{api}/v1/dead-letters"), Some(READ)).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let id = list["items"][0]["id"].as_i64().expect("the malformed record is listed");
    let key = format!(
        "{}:{}",
        env.settings.pipeline.name,
        workload::marked_tickets(&env.id, 1, &[])[0].ticket.as_ref().unwrap().id
    );

    let reads = [
        format!("{api}/v1/dead-letters"),
        format!("{api}/v1/dead-letters/{id}"),
        format!("{api}/v1/messages/{key}"),
        format!("{api}/v1/enrichment"),
    ];
    for url in &reads {
        for (token, why) in [(None, "no token"), (Some("wrong-token-0123456789"), "a wrong token")] {
            let (status, body) = get(url, token).await?;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{url} with {why}: {body}");
            assert!(!body.to_string().contains(PII), "{url} with {why}: {body}");
        }
        for token in [READ, ADMIN] {
            let (status, body) = get(url, Some(token)).await?;
            assert_eq!(status, StatusCode::OK, "{url}: {body}");
        }
    }
    let (_, shown) = get(&format!("{api}/v1/dead-letters/{id}"), Some(READ)).await?;
    assert!(shown["payload"].as_str().unwrap().contains(PII), "an authenticated reader gets the payload: {shown}");
    assert_eq!(shown["payload_withheld"], false);
    // The read token cannot mutate.
    let discard = reqwest::Client::new().post(format!("{api}/v1/dead-letters/{id}/discard")).bearer_auth(READ);
    assert_eq!(discard.send().await?.status(), StatusCode::UNAUTHORIZED);

    // A key's history comes a page at a time, and the pages add up to the whole.
    let (_, whole) = get(&format!("{api}/v1/messages/{key}"), Some(READ)).await?;
    let all_runs: Vec<i64> = whole["runs"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(all_runs.len() >= 3, "forwarded, enriched, published: {whole}");
    assert!(whole["next_runs_after"].is_null());
    let (mut paged, mut after) = (Vec::new(), 0i64);
    loop {
        let (status, page) = get(&format!("{api}/v1/messages/{key}?limit=1&runs_after={after}"), Some(READ)).await?;
        assert_eq!(status, StatusCode::OK, "{page}");
        let runs = page["runs"].as_array().unwrap();
        assert!(runs.len() <= 1, "{page}");
        paged.extend(runs.iter().map(|r| r["id"].as_i64().unwrap()));
        match page["next_runs_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(paged, all_runs);
    assert_eq!(whole["tokens"], get(&format!("{api}/v1/messages/{key}?limit=1"), Some(READ)).await?.1["tokens"]);

    // gRPC: List and Show the same way.
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut client = wait_for("the gRPC admin API", DEADLINE, || async {
        Ok(DeadLettersClient::connect(endpoint.clone()).await.ok())
    })
    .await?;
    let list = || pb::ListRequest { status: "dead".into(), filter: None, after_id: 0, limit: 10 };
    let show = || pb::ShowRequest { id, limit: 0, runs_after_id: 0, steps_after_id: 0 };
    assert_eq!(client.list(list()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(client.show(show()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let wrong = client.show(with_token(show(), "wrong-token-0123456789")).await;
    assert_eq!(wrong.unwrap_err().code(), tonic::Code::Unauthenticated);
    for token in [READ, ADMIN] {
        let items = client.list(with_token(list(), token)).await?.into_inner().items;
        assert_eq!(items.iter().map(|d| d.id).collect::<Vec<_>>(), vec![id]);
        let shown = client.show(with_token(show(), token)).await?.into_inner();
        assert!(String::from_utf8(shown.payload)?.contains(PII) && !shown.payload_withheld);
    }
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_token_configured_reads_are_open_but_carry_no_payload() -> anyhow::Result<()> {
    let (env, stages, http, grpc) = stack(&[]).await?;
    let api = format!("http://127.0.0.1:{http}");
    let (status, list) = get(&format!("{api}/v1/dead-letters"), None).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let id = list["items"][0]["id"].as_i64().expect("the malformed record is listed");
    let (status, shown) = get(&format!("{api}/v1/dead-letters/{id}"), None).await?;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert!(shown["payload"].is_null() && shown["payload_withheld"] == true, "{shown}");
    assert!(!shown.to_string().contains(PII), "{shown}");
    let mut client = DeadLettersClient::connect(format!("http://127.0.0.1:{grpc}")).await?;
    let shown = client.show(pb::ShowRequest { id, ..Default::default() }).await?.into_inner();
    assert!(shown.payload.is_empty() && shown.payload_withheld);
    // Mutations stay refused.
    let discard = reqwest::Client::new().post(format!("{api}/v1/dead-letters/{id}/discard")).send().await?;
    assert_eq!(discard.status(), StatusCode::UNAUTHORIZED);
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Reads from `stream` until the server closes it (or `limit` passes): what it sent.
async fn until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<(Instant, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some((closed, got))
}

/// Opens `limit` connections to `addr` that never finish their start (the first sends
/// nothing, the others `partial`), then runs `complete`; checks that the server closes
/// every held one after its header-read timeout, and that `complete` was answered only
/// once a slot had freed. Returns what `complete` returned.
async fn held_then_answered<T: Send + 'static>(
    addr: &str,
    partial: &[u8],
    limit: usize,
    complete: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let mut held = Vec::new();
    for i in 0..limit {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        if i > 0 {
            stream.write_all(partial).await?;
        }
        held.push(stream);
    }
    let started = Instant::now();
    let extra = tokio::spawn(async move {
        let answer = complete.await;
        (Instant::now(), answer)
    });
    // Each watched on its own, so each closing is seen when it happens.
    let watchers: Vec<_> = held
        .into_iter()
        .map(|mut stream| tokio::spawn(async move { until_closed(&mut stream, Duration::from_secs(20)).await }))
        .collect();
    let mut closed_at = Vec::new();
    for (i, watcher) in watchers.into_iter().enumerate() {
        let (at, _) =
            watcher.await?.unwrap_or_else(|| panic!("{addr}: half-sent connection {i} still open after 20 s"));
        closed_at.push(at);
    }
    let (answered_at, answer) = extra.await?;
    let first_freed = closed_at.iter().min().copied().unwrap();
    assert!(
        first_freed >= started + Duration::from_millis(400),
        "{addr}: closed by the header-read timeout, not at once"
    );
    assert!(answered_at >= first_freed, "{addr}: the extra connection waited for a free slot (limit {limit})");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_sent_and_slow_requests_cannot_hold_the_admin_server() -> anyhow::Result<()> {
    const LIMIT: usize = 4;
    let (port, grpc_port) = (enrich_e2e::free_port()?, enrich_e2e::free_port()?);
    let overrides = [
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", port.to_string()),
        ("ENRICH_DLQ_REPLAYER__GRPC_PORT", grpc_port.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", ADMIN.to_string()),
        ("ENRICH_HTTP__HEADER_READ_TIMEOUT_MS", "500".to_string()),
        ("ENRICH_HTTP__REQUEST_TIMEOUT_MS", "1000".to_string()),
        ("ENRICH_HTTP__MAX_CONNECTIONS", LIMIT.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let replayer = env.spawn(StageKind::DlqReplayer);
    let addr = format!("127.0.0.1:{port}");
    wait_for("the admin API", DEADLINE, || async {
        Ok(reqwest::get(format!("http://{addr}/readyz")).await.ok().filter(|r| r.status().is_success()))
    })
    .await?;

    // As many half-sent requests as the limit allows (one connection sends nothing at
    // all); one more, complete, waits for a free slot.
    let partial: &[u8] = b"GET /v1/dead-letters HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let status = held_then_answered(&addr, partial, LIMIT, async move {
        reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.map(|r| r.status().as_u16()).map_err(Into::into)
    })
    .await?;
    assert_eq!(status, 200, "the server still answers");

    // The gRPC port likewise: a connection must send the whole HTTP/2 preface in time.
    let grpc_addr = format!("127.0.0.1:{grpc_port}");
    let endpoint = format!("http://{grpc_addr}");
    let listed = held_then_answered(&grpc_addr, b"PRI * HTTP/2.0\r\n", LIMIT, async move {
        let mut client = DeadLettersClient::connect(endpoint).await?;
        let list = pb::ListRequest { status: "dead".into(), filter: None, after_id: 0, limit: 10 };
        Ok(client.list(with_token(list, ADMIN)).await?.into_inner().items.len() as u16)
    })
    .await?;
    assert_eq!(listed, 0, "the gRPC server still answers");

    // A request whose body never finishes is answered 503 after the request timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await?;
    let head = format!(
        "POST /v1/replay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ids\": ["
    );
    slow.write_all(head.as_bytes()).await?;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), slow.read(&mut answer))
        .await
        .expect("a slow request is answered within the request timeout")?;
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    replayer.stop().await?;
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_sims_admin_endpoint_never_returns_request_headers() -> anyhow::Result<()> {
    let shutdown = enrich_common::shutdown::Shutdown::new();
    let sim = llm_sim::start("127.0.0.1", 0, llm_sim::SimConfig::default(), shutdown.clone()).await?;
    let key = "sk-live-0123456789abcdef";
    let body = serde_json::json!({"model": "sim", "messages": [{"role": "user", "content": "My invoice is wrong"}]});
    let http = reqwest::Client::new();
    let answered =
        http.post(format!("{}/chat/completions", sim.base_url())).bearer_auth(key).json(&body).send().await?;
    assert_eq!(answered.status(), StatusCode::OK);
    let listed: Value = http.get(format!("http://{}/admin/requests", sim.addr)).send().await?.json().await?;
    let items = listed.as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(items[0]["body"]["messages"][0]["content"], "My invoice is wrong");
    assert!(items[0].get("headers").is_none() && !listed.to_string().contains(key), "{listed}");
    shutdown.cancel();
    Ok(())
}

/// Two replays of the same dead letters at once, as two dlq-replayer replicas (or two
/// API requests, or an API request beside a console job) run them: each dead letter is
/// replayed once. Each replay holds the dead letter's row from its check that it still
/// waits to its mark as replayed; before, both read "waiting" and both replayed it (the
/// loop guard counts only finished replays).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replays_of_the_same_dead_letters_at_once_replay_each_once() -> anyhow::Result<()> {
    const N: usize = 4;
    let overrides = [
        // Paced, so the two replays overlap; the loop guard above two, so it is not what
        // stops the second.
        ("ENRICH_DLQ_REPLAYER__REPLAY_RATE_PER_SEC", "4".to_string()),
        ("ENRICH_DLQ_REPLAYER__MAX_REPLAYS_PER_KEY", "5".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let records: Vec<Record> = (0..N)
        .map(|i| Record {
            kind: Kind::Malformed { reason: "invalid_json" },
            ticket: None,
            key: Some(format!("twice-{i}").into_bytes()),
            value: Some(format!("{{\"id\": \"twice-{i}\", oops").into_bytes()),
        })
        .collect();
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let ingest = env.spawn(StageKind::Ingest);
    wait_for("the dead letters", DEADLINE, || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
        Ok((n == N as i64).then_some(()))
    })
    .await?;
    ingest.stop().await?;

    let (a, b) = (env.replayer()?, env.replayer()?);
    let filter = dlq_replayer::replay::Filter::default();
    let (first, second) = tokio::join!(a.replay(&filter, false, None), b.replay(&filter, false, None));
    let (first, second) = (first?, second?);
    let (replayed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM replay_log WHERE pipeline = $1 AND outcome = 'replayed'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
    println!(
        "two replays at once: {} + {} replayed, {replayed} in the replay log",
        first.replayed.len(),
        second.replayed.len()
    );
    assert_eq!(replayed, N as i64, "each dead letter replayed once");
    assert_eq!(first.replayed.len() + second.replayed.len(), N, "the replays' own counts agree");
    env.teardown().await;
    Ok(())
}

/// A replay whose key is dead-lettered again (its cause not fixed: every call answers
/// 400) before the replay has marked the first dead letter replayed. The new dead
/// letter's listing must not take the first, still marked `dead` in the replay's open
/// transaction, for the key's listed one and drop itself: the key would be dead-lettered
/// with nothing listed, never to be replayed. The test holds the replay's mark (a trigger
/// waits on an advisory lock it holds) until the enricher has written the second DLQ
/// record and its listing either finished or waits for the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_dead_lettered_again_while_its_replay_finishes_keeps_a_listed_dead_letter() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let mut ticket = enrich_e2e::loadgen::tickets::ticket(&env.id, 0);
    ticket.body = "Always refused by the provider [[sim:400-echo]]".into();
    produce_all(&env.settings, env.source_topic(), &[Record::of_ticket(ticket)], |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));
    let count = |status: &'static str| {
        let (pool, pipeline) = (env.pool.clone(), pipeline.clone());
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = $2")
                .bind(&pipeline)
                .bind(status)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(n)
        }
    };
    wait_for("the first dead letter listed", DEADLINE, || async { Ok((count("dead").await? == 1).then_some(())) })
        .await?;

    sqlx::raw_sql(
        "CREATE FUNCTION test_hold_replay_mark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); RETURN NEW; END $$;
         CREATE TRIGGER test_hold_replay_mark BEFORE UPDATE ON dead_letters FOR EACH ROW
           WHEN (NEW.status = 'replayed') EXECUTE FUNCTION test_hold_replay_mark();",
    )
    .execute(&env.pool)
    .await?;
    let mut holder = env.pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(4242)").execute(&mut *holder).await?;
    let replayer = env.replayer()?;
    let replay =
        tokio::spawn(async move { replayer.replay(&dlq_replayer::replay::Filter::default(), false, None).await });
    let dlq_topic = env.settings.topics.dlq.clone();
    wait_for("the key dead-lettered again, its listing done or waiting for the replay", DEADLINE, || async {
        let dlq = tokio::task::block_in_place(|| {
            enrich_e2e::loadgen::kafka_io::read_to_end(&env.settings, &dlq_topic, Duration::from_secs(30))
        })?;
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%listed AS%'",
        )
        .fetch_one(&env.pool)
        .await?;
        Ok((dlq.len() == 2 && (count("pending").await? == 0 || waiting > 0)).then_some(()))
    })
    .await?;
    sqlx::query("SELECT pg_advisory_unlock(4242)").execute(&mut *holder).await?;
    drop(holder);
    let report = replay.await??;
    assert_eq!(report.replayed.len(), 1, "the first dead letter replayed");
    wait_for("no dead letter left pending", DEADLINE, || async { Ok((count("pending").await? == 0).then_some(())) })
        .await?;
    let (state,): (String,) = sqlx::query_as("SELECT state FROM enrich_state WHERE pipeline = $1")
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
    let listed = count("dead").await?;
    println!("after the replay: key {state}, {listed} listed dead letter(s)");
    assert_eq!(state, "dead_lettered");
    assert_eq!(listed, 1, "the dead-lettered key has its dead letter listed (replayable)");
    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}
