//! The operator's console in a real browser: the stages run against the real broker and
//! PostgreSQL, 200 tickets (5 of them poison) and one record that is no ticket go through, and a Playwright script
//! (tests/console/console.js: playwright-core driving Debian's Chromium headless) logs
//! in, pauses and resumes enrichment, discards one dead letter, dry-runs and replays the
//! others, finds one event by key, source coordinates and trace id and reads its
//! history, and checks that nothing works without a session. Every page it shows is
//! audited with axe-core (no serious or critical WCAG A/AA violation, no page wider than
//! a 1366 × 768 laptop screen), and a keyboard-only pass logs in, reaches the kill switch
//! and submits the dead-letter filter with visible focus all the way. Each outcome is also
//! checked from outside the console: the enricher's metrics and llm-sim's counters for the
//! pause, the output topic for the replay. Screenshots of every page go to docs/console/.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_e2e::loadgen::kafka_io::produce_all;
use enrich_e2e::loadgen::workload::{Kind, Record, marked_tickets};
use enrich_e2e::{StageKind, TestEnv, output_counts, scrape_metrics, wait_for};
use std::path::{Path, PathBuf};
use std::time::Duration;

const N: usize = 200;
const POISON: [usize; 5] = [7, 50, 99, 120, 181];
const DEADLINE: Duration = Duration::from_secs(180);
const ADMIN_TOKEN: &str = "console-admin-token-0123456789";
const READ_TOKEN: &str = "console-read-token-0123456789";

fn here() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One phase of the browser script, to its end; its output is printed, and its exit status
/// must be success.
async fn browser(phase: &str, base: &str, state: &Path, extra: &[(&str, String)]) -> anyhow::Result<String> {
    let script = here().join("console/console.js");
    anyhow::ensure!(
        here().join("console/node_modules/playwright-core/package.json").exists(),
        "playwright-core is not installed in tests/console: run `make deps` (deploy/local/deps.sh)"
    );
    anyhow::ensure!(Path::new("/usr/bin/chromium").exists(), "/usr/bin/chromium is missing: run `make deps`");
    let mut command = std::process::Command::new("node");
    command
        .arg(&script)
        .arg(phase)
        .env("CONSOLE_URL", base)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("READ_TOKEN", READ_TOKEN)
        .env("STATE_FILE", state)
        .env("SHOTS", here().join("../docs/console"))
        .stdin(std::process::Stdio::null());
    for (k, v) in extra {
        command.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || command.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- browser {phase}\n{stdout}{stderr}");
    anyhow::ensure!(out.status.success(), "the browser's phase {phase} failed ({}): {stdout}{stderr}", out.status);
    anyhow::ensure!(stdout.contains(&format!("ok {phase}")), "the phase {phase} did not finish: {stdout}");
    Ok(stdout)
}

fn metric(samples: &std::collections::HashMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_pauses_replays_and_tells_an_event_s_story() -> anyhow::Result<()> {
    let ports: Vec<u16> = (0..4).map(|_| enrich_e2e::free_port()).collect::<Result<_, _>>()?;
    let (admin, ingest, enricher, publisher) = (ports[0], ports[1], ports[2], ports[3]);
    let overrides = [
        ("ENRICH_DLQ_REPLAYER__HTTP_PORT", admin.to_string()),
        ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("ENRICH_DLQ_REPLAYER__READ_TOKEN", READ_TOKEN.to_string()),
        ("ENRICH_DLQ_REPLAYER__MAX_REPLAYS_PER_KEY", "1".to_string()),
        // The console finds the stages through their ports in the settings.
        ("ENRICH_INGEST__HTTP_PORT", ingest.to_string()),
        ("ENRICH_ENRICHER__HTTP_PORT", enricher.to_string()),
        ("ENRICH_PUBLISHER__HTTP_PORT", publisher.to_string()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "4".to_string()),
        ("ENRICH_LLM__MAX_ATTEMPTS", "2".to_string()),
        ("ENRICH_UI__SAMPLE_INTERVAL_MS", "500".to_string()),
        // Prices, for the spend page and the dry run's estimate.
        ("ENRICH_LLM__INPUT_USD_PER_MTOK", "0.15".to_string()),
        ("ENRICH_LLM__OUTPUT_USD_PER_MTOK", "0.60".to_string()),
        // A budget far above the run's spend: the overview shows its window.
        ("ENRICH_LLM__BUDGETS", "[{usd = 5.0, window_secs = 86400}]".to_string()),
        ("ENRICH_UI__TRACE_URL_TEMPLATE", "http://127.0.0.1:16686/trace/{trace_id}".to_string()),
    ];
    // 200 calls of 150 ms, 4 at a time: a run of several seconds, long enough to pause in.
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::from_millis(150)), &overrides).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let poison: Vec<(usize, &str)> = POISON.iter().map(|&i| (i, "always-500")).collect();
    let mut records = marked_tickets(&env.id, N, &poison);
    // And one record that is no ticket at all: ingest dead-letters it, the operator discards it.
    records.push(Record {
        kind: Kind::Malformed { reason: "invalid_json" },
        key: Some(b"bad-console".to_vec()),
        value: Some(b"{\"id\": \"bad-console\", oops".to_vec()),
        ticket: None,
    });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    // llm-sim holds its answers while the browser logs in, so the run cannot end before
    // the pause however slow the browser starts (a held call stays well within
    // llm.request_timeout_ms).
    env.sim.hold(true);
    let stages =
        [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher, StageKind::DlqReplayer].map(|k| env.spawn(k));
    let base = format!("http://127.0.0.1:{admin}");
    wait_for("the console", DEADLINE, || async {
        Ok(reqwest::get(format!("{base}/ui/login")).await.ok().filter(|r| r.status().is_success()).map(|_| ()))
    })
    .await?;
    let dir = std::env::temp_dir().join(format!("console-test-{}", env.id));
    std::fs::create_dir_all(&dir)?;
    let state: PathBuf = dir.join("state.json");
    let mut timings = Vec::new();
    let mut audits = Vec::new();
    let mut keep = |out: String| {
        timings.extend(out.lines().filter(|l| l.starts_with("timing ")).map(str::to_string));
        audits.extend(out.lines().filter(|l| l.starts_with("a11y ") || l.starts_with("keyboard ")).map(str::to_string));
    };

    // Log in; the three stages ready.
    keep(browser("login", &base, &state, &[]).await?);

    // Pause mid-run: some calls answered, the next ones held in flight while the browser
    // pauses; once the enricher says it is paused they are answered, and no new call starts.
    env.sim.hold(false);
    wait_for("enrichment under way", DEADLINE, || async { Ok((env.sim.completions() >= 10).then_some(())) }).await?;
    env.sim.hold(true);
    keep(browser("pause", &base, &state, &[]).await?);
    wait_for("the enricher to say it is paused", DEADLINE, || async {
        Ok((metric(&scrape_metrics(enricher).await?, "enrich_paused") == 1.0).then_some(()))
    })
    .await?;
    env.sim.hold(false);
    wait_for("the calls in flight to finish", DEADLINE, || async {
        Ok((metric(&scrape_metrics(enricher).await?, "enrich_in_flight") == 0.0).then_some(()))
    })
    .await?;
    let calls_at_pause = env.sim.requests().len();
    let before = enrich_e2e::loadgen::accounting::account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
    assert!(before.published < (N - POISON.len()) as i64, "work is left while paused ({before:?})");
    // An observation window: two seconds in which 4 slots of 150 ms calls would make ~50 calls.
    let window = tokio::time::Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        assert_eq!(env.sim.requests().len(), calls_at_pause, "no new LLM call starts while paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Resume: the run finishes.
    keep(browser("resume", &base, &state, &[]).await?);
    let acct = env.wait_accounted(&produced, DEADLINE).await?;
    assert_eq!(
        (acct.published, acct.dead_lettered_at_enricher, acct.dead_lettered_at_ingest),
        ((N - POISON.len()) as i64, POISON.len() as i64, 1)
    );
    let m = scrape_metrics(enricher).await?;
    assert_eq!(metric(&m, "enrich_paused"), 0.0, "the enricher runs again");

    // The overview's counts of the run.
    let counts = [
        ("EXPECT_IN", (N + 1).to_string()),
        ("EXPECT_PUBLISHED", (N - POISON.len()).to_string()),
        ("EXPECT_DEAD", POISON.len().to_string()),
        ("EXPECT_WAITING", (POISON.len() + 1).to_string()),
    ];
    keep(browser("counts", &base, &state, &counts).await?);
    // The same overview with the keyboard only, and on to the dead letters' filter.
    keep(browser("keyboard", &base, &state, &[]).await?);

    // The cause fixed, the five dead letters: listed, dry run, replayed once.
    env.sim.set_faults(llm_sim::Faults { markers: false, ..Default::default() });
    keep(browser("dead-letters", &base, &state, &counts).await?);
    let key = |i: usize| format!("{pipeline}:{}-{i:06}", env.id);
    let poison_keys: Vec<String> = POISON.iter().map(|&i| key(i)).collect();
    let outputs = wait_for("every key published, the replayed ones included", DEADLINE, || async {
        let c = output_counts(&env)?;
        Ok((c.len() == N).then_some(c))
    })
    .await?;
    for k in &poison_keys {
        assert_eq!(outputs.get(k), Some(&1), "{k} published once after its replay");
    }
    assert!(outputs.values().all(|&n| n == 1), "every key published once");
    let (replayed,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'replayed'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(replayed, POISON.len() as i64);
    let discarded: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT d.stage, l.note FROM dead_letters d JOIN replay_log l ON l.dead_letter_id = d.id AND l.outcome = 'discarded'
         WHERE d.pipeline = $1 AND d.status = 'discarded'",
    )
    .bind(&pipeline)
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(discarded, vec![("ingest-dedup".to_string(), Some("console test: not a ticket".to_string()))]);
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    wait_for("the publisher to catch up", DEADLINE, || async {
        Ok(enrich_e2e::loadgen::kafka_io::group_caught_up(&env.settings, &group, &env.settings.topics.results)?
            .then_some(()))
    })
    .await?;

    // One event's story, and spend.
    let event = [("POISON_KEY", poison_keys[0].clone()), ("PLAIN_KEY", key(3)), ("EXPECT_IN", N.to_string())];
    keep(browser("event", &base, &state, &event).await?);
    // Every page once more for the accessibility audit, the read token's overview included.
    keep(browser("audit", &base, &state, &[]).await?);

    // Nothing without a session; no action without the admin token and the form token.
    keep(browser("anonymous", &base, &state, &[]).await?);
    let control = dlq_replayer::replay::control(&env.pool, &pipeline).await?;
    assert!(!control.paused, "the refused actions changed nothing: {control:?}");
    let m = scrape_metrics(enricher).await?;
    assert_eq!(metric(&m, "enrich_paused"), 0.0);

    for s in stages {
        s.stop().await?;
    }
    let output = output_counts(&env)?;
    assert_eq!(output.len(), N);
    assert!(output.values().all(|&n| n == 1), "still once each after the stages stopped");
    println!("page timings (ms, request start to last byte):\n{}", timings.join("\n"));
    println!("accessibility:\n{}", audits.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
    Ok(())
}
