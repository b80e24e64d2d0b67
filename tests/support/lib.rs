//! Test harness: a fresh database, fresh topics and a fresh pipeline name per test, a
//! real llm-sim on a free port, and the stages run in-process with their own shutdown
//! tokens against the real broker and PostgreSQL.

use enrich_common::shutdown::Shutdown;
use enrich_common::{Settings, kafka};
use sqlx::{Connection, PgConnection, PgPool};
use std::future::Future;
use std::time::{Duration, Instant};

pub use loadgen;

/// The PostgreSQL the tests create their databases in (a role with CREATEDB).
pub fn admin_database_url() -> String {
    std::env::var("ENRICH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://enrich:enrich@127.0.0.1:5432/enrich".into())
}

pub fn bootstrap_servers() -> String {
    std::env::var("ENRICH_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub pool: PgPool,
    pub sim: llm_sim::RunningSim,
    /// The `ENRICH_*` variables that make `settings` from config/pipeline.toml, for
    /// stages run as processes.
    pub env_vars: Vec<(String, String)>,
    db_name: String,
    sim_shutdown: Shutdown,
}

/// Which stage to run.
#[derive(Debug, Clone, Copy)]
pub enum StageKind {
    Ingest,
    Enricher,
    Publisher,
    DlqReplayer,
}

pub struct RunningStage {
    pub kind: StageKind,
    token: Shutdown,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningStage {
    /// The stage ended on its own (an error it stops on, for its supervisor to restart).
    pub fn has_exited(&self) -> bool {
        self.join.is_finished()
    }

    /// Asks the stage to stop (as SIGTERM would) and waits for it to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.join.await?
    }
}

impl TestEnv {
    /// `overrides` are extra `ENRICH_*` settings for this test.
    pub async fn new(sim_latency: llm_sim::Latency, overrides: &[(&str, String)]) -> anyhow::Result<Self> {
        // reqwest is built without a bundled crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let id = format!("{:08x}", rand::random::<u32>());
        let db_name = format!("enrich_test_{id}");
        let admin_url = admin_database_url();
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut admin).await?;
        admin.close().await?;
        let db_url = match admin_url.rfind('/') {
            Some(i) => format!("{}/{db_name}", &admin_url[..i]),
            None => anyhow::bail!("ENRICH_TEST_DATABASE_URL has no database part"),
        };

        let sim_shutdown = Shutdown::new();
        let sim_config = llm_sim::SimConfig { latency: sim_latency, ..Default::default() };
        let sim = llm_sim::start("127.0.0.1", 0, sim_config, sim_shutdown.clone()).await?;

        let p = format!("t{id}");
        let mut env: Vec<(String, String)> = loadgen::isolated_pipeline_env(&p);
        env.extend([
            ("ENRICH_KAFKA__BOOTSTRAP_SERVERS".into(), bootstrap_servers()),
            ("ENRICH_KAFKA__PARTITIONS".into(), "4".into()),
            ("ENRICH_DATABASE__URL".into(), db_url),
            ("ENRICH_DATABASE__MAX_CONNECTIONS".into(), "12".into()),
            ("ENRICH_LLM__BASE_URL".into(), sim.base_url()),
            ("ENRICH_INGEST__HTTP_PORT".into(), "0".into()),
            ("ENRICH_ENRICHER__HTTP_PORT".into(), "0".into()),
            ("ENRICH_PUBLISHER__HTTP_PORT".into(), "0".into()),
            ("ENRICH_DLQ_REPLAYER__HTTP_PORT".into(), "0".into()),
            ("ENRICH_DLQ_REPLAYER__GRPC_PORT".into(), "0".into()),
            // Delayed retries come back quickly in tests.
            ("ENRICH_LLM__RETRY_DELAY_MS".into(), "400".into()),
        ]);
        env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let settings = Settings::from_toml(include_str!("../../config/pipeline.toml"), env.clone())?;
        let pool = enrich_common::db::connect(&settings.database, "tests").await?;
        kafka::ensure_topics(&settings, &[&format!("{p}.raw")]).await?;
        Ok(Self { id, settings, pool, sim, env_vars: env, db_name, sim_shutdown })
    }

    pub fn source_topic(&self) -> &str {
        &self.settings.pipeline.sources[0].topic
    }

    /// A dlq-replayer's replayer on this test's settings, database and broker, as the
    /// admin API and the CLI use it.
    pub fn replayer(&self) -> anyhow::Result<dlq_replayer::replay::Replayer> {
        Ok(dlq_replayer::replay::Replayer {
            settings: self.settings.clone(),
            pool: self.pool.clone(),
            producer: kafka::producer(&self.settings, "dlq-replayer")?,
        })
    }

    pub fn spawn(&self, kind: StageKind) -> RunningStage {
        self.spawn_with(kind, |_| {})
    }

    /// Starts a stage with its own changes to the settings (a replica's instance id, say).
    pub fn spawn_with(&self, kind: StageKind, change: impl FnOnce(&mut Settings)) -> RunningStage {
        let token = Shutdown::new();
        let mut settings = self.settings.clone();
        change(&mut settings);
        let t = token.clone();
        let join = match kind {
            StageKind::Ingest => tokio::spawn(ingest_dedup::run(settings, t)),
            StageKind::Enricher => tokio::spawn(enricher::run(settings, t)),
            StageKind::Publisher => tokio::spawn(publisher::run(settings, t)),
            StageKind::DlqReplayer => tokio::spawn(dlq_replayer::run(settings, t)),
        };
        RunningStage { kind, token, join }
    }

    /// Starts a stage's binary (built by `cargo build --workspace --bins`, which `make test`
    /// runs first, into the target directory of this test) as a process with this test's
    /// settings; warnings only, output discarded.
    pub fn spawn_process(&self, binary: &str) -> anyhow::Result<std::process::Child> {
        self.process(binary, "warn", std::process::Stdio::null())
    }

    /// As [`Self::spawn_process`], with `RUST_LOG=info` and its stdout (the JSON log lines) piped.
    pub fn spawn_process_logged(&self, binary: &str) -> anyhow::Result<std::process::Child> {
        self.process(binary, "info", std::process::Stdio::piped())
    }

    fn process(&self, binary: &str, log: &str, stdout: std::process::Stdio) -> anyhow::Result<std::process::Child> {
        Ok(self.command(binary)?.env("RUST_LOG", log).stdout(stdout).spawn()?)
    }

    /// A stage's binary with this test's settings (`--config` and the `ENRICH_*`
    /// variables), no stdin, for the caller to add to and spawn.
    pub fn command(&self, binary: &str) -> anyhow::Result<std::process::Command> {
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/pipeline.toml");
        let mut command = std::process::Command::new(binary_path(binary)?);
        command.arg("--config").arg(config).envs(self.env_vars.iter().cloned()).stdin(std::process::Stdio::null());
        Ok(command)
    }

    /// Waits until every produced record is read by ingest and every forwarded key is
    /// finished (published or dead-lettered); returns the accounting.
    pub async fn wait_accounted(
        &self,
        produced: &[loadgen::kafka_io::Produced],
        deadline: Duration,
    ) -> anyhow::Result<loadgen::accounting::Accounting> {
        let pipeline = &self.settings.pipeline.name;
        wait_for("every record to be accounted for", deadline, || async {
            let a = loadgen::accounting::account(&self.pool, pipeline, self.source_topic(), produced).await?;
            Ok(a.complete(produced.len()).then_some(a))
        })
        .await
    }

    /// Drops the test's database and deletes its topics (best effort), and stops llm-sim.
    pub async fn teardown(self) {
        self.sim_shutdown.cancel();
        self.pool.close().await;
        let t = &self.settings.topics;
        let topics = [self.source_topic(), &t.requests, &t.retry, &t.results, &t.output, &t.dlq];
        loadgen::kafka_io::delete_topics(&self.settings, &topics).await;
        if let Ok(mut admin) = PgConnection::connect(&admin_database_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name)))
                .execute(&mut admin)
                .await;
        }
    }
}

/// Where `cargo build --workspace --bins` (which `make test` runs first) put a binary: the
/// target directory of this test.
pub fn binary_path(binary: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|deps| deps.parent()).ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let path = dir.join(binary);
    anyhow::ensure!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    Ok(path)
}

/// Runs a command-line tool of the workspace to its end: (exit success, stdout, stderr).
pub async fn run_cli(binary: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String, String)> {
    let mut command = std::process::Command::new(binary_path(binary)?);
    // Only what the caller gives: not a token from the test's own environment.
    command.args(args).env_remove("ENRICH_ADMIN_TOKEN").stdin(std::process::Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || command.output()).await??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub use loadgen::procs::free_port;

/// Every key on the output topic (read `read_committed`, by its `idempotency-key`
/// header), with how many times it was published.
pub fn output_counts(env: &TestEnv) -> anyhow::Result<std::collections::HashMap<String, usize>> {
    let output = loadgen::kafka_io::read_to_end(&env.settings, &env.settings.topics.output, Duration::from_secs(60))?;
    let mut counts = std::collections::HashMap::new();
    for m in &output {
        let key = loadgen::kafka_io::header(m, enrich_common::headers::IDEMPOTENCY_KEY)
            .ok_or_else(|| anyhow::anyhow!("an output record without an idempotency-key header"))?;
        *counts.entry(key).or_insert(0) += 1;
    }
    Ok(counts)
}

/// How many keys of the pipeline are in one of `states`.
pub async fn count_in_states(env: &TestEnv, states: &[&str]) -> anyhow::Result<i64> {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND state = ANY($2)")
        .bind(&env.settings.pipeline.name)
        .bind(&states)
        .fetch_one(&env.pool)
        .await?;
    Ok(n)
}

/// Polls `check` until it yields a value or `timeout` passes; the error names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// `name{labels} value` samples of a Prometheus text exposition; panics on a line that
/// is neither a comment nor a sample.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name_ok = series
            .split('{')
            .next()
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
        assert!(name_ok, "bad metric name in {line:?}");
        if let Some(labels) = series.split_once('{').map(|(_, l)| l) {
            assert!(labels.ends_with('}'), "unclosed labels in {line:?}");
        }
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

/// The samples of a stage's `/metrics` on `port`.
pub async fn scrape_metrics(port: u16) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.text().await?;
    Ok(parse_metrics(&text))
}

/// The CA file that verifies the local PostgreSQL's TLS certificate: `ENRICH_TEST_PG_CA`
/// when set (a server whose TLS is set up elsewhere), otherwise the copy that
/// `deploy/local/stack.sh pg-tls` leaves in the stack directory. That step runs first,
/// once per test process: it is idempotent and sets TLS up on a running server (a reload,
/// no restart), so a stack started before it existed gets TLS too.
pub fn postgres_tls_ca() -> anyhow::Result<std::path::PathBuf> {
    static CA: std::sync::OnceLock<Result<std::path::PathBuf, String>> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        if let Some(ca) = std::env::var_os("ENRICH_TEST_PG_CA") {
            return Ok(ca.into());
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(root.join("deploy/local/stack.sh"))
            .arg("pg-tls")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run deploy/local/stack.sh pg-tls: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "deploy/local/stack.sh pg-tls failed (set ENRICH_TEST_PG_CA for a server set up otherwise): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stack_dir = std::env::var_os("ENRICH_STACK_DIR").map_or_else(|| root.join(".stack"), Into::into);
        Ok(stack_dir.join("pg-tls/ca.pem"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// `url` with these query parameters added (percent-encoded).
pub fn with_query(url: &str, params: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(url)?;
    url.query_pairs_mut().extend_pairs(params);
    Ok(url.into())
}

/// What the stages' `failpoints::set` take (their cargo feature `failpoints`).
pub type FailpointHook = std::sync::Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A failpoint hook that, the first time it runs, makes the next statement that writes
/// `table` (`events`: `UPDATE`, `INSERT OR UPDATE`) fail once, as a database that
/// refuses one write would: a trigger counts through the sequence `name`, which a
/// failed statement does not roll back. Once the write has been tried again,
/// `fail_once_count(pool, name)` is at least 2.
pub fn fail_once_hook(pool: PgPool, name: &'static str, table: &'static str, events: &'static str) -> FailpointHook {
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    std::sync::Arc::new(move || {
        let (pool, armed) = (pool.clone(), armed.clone());
        Box::pin(async move {
            if !armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let statements = [
                format!("CREATE SEQUENCE {name}"),
                format!(
                    "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                       IF nextval('{name}') = 1 THEN RAISE EXCEPTION 'injected: {table} refused once'; END IF;
                       RETURN NEW;
                     END $$"
                ),
                format!("CREATE TRIGGER {name} BEFORE {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"),
            ];
            for statement in statements {
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&pool).await {
                    panic!("the fault {name} cannot be armed: {e}");
                }
            }
        })
    })
}

/// How far the sequence of `fail_once_hook(_, name, ..)` has counted.
pub async fn fail_once_count(pool: &PgPool, name: &'static str) -> anyhow::Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT last_value FROM {name}"))).fetch_one(pool).await?;
    Ok(n)
}
