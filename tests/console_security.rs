//! The console's protections over real HTTP, against the real dlq-replayer (the broker and
//! PostgreSQL of the stack): without a session no route answers anything but the login,
//! malformed paths and queries included, and every answer carries the security headers;
//! two replays of the same dead letters started at once replay each of them once; with no
//! token configured the published result is withheld like the payload it is made from.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_e2e::loadgen::kafka_io::produce_all;
use enrich_e2e::loadgen::workload::{self, Kind, Record};
use enrich_e2e::{StageKind, TestEnv, wait_for};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE, X_FRAME_OPTIONS};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);
const ADMIN: &str = "console-admin-token-0123456789";
const READ: &str = "console-read-token-0123456789";

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Logs in with `token`: the session cookie (`name=value`).
async fn login(base: &str, token: &str) -> anyhow::Result<String> {
    let r = client()
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await?;
    anyhow::ensure!(r.status() == StatusCode::SEE_OTHER, "login: {}", r.status());
    let cookie = r.headers().get(SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or("");
    Ok(cookie.split(';').next().unwrap_or("").to_string())
}

async fn get(base: &str, path: &str, cookie: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut request = client().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        request = request.header(COOKIE, c);
    }
    Ok(request.send().await?)
}

async fn post(base: &str, path: &str, cookie: &str, form: &str) -> anyhow::Result<reqwest::Response> {
    Ok(client()
        .post(format!("{base}{path}"))
        .header(COOKIE, cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_string())
        .send()
        .await?)
}

/// The values of every `name="NAME" value="…"` of a page.
fn values(page: &str, name: &str) -> Vec<String> {
    let needle = format!("name=\"{name}\" value=\"");
    page.match_indices(&needle)
        .filter_map(|(i, _)| page[i + needle.len()..].split('"').next().map(str::to_string))
        .collect()
}

async fn serve(overrides: &[(&str, String)]) -> anyhow::Result<(TestEnv, String)> {
    let http = enrich_e2e::free_port()?;
    let mut all = vec![
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", http.to_string()),
        ("ENRICH_DLQ_REPLAYER__GRPC_PORT", enrich_e2e::free_port()?.to_string()),
    ];
    all.extend(overrides.iter().cloned());
    let env = TestEnv::new(llm_sim::Latency::default(), &all).await?;
    Ok((env, format!("http://127.0.0.1:{http}")))
}

async fn console_up(base: &str) -> anyhow::Result<()> {
    wait_for("the console", DEADLINE, || async {
        Ok(reqwest::get(format!("{base}/ui/login")).await.ok().filter(|r| r.status().is_success()).map(|_| ()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_route_answers_without_a_session_but_the_login() -> anyhow::Result<()> {
    let (env, base) = serve(&[
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", ADMIN.to_string()),
        ("ENRICH_DLQ_REPLAYER__READ_TOKEN", READ.to_string()),
    ])
    .await?;
    let replayer = env.spawn(StageKind::DlqReplayer);
    console_up(&base).await?;
    // Without a session: a page goes to the login, whatever its path or query holds, and
    // every answer carries the headers that keep it out of frames.
    let mut wrong = Vec::new();
    for path in ["/ui", "/ui/event", "/ui/event?nokey=1", "/ui/dead-letters/not-a-number", "/ui/jobs/x", "/ui/nope"] {
        let r = get(&base, path, None).await?;
        let (status, location) =
            (r.status(), r.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("").to_string());
        let bare = r.headers().get(X_FRAME_OPTIONS).is_none() || r.headers().get(CONTENT_SECURITY_POLICY).is_none();
        println!("GET {path} without a session: {status} location={location:?} security headers missing={bare}");
        if (status, location.as_str()) != (StatusCode::SEE_OTHER, "/ui/login") || bare {
            wrong.push(path);
        }
    }
    assert!(wrong.is_empty(), "not sent to the login with the security headers: {wrong:?}");
    replayer.stop().await?;
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replays_of_the_same_dead_letters_at_once_replay_each_once() -> anyhow::Result<()> {
    let (env, base) = serve(&[
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", ADMIN.to_string()),
        ("ENRICH_DLQ_REPLAYER__READ_TOKEN", READ.to_string()),
        // Paced, so that a replay is under way long enough for another to start beside it;
        // the loop guard well above two, so that it is not what stops a second replay.
        ("ENRICH_DLQ_REPLAYER__REPLAY_RATE_PER_SEC", "4".to_string()),
        ("ENRICH_DLQ_REPLAYER__MAX_REPLAYS_PER_KEY", "5".to_string()),
    ])
    .await?;
    let pipeline = env.settings.pipeline.name.clone();
    let records: Vec<Record> = (0..4)
        .map(|i| Record {
            kind: Kind::Malformed { reason: "invalid_json" },
            ticket: None,
            key: Some(format!("bad-{i}").into_bytes()),
            value: Some(format!("{{\"id\": \"bad-{i}\", oops").into_bytes()),
        })
        .collect();
    produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::DlqReplayer].map(|k| env.spawn(k));
    console_up(&base).await?;

    let ids: Vec<i64> = wait_for("four dead letters", DEADLINE, || async {
        let ids: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM dead_letters WHERE pipeline = $1 AND status = 'dead' ORDER BY id")
                .bind(&pipeline)
                .fetch_all(&env.pool)
                .await?;
        Ok((ids.len() == 4).then(|| ids.into_iter().map(|(i,)| i).collect()))
    })
    .await?;

    // Two dry runs of the same four (two tabs, or a dry run sent twice), then both replays.
    let admin = login(&base, ADMIN).await?;
    let page = get(&base, "/ui/dead-letters", Some(&admin)).await?.text().await?;
    let csrf = values(&page, "csrf").into_iter().next().expect("a form token");
    let selection: String = ids.iter().map(|id| format!("&id={id}")).collect();
    let mut previews = Vec::new();
    for _ in 0..2 {
        let body = format!("csrf={csrf}&scope=selected{selection}");
        let page = post(&base, "/ui/dead-letters/preview", &admin, &body).await?.text().await?;
        previews.push(values(&page, "preview").into_iter().next().expect("a dry run to replay"));
    }
    let mut jobs = Vec::new();
    for preview in &previews {
        let body = format!("csrf={csrf}&preview={preview}&rate=4&note=security+test");
        let r = post(&base, "/ui/dead-letters/replay", &admin, &body).await?;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        jobs.push(r.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap().to_string());
    }
    for job in &jobs {
        wait_for("the replay to end", DEADLINE, || async {
            let page = get(&base, job, Some(&admin)).await?.text().await?;
            Ok(page.contains("data-job=\"done\"").then_some(()))
        })
        .await?;
    }
    let (replayed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM replay_log WHERE pipeline = $1 AND outcome = 'replayed' AND dead_letter_id = ANY($2)",
    )
    .bind(&pipeline)
    .bind(&ids)
    .fetch_one(&env.pool)
    .await?;
    println!("two replays of the same 4 dead letters at once: {replayed} replays");
    assert_eq!(replayed, 4, "each dead letter replayed once");

    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_token_configured_the_published_result_is_withheld() -> anyhow::Result<()> {
    let (env, base) = serve(&[]).await?;
    let records = workload::marked_tickets(&env.id, 1, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    env.wait_accounted(&produced, DEADLINE).await?;
    console_up(&base).await?;
    let (key,): (String,) =
        sqlx::query_as("SELECT idempotency_key FROM enrich_state WHERE pipeline = $1 AND result IS NOT NULL")
            .bind(&env.settings.pipeline.name)
            .fetch_one(&env.pool)
            .await?;
    let anonymous = login(&base, "").await?;
    let q: String = key
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let page = get(&base, &format!("/ui/event?key={q}"), Some(&anonymous)).await?.text().await?;
    let shown = page.contains("data-result>");
    println!("the event's page for a session without a token: result shown = {shown}");
    assert!(!shown && page.contains("data-result-withheld"), "the result is withheld");

    for s in stages {
        s.stop().await?;
    }
    env.teardown().await;
    Ok(())
}
