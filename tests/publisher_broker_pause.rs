//! The broker stopped (SIGSTOP) right before the publisher's commit, for longer than the
//! transaction timeout: the commit call times out while the broker is away. The
//! publisher must go on once the broker is back, say why it is not ready meanwhile, and
//! publish every key once. In a binary of its own: the pause stops the broker every
//! test of the binary shares.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_e2e::loadgen::kafka_io::{group_caught_up, produce_all, read_to_end};
use enrich_e2e::loadgen::workload;
use enrich_e2e::{StageKind, TestEnv, wait_for};
use publisher::failpoints::{self, Instant};
use rdkafka::consumer::Consumer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(240);
/// Longer than the transaction timeout the test sets (5 s), so the commit call times out.
const PAUSE: Duration = Duration::from_secs(12);

/// The broker's process group (the local stack starts it in a session of its own).
struct Broker(u32);

impl Broker {
    fn of_local_stack() -> anyhow::Result<Self> {
        let pidfile = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack/kafka/kafka.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .map_err(|e| anyhow::anyhow!("{}: {e} (the test needs the local stack's broker)", pidfile.display()))?;
        Ok(Self(pid.trim().parse()?))
    }

    fn signal(&self, sig: &str) {
        let status =
            std::process::Command::new("kill").arg(format!("-{sig}")).arg("--").arg(format!("-{}", self.0)).status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "kill -{sig} of the broker's group");
    }
}

impl Drop for Broker {
    /// Whatever happens to the test, the broker runs again.
    fn drop(&mut self) {
        self.signal("CONT");
    }
}

/// Waits until the broker leads every partition again with no error (after a pause its
/// controller may fence it for a moment): the tests that run next need it whole.
async fn wait_broker_whole(env: &TestEnv) -> anyhow::Result<()> {
    let consumer: rdkafka::consumer::BaseConsumer = enrich_common::kafka::base_config(&env.settings).create()?;
    wait_for("the broker to lead every partition", DEADLINE, || async {
        let whole =
            tokio::task::block_in_place(|| consumer.fetch_metadata(None, Duration::from_secs(5))).ok().filter(|m| {
                m.topics().iter().all(|t| {
                    t.error().is_none() && t.partitions().iter().all(|p| p.error().is_none() && p.leader() >= 0)
                })
            });
        Ok(whole.map(|_| ()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_outlived_by_a_broker_pause_resumes_and_publishes_each_key_once() -> anyhow::Result<()> {
    const N: usize = 60;
    let port = enrich_e2e::free_port()?;
    let overrides = [
        ("ENRICH_PUBLISHER__TRANSACTION_TIMEOUT_MS", "5000".to_string()),
        ("ENRICH_PUBLISHER__HTTP_PORT", port.to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    wait_broker_whole(&env).await?;
    let broker = Arc::new(Broker::of_local_stack()?);
    let paused = Arc::new(AtomicBool::new(false));
    {
        let (broker, paused) = (broker.clone(), paused.clone());
        failpoints::set(
            &env.settings.pipeline.name,
            Instant::BeforeKafkaCommit,
            Arc::new(move || {
                let (broker, paused) = (broker.clone(), paused.clone());
                Box::pin(async move {
                    if paused.swap(true, Ordering::SeqCst) {
                        return;
                    }
                    broker.signal("STOP");
                    // The fault's length, not a synchronisation: the broker comes back
                    // on its own while the publisher is inside its commit.
                    std::thread::spawn(move || {
                        std::thread::sleep(PAUSE);
                        broker.signal("CONT");
                    });
                })
            }),
        );
    }
    // What /readyz answered while it was not ready.
    let not_ready = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let not_ready = not_ready.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/readyz")).send().await
                    && r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                {
                    let body = r.text().await.unwrap_or_default();
                    not_ready.lock().unwrap().push(body);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Every result on `enrich.results` first, then ingest and the enricher stopped: the
    // pause is aimed at the publisher alone.
    let records = workload::marked_tickets(&env.id, N, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher].map(|k| env.spawn(k));
    let results_topic = env.settings.topics.results.clone();
    wait_for("every result on the results topic", DEADLINE, || async {
        let results =
            tokio::task::block_in_place(|| read_to_end(&env.settings, &results_topic, Duration::from_secs(30)));
        Ok(results.ok().filter(|r| r.len() >= N).map(|_| ()))
    })
    .await?;
    for s in stages {
        s.stop().await?;
    }
    // The test is the publisher's supervisor: a publisher that stops on a fatal error is
    // started again, as systemd or Kubernetes would.
    let publisher = tokio::sync::Mutex::new(Some(env.spawn(StageKind::Publisher)));
    let exits = Mutex::new(Vec::<String>::new());
    let group = env.settings.group_id(enrich_common::config::Stage::Publisher);
    let results = env.settings.topics.results.clone();
    let waited = wait_for("every key published, the publisher caught up", DEADLINE, || async {
        let mut running = publisher.lock().await;
        if running.as_ref().is_some_and(|p| p.has_exited()) {
            let ended = running.take().expect("running").stop().await;
            exits.lock().unwrap().push(ended.err().map(|e| format!("{e:#}")).unwrap_or_default());
            *running = Some(env.spawn(StageKind::Publisher));
        }
        let published = enrich_e2e::count_in_states(&env, &["published"]).await.unwrap_or(0);
        let caught_up = group_caught_up(&env.settings, &group, &results).unwrap_or(false);
        Ok((published == N as i64 && caught_up).then_some(()))
    })
    .await;
    if let Err(e) = waited {
        let states = enrich_e2e::count_in_states(&env, &["enriched"]).await.unwrap_or(-1);
        let published = enrich_e2e::count_in_states(&env, &["published"]).await.unwrap_or(-1);
        anyhow::bail!(
            "{e:#}: {published} published, {states} enriched; publisher restarts {:?}; /readyz said {:?}",
            exits.lock().unwrap(),
            not_ready.lock().unwrap().last()
        );
    }
    env.wait_accounted(&produced, DEADLINE).await?;
    watcher.abort();
    wait_broker_whole(&env).await?;

    assert!(paused.load(Ordering::SeqCst), "the broker was stopped inside a commit");
    let counts = enrich_e2e::output_counts(&env)?;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{} keys published more than once, e.g. {:?}", twice.len(), twice.first());
    assert_eq!(counts.len(), N, "every ticket published");
    let said = not_ready.lock().unwrap().clone();
    let why: Vec<&String> = said.iter().filter(|b| b.contains("commit")).take(1).collect();
    eprintln!("publisher restarts: {:?}; /readyz meanwhile: {why:?}", exits.lock().unwrap());
    assert!(
        said.iter().any(|body| body.contains("commit")),
        "/readyz said the commit had not completed; it said {said:?}"
    );
    if let Some(p) = publisher.lock().await.take() {
        p.stop().await?;
    }
    env.teardown().await;
    Ok(())
}
