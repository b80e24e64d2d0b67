//! The console's protections over real HTTP, against the real dlq-replayer (the broker and
//! PostgreSQL of the stack): without a session no route answers anything but the login,
//! malformed paths and queries included, and every answer carries the security headers.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_e2e::{StageKind, TestEnv, wait_for};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, X_FRAME_OPTIONS};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);
const ADMIN: &str = "console-admin-token-0123456789";
const READ: &str = "console-read-token-0123456789";

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}


async fn get(base: &str, path: &str, cookie: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut request = client().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        request = request.header(COOKIE, c);
    }
    Ok(request.send().await?)
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
