//! Failure semantics on the real stack: an LLM outage pauses enrichment instead of
//! dead-lettering healthy events, and everything completes once the endpoint is back.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_e2e::loadgen::accounting::account;
use enrich_e2e::loadgen::kafka_io::{produce_all, read_to_end};
use enrich_e2e::loadgen::workload::{self, Spec};
use enrich_e2e::{StageKind, TestEnv, count_in_states, wait_for};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_llm_outage_opens_the_breaker_and_dead_letters_nothing() -> anyhow::Result<()> {
    const N: usize = 60;
    let overrides = [
        ("ENRICH_LLM__MAX_ATTEMPTS", "3".to_string()),
        ("ENRICH_LLM__BREAKER_FAILURES", "5".to_string()),
        ("ENRICH_LLM__BREAKER_OPEN_MS", "300".to_string()),
        ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "4".to_string()),
    ];
    let env = TestEnv::new(llm_sim::Latency::default(), &overrides).await?;
    env.sim.set_outage(Some(503));
    let records = workload::build(&Spec { run: env.id.clone(), unique: N, duplicates: 0, malformed: 0 });
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let stages = [StageKind::Ingest, StageKind::Enricher, StageKind::Publisher].map(|k| env.spawn(k));

    // Without a breaker, 60 records × 3 attempts would all be dead-lettered here.
    wait_for("the breaker to open and probe", DEADLINE, || async { Ok((env.sim.failed() >= 12).then_some(())) })
        .await?;
    let failed_during_outage = env.sim.failed();
    assert_eq!(count_in_states(&env, &["dead_lettered"]).await?, 0, "nothing dead-lettered during the outage");
    assert_eq!(count_in_states(&env, &["enriched", "published"]).await?, 0);
    let (max_attempts,): (i32,) =
        sqlx::query_as("SELECT COALESCE(max(attempts), 0) FROM enrich_state WHERE pipeline = $1")
            .bind(&env.settings.pipeline.name)
            .fetch_one(&env.pool)
            .await?;
    assert!(max_attempts <= 3, "failed calls during an outage do not use up attempts ({max_attempts})");
    assert!(
        failed_during_outage < N as u64,
        "calls paused while the breaker was open ({failed_during_outage} failed calls for {N} records)"
    );

    env.sim.set_outage(None);
    let pipeline = env.settings.pipeline.name.clone();
    wait_for("every record to be published after the outage", DEADLINE, || async {
        let a = account(&env.pool, &pipeline, env.source_topic(), &produced).await?;
        Ok(a.complete(N).then_some(a))
    })
    .await?;
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
