//! PostgreSQL over TLS against the local server (its TLS set up by
//! `deploy/local/stack.sh pg-tls`): the stages connect with `sslmode=verify-full` and a CA
//! file, and every session they open is encrypted; a CA that did not sign the server's
//! certificate stops a stage at start with the reason, and the password stays unprinted.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a failed expectation is the test failing

use enrich_common::config::Secret;
use enrich_e2e::loadgen::kafka_io::produce_all;
use enrich_e2e::loadgen::workload::{self, Spec};
use enrich_e2e::{RunningStage, StageKind, TestEnv, postgres_tls_ca, wait_for, with_query};
use std::time::Duration;

const STAGES: [(StageKind, &str); 3] =
    [(StageKind::Ingest, "ingest-dedup"), (StageKind::Enricher, "enricher"), (StageKind::Publisher, "publisher")];

/// The stages' sessions on the test's database as (application_name, encrypted).
async fn stage_sessions(env: &TestEnv) -> anyhow::Result<Vec<(String, bool)>> {
    let names: Vec<String> = STAGES.iter().map(|(_, n)| n.to_string()).collect();
    Ok(sqlx::query_as(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = current_database() AND a.application_name = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&env.pool)
    .await?)
}

/// Waits until every stage has a session open; a stage that stops instead fails the wait
/// with the error it stopped on.
async fn wait_connected(env: &TestEnv, stages: &mut Vec<RunningStage>) -> anyhow::Result<()> {
    let waited = wait_for("every stage to connect to PostgreSQL", Duration::from_secs(60), || async {
        if stages.iter().any(RunningStage::has_exited) {
            anyhow::bail!("a stage stopped");
        }
        let sessions = stage_sessions(env).await?;
        Ok(STAGES.iter().all(|(_, name)| sessions.iter().any(|(n, _)| n == name)).then_some(()))
    })
    .await;
    if let Err(e) = waited {
        let mut causes = vec![format!("{e:#}")];
        for stage in std::mem::take(stages) {
            if stage.has_exited() {
                let kind = stage.kind;
                causes
                    .push(format!("{kind:?}: {:#}", stage.stop().await.err().unwrap_or_else(|| anyhow::anyhow!("ok"))));
            }
        }
        anyhow::bail!("{}", causes.join("; "));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_connect_with_verify_full_and_every_session_is_encrypted() -> anyhow::Result<()> {
    let ca = postgres_tls_ca()?;
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;
    let ca_path = ca.to_str().expect("a UTF-8 path");
    let tls_url =
        with_query(env.settings.database.url.expose(), &[("sslmode", "verify-full"), ("sslrootcert", ca_path)])?;

    let mut stages: Vec<RunningStage> = STAGES
        .iter()
        .map(|(kind, _)| env.spawn_with(*kind, |s| s.database.url = Secret::new(tls_url.clone())))
        .collect();
    wait_connected(&env, &mut stages).await?;

    // The pipeline works over it: every ticket is enriched and published.
    let spec = Spec { run: env.id.clone(), unique: 20, duplicates: 0, malformed: 0 };
    let records = workload::build(&spec);
    let produced = produce_all(&env.settings, env.source_topic(), &records, |_| false, |_| {}).await?;
    let acct = env.wait_accounted(&produced, Duration::from_secs(120)).await?;
    assert_eq!(acct.published, 20, "{acct:?}");

    let sessions = stage_sessions(&env).await?;
    for (_, name) in STAGES {
        assert!(sessions.iter().any(|(n, _)| n == name), "{name} has no session open: {sessions:?}");
    }
    let plaintext: Vec<_> = sessions.iter().filter(|(_, ssl)| !ssl).collect();
    assert!(plaintext.is_empty(), "sessions without TLS: {plaintext:?}");

    for stage in stages {
        stage.stop().await?;
    }
    env.teardown().await;
    Ok(())
}

/// Kills the stage's process if the test ends while it still runs.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_stops_the_stage_at_start_and_says_why() -> anyhow::Result<()> {
    postgres_tls_ca()?; // the server speaks TLS, with a certificate this CA did not sign
    let env = TestEnv::new(llm_sim::Latency::default(), &[]).await?;

    // A CA of the test's own: valid, but not the one that signed the server's certificate.
    let dir = std::env::temp_dir().join(format!("enrich-wrong-ca-{}", env.id));
    std::fs::create_dir_all(&dir)?;
    let wrong_ca = dir.join("ca.pem");
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=not the CA of this server", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&wrong_ca)
        .output()?;
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));

    // The handshake fails before authentication, so this password is never checked; it
    // must not be printed either.
    let password = format!("never-printed-{}", env.id);
    let mut url = reqwest::Url::parse(env.settings.database.url.expose())?;
    url.set_password(Some(&password)).expect("a URL with a host");
    let url =
        with_query(url.as_str(), &[("sslmode", "verify-full"), ("sslrootcert", wrong_ca.to_str().expect("UTF-8"))])?;

    let child = env
        .command("ingest-dedup")?
        .env("ENRICH_DATABASE__URL", &url)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut process = Process(child);
    let status = wait_for("ingest-dedup to stop", Duration::from_secs(60), || {
        let exited = process.0.try_wait();
        async move { Ok(exited?) }
    })
    .await?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    process.0.stdout.take().expect("piped").read_to_string(&mut stdout)?;
    process.0.stderr.take().expect("piped").read_to_string(&mut stderr)?;
    println!("ingest-dedup exited with {status}; stderr:\n{stderr}");

    assert!(!status.success(), "the stage must not run with a server it cannot verify: {status}");
    assert!(stderr.contains("database.url"), "the error names the setting: {stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains("not verified"),
        "the error says the server's certificate failed verification: {stderr}"
    );
    assert!(stderr.contains(wrong_ca.to_str().expect("UTF-8")), "the error names the CA file used: {stderr}");
    assert!(!stdout.contains(&password) && !stderr.contains(&password), "the password was printed");

    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
    Ok(())
}
