//! The key state machine against the real database: the trigger refuses every
//! transition `State::may_become` does not have (whatever code path writes it), and the
//! transitions made under a lease change nothing once the lease is another replica's.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::key_state::{State, TRANSITION_CHECK, lease};
use enrich_e2e::TestEnv;
use std::time::Duration;

async fn insert(env: &TestEnv, key: &str, state: State, owner: Option<&str>, attempts: i32) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO enrich_state (pipeline, idempotency_key, state, attempts, lease_owner, lease_until,
                                   source_topic, source_partition, source_offset, result, result_hash)
         VALUES ($1, $2, $3, $4, $5, CASE WHEN $5 IS NULL THEN NULL ELSE now() + interval '1 hour' END,
                 't', 0, 0, '{\"a\":1}', 'h1')",
    )
    .bind(&env.settings.pipeline.name)
    .bind(key)
    .bind(state.as_str())
    .bind(attempts)
    .bind(owner)
    .execute(&env.pool)
    .await?;
    Ok(())
}

async fn row(env: &TestEnv, key: &str) -> anyhow::Result<(String, Option<String>, i32, Option<String>)> {
    Ok(sqlx::query_as(
        "SELECT state, lease_owner, attempts, result_hash FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
    )
    .bind(&env.settings.pipeline.name)
    .bind(key)
    .fetch_one(&env.pool)
    .await?)
}

/// A write that fails for the transition check, or anything else.
fn refused_by_the_check(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> Option<bool> {
    match result {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => {
            Some(e.constraint() == Some(TRANSITION_CHECK) && e.code().as_deref() == Some("23514"))
        }
        Err(_) => Some(false),
    }
}

#[tokio::test]
async fn the_database_refuses_every_transition_the_state_machine_lacks() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let mut wrong = Vec::new();
    for from in State::ALL {
        for to in State::ALL {
            let key = format!("k-{from}-{to}");
            insert(&env, &key, from, None, 1).await?;
            let result = sqlx::query("UPDATE enrich_state SET state = $3 WHERE pipeline = $1 AND idempotency_key = $2")
                .bind(&env.settings.pipeline.name)
                .bind(&key)
                .bind(to.as_str())
                .execute(&env.pool)
                .await;
            let (state, ..) = row(&env, &key).await?;
            match (from.may_become(to), refused_by_the_check(result)) {
                (true, None) if state == to.as_str() => {}
                (false, Some(true)) if state == from.as_str() => {}
                (allowed, refused) => {
                    wrong.push(format!("{from} -> {to}: allowed {allowed}, refused {refused:?}, now {state}"))
                }
            }
        }
    }
    assert!(wrong.is_empty(), "the trigger and State::may_become disagree:\n{}", wrong.join("\n"));

    // An ended key's stored result (its value, hash, model, prompt version) is never
    // replaced, even in the same state.
    let changes = [
        "result = '{\"a\":2}', result_hash = 'h2'",
        "result = '{\"a\":2}'",
        "result_hash = 'h2'",
        "model = 'other'",
        "prompt_version = 'v9'",
    ];
    for state in [State::Enriched, State::Published] {
        for (i, change) in changes.iter().enumerate() {
            let key = format!("stored-{state}-{i}");
            insert(&env, &key, state, None, 1).await?;
            let result = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE enrich_state SET {change} WHERE pipeline = $1 AND idempotency_key = $2"
            )))
            .bind(&env.settings.pipeline.name)
            .bind(&key)
            .execute(&env.pool)
            .await;
            assert_eq!(refused_by_the_check(result), Some(true), "{state}: {change} went through");
            let (result,): (String,) =
                sqlx::query_as("SELECT result::text FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2")
                    .bind(&env.settings.pipeline.name)
                    .bind(&key)
                    .fetch_one(&env.pool)
                    .await?;
            assert_eq!((row(&env, &key).await?.3.as_deref(), result.as_str()), (Some("h1"), r#"{"a": 1}"#));
        }
    }
    // A key bound to a results record is settled only to the outcome it was bound for: a
    // late dead-lettering of its result (another replica's emit refused as too large) is
    // refused, so it is never published *and* dead-lettered.
    insert(&env, "bound", State::Enriched, None, 1).await?;
    sqlx::query(
        "UPDATE enrich_state SET publish_partition = 0, publish_offset = 7, publish_outcome = 'published'
          WHERE pipeline = $1 AND idempotency_key = 'bound'",
    )
    .bind(&env.settings.pipeline.name)
    .execute(&env.pool)
    .await?;
    let result = sqlx::query(
        "UPDATE enrich_state SET state = 'dead_lettered' WHERE pipeline = $1 AND idempotency_key = 'bound'",
    )
    .bind(&env.settings.pipeline.name)
    .execute(&env.pool)
    .await;
    assert_eq!(refused_by_the_check(result), Some(true), "a bound key was dead-lettered under its binding");
    let who =
        lease::Owner { pipeline: &env.settings.pipeline.name, owner: "replica-a", lease: Duration::from_secs(60) };
    let dead = enrich_common::Envelope {
        pipeline: env.settings.pipeline.name.clone(),
        idempotency_key: "bound".into(),
        ..Default::default()
    };
    let trace = enrich_common::TraceContext::new_root();
    assert_eq!(
        lease::claim_stored_dead_letter(&env.pool, who, &dead, &trace).await?,
        None,
        "the claim leaves a bound key"
    );
    assert_eq!(row(&env, "bound").await?.0, "enriched");
    env.teardown().await;
    Ok(())
}

#[tokio::test]
async fn a_lease_taken_over_fences_the_old_owners_transitions() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let old = lease::Owner { pipeline: &pipeline, owner: "replica-a", lease: Duration::from_secs(60) };
    let new = lease::Owner { owner: "replica-b", ..old };
    // replica-a counted attempt 1; its lease expired and replica-b took the key over
    // (attempt 2) and is calling now.
    insert(&env, "k", State::Enriching, Some("replica-b"), 2).await?;
    let stale = lease::Token { key: "k", attempt: 1 };

    assert!(!lease::schedule_retry(&env.pool, old, stale).await?, "a stale owner scheduled a retry");
    assert!(!lease::release(&env.pool, old, stale, true).await?, "a stale owner gave a lease back");
    // The same owner with a stale attempt (an earlier incarnation of this replica) is fenced too.
    let stale_b = lease::Token { key: "k", attempt: 1 };
    assert!(!lease::schedule_retry(&env.pool, new, stale_b).await?);
    assert_eq!(row(&env, "k").await?, ("enriching".into(), Some("replica-b".into()), 2, Some("h1".into())));

    // The gate of the stale attempt finds the key lost; the live one's finds it ours.
    let call = Duration::from_secs(5);
    let (paused, ours) = lease::gate(&env.pool, old, call, &["k"], &[1]).await?;
    assert!(!paused && ours.is_empty(), "the stale attempt passed its gate");
    let (_, ours) = lease::gate(&env.pool, new, call, &["k"], &[2]).await?;
    assert!(ours.contains("k"));

    // The live owner's transitions go through.
    let live = lease::Token { key: "k", attempt: 2 };
    assert!(lease::schedule_retry(&env.pool, new, live).await?);
    assert_eq!(row(&env, "k").await?, ("retry_scheduled".into(), None, 2, Some("h1".into())));

    // A dead-letter claim over another replica's expired lease keeps that row's attempt
    // count, and says so: the claim's renewals must name it to keep the lease.
    insert(&env, "d", State::Enriching, Some("replica-b"), 3).await?;
    sqlx::query("UPDATE enrich_state SET lease_until = now() - interval '1 second' WHERE pipeline = $1 AND idempotency_key = 'd'")
        .bind(&pipeline)
        .execute(&env.pool)
        .await?;
    let dead =
        enrich_common::Envelope { pipeline: pipeline.clone(), idempotency_key: "d".into(), ..Default::default() };
    let claimed = lease::claim_dead_letter(&env.pool, old, &dead, &enrich_common::TraceContext::new_root()).await?;
    let (_, attempts) = claimed.expect("the expired lease is taken");
    assert_eq!(attempts, 3);
    assert_eq!(lease::renew(&env.pool, old, &["d".to_string()], &[attempts]).await?, 1, "the claim's lease is renewed");
    env.teardown().await;
    Ok(())
}

/// Ingest forwards two records while another session holds the first key's row locked
/// (as the enricher's lease statement does when the request reached it before ingest
/// marked the key `requested`). Ingest must finish its batch without waiting for the
/// lock: the mark skips the locked row (its holder moves the key on from `received`).
/// Before, the mark waited for every such lock, and each ingest batch queued behind
/// the enricher's statements on the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_finishes_its_batch_while_the_enricher_holds_a_key_s_row() -> anyhow::Result<()> {
    use enrich_e2e::loadgen::kafka_io::produce_all;
    use enrich_e2e::loadgen::workload;
    use enrich_e2e::{StageKind, wait_for};

    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    let records = workload::marked_tickets(&env.id, 2, &[]);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let key = |i: usize| format!("{pipeline}:{}", records[i].ticket.as_ref().unwrap().id);
    // The first key's row as ingest's claim leaves it (received, owned by its record)...
    sqlx::query(
        "INSERT INTO enrich_state (pipeline, idempotency_key, state, source_topic, source_partition, source_offset)
         VALUES ($1, $2, 'received', $3, $4, $5)",
    )
    .bind(&pipeline)
    .bind(key(0))
    .bind(env.source_topic())
    .bind(produced[0].partition)
    .bind(produced[0].offset)
    .execute(&env.pool)
    .await?;
    // ...locked by a session whose transaction stays open.
    let mut holder = env.pool.begin().await?;
    sqlx::query("SELECT 1 FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2 FOR UPDATE")
        .bind(&pipeline)
        .bind(key(0))
        .execute(&mut *holder)
        .await?;

    let ingest = env.spawn(StageKind::Ingest);
    wait_for("ingest to record both records as forwarded while the row is locked", Duration::from_secs(60), || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM run_history WHERE pipeline = $1 AND stage = 'ingest-dedup' AND status = 'forwarded'",
        )
        .bind(&pipeline)
        .fetch_one(&env.pool)
        .await?;
        Ok((n == 2).then_some(()))
    })
    .await?;
    assert_eq!(row(&env, &key(1)).await?.0, "requested", "the key nobody holds is marked requested");
    assert_eq!(row(&env, &key(0)).await?.0, "received", "the locked key is left to its holder");
    holder.rollback().await?;
    ingest.stop().await?;
    env.teardown().await;
    Ok(())
}

/// Keys settled by a publisher of an earlier release keep their binding (settled before
/// the upgrade, or during a rolling one): the next look for unsettled
/// bindings (on a partition's assignment) clears it, so the partial index of bindings
/// waiting to be settled does not keep every key such a publisher settled. A bound key
/// still `enriched` keeps its binding and is listed.
#[tokio::test]
async fn a_binding_an_earlier_publisher_kept_on_a_settled_key_is_cleared() -> anyhow::Result<()> {
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::ZERO), &[]).await?;
    let pipeline = &env.settings.pipeline.name;
    for (key, state) in
        [("old-settled", State::Published), ("old-dead", State::DeadLettered), ("waiting", State::Enriched)]
    {
        insert(&env, key, state, None, 1).await?;
        sqlx::query(
            "UPDATE enrich_state SET publish_partition = 1, publish_offset = 40, publish_outcome = $3
              WHERE pipeline = $1 AND idempotency_key = $2",
        )
        .bind(pipeline)
        .bind(key)
        .bind(if state == State::DeadLettered { "dead_lettered" } else { "published" })
        .execute(&env.pool)
        .await?;
    }
    let (bound, _) = enrich_common::key_state::publish::unsettled(&env.pool, pipeline).await?;
    assert_eq!(bound.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(), ["waiting"]);
    let left: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT idempotency_key, publish_outcome FROM enrich_state
          WHERE pipeline = $1 AND publish_offset IS NOT NULL ORDER BY idempotency_key",
    )
    .bind(pipeline)
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(left, [("waiting".to_string(), Some("published".to_string()))], "bindings left after the look");
    env.teardown().await;
    Ok(())
}

/// A publisher frozen past its session (a zombie) wakes up holding a record of a
/// partition that a new owner has taken, read past and committed: it binds nothing of it.
/// Bound, the key would be taken by the new owner's reconciliation (a binding behind the
/// group's committed offset) for one published by a committed transaction, and marked
/// `published` with no output (the record the new owner read was refused, the key being
/// bound to the zombie's). The new owner binds the same key under its own epoch, and a
/// new owner taking a partition waits for a bind in flight under the old epoch.
#[tokio::test]
async fn a_publisher_whose_partition_was_taken_binds_none_of_its_records() -> anyhow::Result<()> {
    use enrich_common::key_state::publish::{self, Claim, Outcome};
    let env = TestEnv::new(llm_sim::Latency::Fixed(Duration::ZERO), &[]).await?;
    let pipeline = env.settings.pipeline.name.clone();
    insert(&env, "k", State::Enriched, None, 1).await?;
    let claim = |offset: i64, epoch: i64| Claim {
        key: "k",
        partition: 3,
        offset,
        outcome: Outcome::Published,
        trace_id: "00".repeat(16),
        epoch,
    };
    let zombie = publish::take_partitions(&env.pool, &pipeline, "zombie", &[3]).await?[&3];
    // A bind in flight under the zombie's epoch holds the new owner's take until it ends.
    let mut tx = env.pool.begin().await?;
    let held = publish::bind(&mut tx, &pipeline, &[claim(10, zombie)]).await?;
    assert_eq!(held.bound.len(), 1, "the zombie still owned the partition when it bound");
    let taking = {
        let (pool, pipeline) = (env.pool.clone(), pipeline.clone());
        tokio::spawn(async move { publish::take_partitions(&pool, &pipeline, "new-owner", &[3]).await })
    };
    enrich_e2e::wait_for("the new owner's take waiting for the bind", Duration::from_secs(60), || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%INTO publish_partitions%'",
        )
        .fetch_one(&env.pool)
        .await?;
        Ok((n > 0).then_some(()))
    })
    .await?;
    assert!(!taking.is_finished(), "the take waits for the bind's transaction");
    tx.rollback().await?; // the zombie's round failed (its transaction never committed)
    let new_owner = taking.await??[&3];
    assert!(new_owner > zombie);

    // The zombie wakes with the record and binds again under its old epoch: refused.
    let mut tx = env.pool.begin().await?;
    let bound = publish::bind(&mut tx, &pipeline, &[claim(10, zombie)]).await?;
    tx.commit().await?;
    println!("the zombie's bind after the new owner took the partition: {} bound", bound.bound.len());
    assert!(bound.bound.is_empty(), "a zombie bound a record of a partition it lost");
    assert_eq!(bound.unheld, [3], "and it is told the partition is no longer its own");
    let (offset,): (Option<i64>,) =
        sqlx::query_as("SELECT publish_offset FROM enrich_state WHERE pipeline = $1 AND idempotency_key = 'k'")
            .bind(&pipeline)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(offset, None, "the key is bound to nothing");
    let mut tx = env.pool.begin().await?;
    let bound = publish::bind(&mut tx, &pipeline, &[claim(12, new_owner)]).await?;
    tx.commit().await?;
    assert_eq!(
        bound.bound.keys().map(|b| (b.partition, b.offset)).collect::<Vec<_>>(),
        [(3, 12)],
        "the new owner binds it"
    );
    assert!(bound.unheld.is_empty());
    env.teardown().await;
    Ok(())
}
