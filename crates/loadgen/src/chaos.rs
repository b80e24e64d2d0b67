//! `loadgen chaos`: drives the whole topology (llm-sim and the stages as processes) on
//! the real local stack under load, injects faults at seeded random times (SIGKILL of a
//! stage, SIGSTOP of an enricher past its session timeout, a kill during a rebalance, a
//! broker restart, a PostgreSQL restart, an LLM outage, the stages' PostgreSQL sessions
//! terminated again and again, the broker paused past the transaction timeout, enricher
//! replicas joining and leaving under short leases), and checks the guarantees against
//! its own log of what it sent: the output and DLQ topics are read back and every record
//! is accounted for.

use enrich_common::{Settings, headers, kafka};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::Message;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kafka_io::{Pace, Produced, header, produce_paced, read_to_end_with};
use crate::procs::{free_port, signal, sim_completions, stop, wait_up};
use crate::workload::{Kind, Record, Spec, build};

/// One injected fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// SIGKILL a stage; it is restarted a second later (as a supervisor would).
    Kill(&'static str),
    /// SIGSTOP the first enricher for this long (past its session timeout), then SIGCONT.
    Freeze(u64),
    /// Start another enricher and SIGKILL the first while the group rebalances.
    KillDuringRebalance,
    BrokerRestart,
    PostgresRestart,
    /// llm-sim stopped for this many seconds.
    LlmOutage(u64),
    /// Every PostgreSQL session of the stages terminated (`pg_terminate_backend`) this
    /// many times, a few hundred milliseconds apart: statements fail at whatever instant
    /// they were at.
    SessionKills(u32),
    /// The broker's processes stopped (SIGSTOP) for this many seconds, past the
    /// publisher's transaction timeout, then continued.
    BrokerPause(u64),
    /// A second enricher joins, runs a few seconds and leaves (SIGTERM), again and again
    /// for this many seconds: a rebalance every few seconds.
    ReplicaChurn(u64),
}

impl Fault {
    fn label(&self) -> String {
        match self {
            Fault::Kill(stage) => format!("kill {stage}"),
            Fault::Freeze(s) => format!("freeze enricher {s}s"),
            Fault::KillDuringRebalance => "kill enricher during rebalance".into(),
            Fault::BrokerRestart => "restart broker".into(),
            Fault::PostgresRestart => "restart PostgreSQL".into(),
            Fault::LlmOutage(s) => format!("LLM outage {s}s"),
            Fault::SessionKills(n) => format!("terminate PostgreSQL sessions x{n}"),
            Fault::BrokerPause(s) => format!("pause broker {s}s"),
            Fault::ReplicaChurn(s) => format!("enricher replicas join and leave for {s}s"),
        }
    }

    /// Whether the fault can cut an enricher off between a paid call and storing its answer.
    fn can_lose_a_paid_call(&self) -> bool {
        matches!(
            self,
            Fault::Kill("enricher")
                | Fault::KillDuringRebalance
                | Fault::Freeze(_)
                | Fault::PostgresRestart
                | Fault::LlmOutage(_)
        )
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub records: usize,
    pub faults: Vec<Fault>,
    /// `key` or `strict-key`.
    pub ordering: &'static str,
    /// Records per second while producing (the faults land under load).
    pub rate: f64,
    /// llm-sim's `--latency`.
    pub latency: &'static str,
    /// Settings of this scenario's stages besides the common ones (`ENRICH_*`).
    pub env: Vec<(&'static str, &'static str)>,
}

/// llm-sim's latency in most scenarios: log-normal around 40 ms, 1% of calls 1.5 s.
const LATENCY: &str = "lognormal:40,0.6,0.01:1500";

impl Scenario {
    /// The scenarios of `make chaos`: each fault alone, then all of them mixed.
    pub fn catalogue(records: usize) -> Vec<Scenario> {
        let s = |name: &str, faults: Vec<Fault>| Scenario {
            name: name.into(),
            records,
            faults,
            ordering: "key",
            rate: 400.0,
            latency: LATENCY,
            env: Vec::new(),
        };
        vec![
            s(
                "kill-stages",
                vec![
                    Fault::Kill("ingest-dedup"),
                    Fault::Kill("enricher"),
                    Fault::Kill("publisher"),
                    Fault::Kill("enricher"),
                    Fault::Kill("publisher"),
                    Fault::Kill("ingest-dedup"),
                ],
            ),
            s("zombie-enricher", vec![Fault::Freeze(12)]),
            s("kill-during-rebalance", vec![Fault::KillDuringRebalance]),
            s("broker-restart", vec![Fault::BrokerRestart]),
            s("postgres-restart", vec![Fault::PostgresRestart]),
            s("llm-outage", vec![Fault::LlmOutage(30)]),
            // Statements of every stage cut at random instants, many times a run.
            s("db-session-kills", vec![Fault::SessionKills(25), Fault::SessionKills(25), Fault::SessionKills(25)]),
            // The broker stopped past the publisher's transaction timeout (8 s here).
            s("broker-pause", vec![Fault::BrokerPause(12)]),
            // Leases shorter than a slow call plus its wait for a slot, a long-tailed LLM,
            // and a rebalance every few seconds.
            Scenario {
                latency: "lognormal:150,0.6,0.05:1200",
                env: vec![("ENRICH_ENRICHER__LEASE_MS", "2500")],
                ..s("lease-churn", vec![Fault::ReplicaChurn(40)])
            },
            // Strict-key ordering under kills: every key in source order, the records
            // behind a poison record parked, not lost.
            Scenario {
                ordering: "strict-key",
                ..s("strict-key", vec![Fault::Kill("enricher"), Fault::Kill("publisher"), Fault::PostgresRestart])
            },
            s(
                "soak",
                vec![
                    Fault::Kill("enricher"),
                    Fault::PostgresRestart,
                    Fault::Kill("publisher"),
                    Fault::Freeze(12),
                    Fault::LlmOutage(30),
                    Fault::Kill("ingest-dedup"),
                    Fault::BrokerRestart,
                    Fault::KillDuringRebalance,
                    Fault::Kill("publisher"),
                ],
            ),
        ]
    }

    /// The short form CI runs: a few thousand records, several faults mixed.
    pub fn short(records: usize) -> Scenario {
        Scenario {
            name: "short".into(),
            records,
            faults: vec![
                Fault::Kill("enricher"),
                Fault::Kill("publisher"),
                Fault::PostgresRestart,
                Fault::Kill("ingest-dedup"),
                Fault::LlmOutage(10),
                Fault::Freeze(10),
                Fault::SessionKills(10),
            ],
            ordering: "key",
            rate: 300.0,
            latency: LATENCY,
            env: Vec::new(),
        }
    }
}

pub struct Chaos {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
    pub stack_script: PathBuf,
    pub seed: u64,
}

/// What the runner sent, and how each record should end.
struct Sent {
    records: Vec<Record>,
    produced: Vec<Produced>,
    poison: HashSet<String>,
}

struct Proc {
    name: &'static str,
    child: Child,
    port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Chaos {
    fn spawn(&self, name: &'static str, args: &[String], env: &[(String, String)], log: &str) -> anyhow::Result<Child> {
        let logs = self.out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{log}.log")))?;
        Command::new(self.bin_dir.join(name))
            .args(args)
            .envs(env.iter().cloned())
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.bin_dir.join(name).display()))
    }

    async fn start(
        &self,
        name: &'static str,
        port: u16,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: &str,
    ) -> anyhow::Result<Proc> {
        let child = self.spawn(name, &args, &env, log)?;
        let mut p = Proc { name, child, port, args, env };
        wait_healthy(&mut p).await?;
        Ok(p)
    }

    async fn restart(&self, p: &mut Proc, log: &str) -> anyhow::Result<()> {
        let _ = p.child.wait();
        p.child = self.spawn(p.name, &p.args, &p.env, log)?;
        wait_healthy(p).await
    }

    /// The local stack's broker: its process group (the stack starts it in a session of
    /// its own), from the pid file under the stack's directory.
    fn broker_group(&self) -> anyhow::Result<u32> {
        let dir = match std::env::var("ENRICH_STACK_DIR") {
            Ok(d) => PathBuf::from(d),
            Err(_) => self
                .stack_script
                .parent()
                .and_then(|p| p.parent())
                .and_then(|p| p.parent())
                .map(|root| root.join(".stack"))
                .ok_or_else(|| anyhow::anyhow!("no stack directory beside {}", self.stack_script.display()))?,
        };
        let pidfile = dir.join("kafka/kafka.pid");
        let pid = std::fs::read_to_string(&pidfile).map_err(|e| anyhow::anyhow!("{}: {e}", pidfile.display()))?;
        Ok(pid.trim().parse()?)
    }

    fn stack(&self, command: &str) -> anyhow::Result<()> {
        let status = Command::new(&self.stack_script).arg(command).stdout(Stdio::null()).status()?;
        anyhow::ensure!(status.success(), "{} {command} failed", self.stack_script.display());
        Ok(())
    }

    pub async fn run(&self, scenario: &Scenario, index: usize) -> anyhow::Result<Value> {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(index as u64));
        let stamp = crate::kafka_io::now_ms();
        let p = format!("chaos{stamp}x{index}");
        let base = Settings::load(&self.config)?;
        let admin_url = base.database.url.expose().to_string();
        let db_name = format!("enrich_chaos_{stamp}_{index}");
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut admin).await?;
        admin.close().await?;
        let db_url = format!("{}/{db_name}", &admin_url[..admin_url.rfind('/').unwrap_or(admin_url.len())]);

        let sim_port = free_port()?;
        let mut env: Vec<(String, String)> = crate::isolated_pipeline_env(&p);
        env.extend(
            [
                ("ENRICH_KAFKA__PARTITIONS", "6".to_string()),
                ("ENRICH_DATABASE__URL", db_url),
                ("ENRICH_DATABASE__MAX_CONNECTIONS", "10".into()),
                ("ENRICH_LLM__BASE_URL", format!("http://127.0.0.1:{sim_port}/v1")),
                // A hung call gives up after 2 s; leases outlive it.
                ("ENRICH_LLM__REQUEST_TIMEOUT_MS", "2000".into()),
                ("ENRICH_ENRICHER__LEASE_MS", "4000".into()),
                ("ENRICH_LLM__MAX_ATTEMPTS", "8".into()),
                ("ENRICH_LLM__QUICK_RETRIES", "2".into()),
                ("ENRICH_LLM__RETRY_DELAY_MS", "1000".into()),
                ("ENRICH_LLM__BREAKER_OPEN_MS", "1000".into()),
                ("ENRICH_ENRICHER__MAX_IN_FLIGHT", "32".into()),
                ("ENRICH_ENRICHER__ORDERING", scenario.ordering.into()),
                // A frozen or killed consumer leaves the group quickly.
                ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000".into()),
                ("ENRICH_KAFKA__CLIENT__HEARTBEAT.INTERVAL.MS", "1000".into()),
                // A commit outlived by a broker pause times out, and is called again.
                ("ENRICH_PUBLISHER__TRANSACTION_TIMEOUT_MS", "8000".into()),
                ("RUST_LOG", "warn".into()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env.extend(scenario.env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let port_of = |stage: &str| -> anyhow::Result<(String, u16)> {
            let var = match stage {
                "ingest-dedup" => "ENRICH_INGEST__HTTP_PORT",
                "enricher" => "ENRICH_ENRICHER__HTTP_PORT",
                _ => "ENRICH_PUBLISHER__HTTP_PORT",
            };
            Ok((var.to_string(), free_port()?))
        };
        let process_env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("ENRICH_")).collect();
        let settings =
            Settings::from_toml(&std::fs::read_to_string(&self.config)?, process_env.into_iter().chain(env.clone()))?;
        let source = format!("{p}.raw");
        kafka::ensure_topics(&settings, &[&source]).await?;
        let pool = enrich_common::db::connect(&settings.database, "loadgen").await?;
        enrich_common::db::migrate(&pool).await?;

        let sent_records = workload(&p, scenario.records, &mut rng);
        let log = format!("{}-{}", scenario.name, index);
        let sim_args: Vec<String> = [
            "--port",
            &sim_port.to_string(),
            "--latency",
            scenario.latency,
            "--rate-429",
            "0.05",
            "--rate-500",
            "0.02",
            "--rate-hang",
            "0.01",
        ]
        .map(str::to_string)
        .to_vec();
        let mut procs: Vec<Proc> = Vec::new();
        procs.push(self.start("llm-sim", sim_port, sim_args, Vec::new(), &log).await?);
        let config_arg = vec!["--config".to_string(), self.config.display().to_string()];
        for stage in ["ingest-dedup", "enricher", "publisher"] {
            let (var, port) = port_of(stage)?;
            let mut stage_env = env.clone();
            stage_env.push((var, port.to_string()));
            procs.push(self.start(stage, port, config_arg.clone(), stage_env, &log).await?);
        }

        // Produce under load while the faults land.
        let producing = {
            let settings = settings.clone();
            let source = source.clone();
            let records = sent_records.records.clone();
            let rate = scenario.rate;
            tokio::spawn(async move {
                produce_paced(&settings, &source, &records, |i| i % 2 == 0, Pace::PerSecond(rate), |_| {}).await
            })
        };
        let produce_secs = scenario.records as f64 / scenario.rate;
        let mut times: Vec<f64> =
            (0..scenario.faults.len()).map(|_| rng.random_range(1.0..produce_secs.max(2.0))).collect();
        times.sort_by(f64::total_cmp);
        let started = Instant::now();
        let mut injected = Vec::new();
        // Calls answered by llm-sim incarnations stopped by an outage.
        let mut earlier_sim_calls = 0;
        for (fault, at) in scenario.faults.iter().zip(times) {
            let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
            tokio::time::sleep(wait).await;
            println!("[chaos] {}: {:>5.1} s  {}", scenario.name, started.elapsed().as_secs_f64(), fault.label());
            match self.inject(fault, &mut procs, &env, &config_arg, &log, &pool).await {
                Ok(calls) => earlier_sim_calls += calls,
                Err(e) => {
                    // The scenario cannot go on: its processes stop with it.
                    stop(procs.into_iter().map(|p| p.child).collect());
                    return Err(e);
                }
            }
            injected.push(fault.clone());
        }
        let produced = producing.await??;
        let sent = Sent { produced, ..sent_records };

        // Wait until every record is accounted for, or give up and report what is missing.
        let wait_started = Instant::now();
        let mut finished = false;
        let mut restarts: Vec<String> = Vec::new();
        while wait_started.elapsed() < Duration::from_secs(600) {
            // A supervisor, as Kubernetes or compose would be: a stage that exits on its
            // own (a fatal error) is started again, and the restart is reported.
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    println!("[chaos] {}: {} exited ({status}); restarting it", scenario.name, p.name);
                    restarts.push(format!("{} exited ({status})", p.name));
                    self.restart(p, &log).await?;
                }
            }
            let a = crate::accounting::account(&pool, &p, &source, &sent.produced).await;
            // Under strict-key, records behind a dead letter stay parked until an operator
            // replays or discards it: they count as finished here.
            let parked: i64 = if scenario.ordering == "strict-key" {
                // A parked record that is now its key's blocker (released, then sent to a
                // retry) is not finished yet.
                sqlx::query_as::<_, (i64,)>(
                    "SELECT count(*) FROM parked p WHERE p.pipeline = $1 AND NOT EXISTS (
                       SELECT 1 FROM key_blocks b WHERE b.pipeline = p.pipeline AND b.kafka_key = p.kafka_key
                                                 AND b.blocker_key = p.idempotency_key
                                                 AND NOT EXISTS (SELECT 1 FROM enrich_state s WHERE s.pipeline = p.pipeline
                                                   AND s.idempotency_key = p.idempotency_key AND s.state = 'dead_lettered'))",
                )
                    .bind(&p)
                    .fetch_one(&pool)
                    .await
                    .map(|(n,)| n)
                    .unwrap_or(0)
            } else {
                0
            };
            if let Ok(a) = a
                && a.read == sent.produced.len() as i64
                && a.published + a.dead_lettered_at_enricher + parked == a.forwarded
            {
                finished = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Let the publisher's last transaction settle before reading back.
        let group = settings.group_id(enrich_common::config::Stage::Publisher);
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(60)
            && !crate::kafka_io::group_caught_up(&settings, &group, &settings.topics.results).unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let sim_calls = earlier_sim_calls + sim_completions(&sim_at(procs[0].port)).await.unwrap_or(0);
        stop(procs.into_iter().map(|p| p.child).collect());

        let strict = scenario.ordering == "strict-key";
        let mut report = verify(&settings, &pool, &p, &source, &sent, &injected, sim_calls, finished, strict).await?;
        report["unplanned_restarts"] = json!(restarts);
        pool.close().await;
        if report["violations"].as_array().is_some_and(Vec::is_empty) {
            let mut admin = PgConnection::connect(&admin_url).await?;
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
                .execute(&mut admin)
                .await;
        } else {
            println!("[chaos] {}: database {db_name} kept for inspection", scenario.name);
        }
        Ok(json!({"scenario": scenario.name, "seed": self.seed.wrapping_add(index as u64), "report": report}))
    }

    async fn inject(
        &self,
        fault: &Fault,
        procs: &mut Vec<Proc>,
        env: &[(String, String)],
        config_arg: &[String],
        log: &str,
        pool: &PgPool,
    ) -> anyhow::Result<u64> {
        let mut sim_calls = 0;
        match fault {
            Fault::Kill(stage) => {
                let p = procs.iter_mut().find(|p| p.name == *stage).ok_or_else(|| anyhow::anyhow!("no {stage}"))?;
                signal(p.child.id(), "KILL");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.restart(p, log).await?;
            }
            Fault::Freeze(secs) => {
                let p =
                    procs.iter_mut().find(|p| p.name == "enricher").ok_or_else(|| anyhow::anyhow!("no enricher"))?;
                signal(p.child.id(), "STOP");
                tokio::time::sleep(Duration::from_secs(*secs)).await;
                signal(p.child.id(), "CONT");
            }
            Fault::KillDuringRebalance => {
                let port = free_port()?;
                let mut second_env = env.to_vec();
                second_env.push(("ENRICH_ENRICHER__HTTP_PORT".into(), port.to_string()));
                let second = self.start("enricher", port, config_arg.to_vec(), second_env, log).await?;
                // The second replica has joined: the group is rebalancing now.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let first =
                    procs.iter_mut().find(|p| p.name == "enricher").ok_or_else(|| anyhow::anyhow!("no enricher"))?;
                signal(first.child.id(), "KILL");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.restart(first, log).await?;
                procs.push(second);
            }
            Fault::BrokerRestart => self.stack("restart-kafka")?,
            Fault::SessionKills(times) => {
                for _ in 0..*times {
                    // Every session of the stages on this scenario's database (not the
                    // runner's own, not the server's autovacuum workers).
                    let (killed,): (i64,) = sqlx::query_as(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                          WHERE datname = current_database() AND pid <> pg_backend_pid()
                            AND backend_type = 'client backend' AND usename = current_user
                            AND application_name <> 'loadgen'",
                    )
                    .fetch_one(pool)
                    .await?;
                    println!("[chaos]   {killed} sessions terminated");
                    tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 800)).await;
                }
            }
            Fault::BrokerPause(secs) => {
                let group = self.broker_group()?;
                signal_group(group, "STOP");
                tokio::time::sleep(Duration::from_secs(*secs)).await;
                signal_group(group, "CONT");
            }
            Fault::ReplicaChurn(secs) => {
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(*secs) {
                    let port = free_port()?;
                    let mut second_env = env.to_vec();
                    second_env.push(("ENRICH_ENRICHER__HTTP_PORT".into(), port.to_string()));
                    let second = self.start("enricher", port, config_arg.to_vec(), second_env, log).await?;
                    tokio::time::sleep(Duration::from_millis(2000 + rand::random::<u64>() % 3000)).await;
                    // It leaves as a scaled-down replica does: SIGTERM, its calls finish.
                    stop(vec![second.child]);
                    tokio::time::sleep(Duration::from_millis(500 + rand::random::<u64>() % 1500)).await;
                }
            }
            Fault::PostgresRestart => self.stack("restart-postgres")?,
            Fault::LlmOutage(secs) => {
                let sim =
                    procs.iter_mut().find(|p| p.name == "llm-sim").ok_or_else(|| anyhow::anyhow!("no llm-sim"))?;
                // Its count so far; the restarted one counts from zero. A call answered in
                // the instant between this scrape and the kill is counted by nobody.
                sim_calls = sim_completions(&sim_at(sim.port)).await.unwrap_or(0);
                signal(sim.child.id(), "KILL");
                tokio::time::sleep(Duration::from_secs(*secs)).await;
                self.restart(sim, log).await?;
            }
        }
        Ok(sim_calls)
    }
}

/// The workload: tickets with 20% duplicates, 1% poison, 1% malformed, and Kafka keys
/// (customers) skewed: 5% of the tickets on five hot keys, the rest on about one key per
/// four tickets.
fn workload(run: &str, records: usize, rng: &mut StdRng) -> Sent {
    let malformed = (records / 100).max(1);
    let duplicates = records / 5;
    let unique = records - duplicates - malformed;
    let mut built = build(&Spec { run: run.to_string(), unique, duplicates, malformed });
    let mut customer: HashMap<String, Vec<u8>> = HashMap::new();
    let mut poison = HashSet::new();
    for r in built.iter_mut().filter(|r| r.kind == Kind::Unique) {
        let Some(t) = r.ticket.as_mut() else { continue };
        // Records of one key run one at a time, each waiting out its key's 429s and hangs:
        // a few hundred records on one key is a long chain already.
        let key = if rng.random_bool(0.05) {
            format!("{run}-hot-{}", rng.random_range(0..5))
        } else {
            format!("{run}-cust-{}", rng.random_range(0..(unique / 4).max(1)))
        };
        customer.insert(t.id.clone(), key.clone().into_bytes());
        r.key = Some(key.into_bytes());
        if rng.random_bool(0.01) {
            t.body = format!("{} [[sim:always-500]]", t.body);
            r.value = Some(t.to_json());
            poison.insert(t.id.clone());
        }
    }
    // A repeat carries the same payload as its original (poison included), and half of
    // them its Kafka key.
    let originals: HashMap<String, Vec<u8>> = built
        .iter()
        .filter(|r| r.kind == Kind::Unique)
        .filter_map(|r| Some((r.ticket.as_ref()?.id.clone(), r.value.clone()?)))
        .collect();
    for (d, r) in built.iter_mut().filter(|r| matches!(r.kind, Kind::Duplicate { .. })).enumerate() {
        let Some(id) = r.ticket.as_ref().map(|t| t.id.clone()) else { continue };
        r.value = originals.get(&id).cloned();
        if d % 2 == 0 {
            r.key = customer.get(&id).cloned();
        }
    }
    Sent { records: built, produced: Vec::new(), poison }
}

async fn wait_healthy(p: &mut Proc) -> anyhow::Result<()> {
    wait_up(p.port, "/healthz", &mut p.child, p.name, Duration::from_secs(90)).await
}

fn sim_at(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Signals every process of group `group`.
fn signal_group(group: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg("--").arg(format!("-{group}")).status();
}

/// A broken guarantee, with the keys that show it (at most a few listed).
fn violation(what: &str, keys: &[String]) -> Value {
    json!({"violation": what, "count": keys.len(), "keys": keys.iter().take(10).collect::<Vec<_>>()})
}

type RunRow = (String, String, String, Option<String>, Option<i32>, Option<i64>);
/// A DLQ record's (reason, stage, idempotency key).
type DeadAt = (String, String, String);

#[allow(clippy::too_many_arguments)]
async fn verify(
    settings: &Settings,
    pool: &PgPool,
    p: &str,
    source: &str,
    sent: &Sent,
    faults: &[Fault],
    sim_calls: u64,
    finished: bool,
    strict: bool,
) -> anyhow::Result<Value> {
    let topics = &settings.topics;
    let key_of = |id: &str| format!("{p}:{id}");
    let mut violations: Vec<Value> = Vec::new();
    if !finished {
        violations.push(json!({"violation": "not every record was accounted for within 600 s"}));
    }

    // The output, read back as a read_committed consumer would (and read_uncommitted).
    let output = read_to_end_with(settings, &topics.output, Duration::from_secs(120), "read_committed")?;
    let uncommitted = read_to_end_with(settings, &topics.output, Duration::from_secs(120), "read_uncommitted")?;
    let mut published: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for m in &output {
        let key = header(m, headers::IDEMPOTENCY_KEY).unwrap_or_default();
        *published.entry(key.clone()).or_default() += 1;
        order.entry(m.key().unwrap_or_default().to_vec()).or_default().push(key);
    }
    let mut seen_uncommitted: HashMap<String, usize> = HashMap::new();
    for m in &uncommitted {
        *seen_uncommitted.entry(header(m, headers::IDEMPOTENCY_KEY).unwrap_or_default()).or_default() += 1;
    }
    let uncommitted_repeats = seen_uncommitted.values().filter(|n| **n > 1).count();

    // What should have come out: each ticket once, except the poison ones.
    let tickets: Vec<(&Record, &Produced)> = sent.records.iter().zip(&sent.produced).collect();
    let unique_ids: HashSet<String> = tickets
        .iter()
        .filter(|(r, _)| r.kind == Kind::Unique)
        .filter_map(|(r, _)| r.ticket.as_ref())
        .map(|t| t.id.clone())
        .collect();
    let mut missing = Vec::new();
    let mut twice = Vec::new();
    let mut poison_published = Vec::new();
    for id in &unique_ids {
        let key = key_of(id);
        let n = published.get(&key).copied().unwrap_or(0);
        if sent.poison.contains(id) {
            if n > 0 {
                poison_published.push(key);
            }
        } else if n == 0 {
            missing.push(key);
        } else if n > 1 {
            twice.push(key);
        }
    }
    // Under strict-key a ticket behind a poison record of its key is parked, not lost.
    let parked: HashSet<String> = if strict {
        sqlx::query_as::<_, (String,)>("SELECT idempotency_key FROM parked WHERE pipeline = $1")
            .bind(p)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(k,)| k)
            .collect()
    } else {
        HashSet::new()
    };
    let parked_count = missing.iter().filter(|k| parked.contains(*k)).count();
    missing.retain(|k| !parked.contains(k));
    let unexpected: Vec<String> = published
        .keys()
        .filter(|k| k.strip_prefix(&format!("{p}:")).is_none_or(|id| !unique_ids.contains(id)))
        .cloned()
        .collect();
    for (what, keys) in [
        ("sent and never published", &missing),
        ("published more than once (read_committed)", &twice),
        ("poison record published", &poison_published),
        ("published but never sent", &unexpected),
    ] {
        if !keys.is_empty() {
            violations.push(violation(what, keys));
        }
    }

    // The DLQ: exactly the poison and the malformed records, with their headers.
    let dlq = read_to_end_with(settings, &topics.dlq, Duration::from_secs(120), "read_committed")?;
    let mut dead_coordinates: HashMap<(i32, i64), Vec<DeadAt>> = HashMap::new();
    let mut dead_keys: HashMap<String, usize> = HashMap::new();
    for m in &dlq {
        let h = |n: &str| header(m, n).unwrap_or_default();
        let at = (
            h(headers::DLQ_ORIGINAL_PARTITION).parse().unwrap_or(-1),
            h(headers::DLQ_ORIGINAL_OFFSET).parse().unwrap_or(-1),
        );
        if h(headers::DLQ_ORIGINAL_TOPIC) != source {
            violations.push(violation("DLQ record without the source coordinates", &[h(headers::IDEMPOTENCY_KEY)]));
        }
        dead_coordinates.entry(at).or_default().push((
            h(headers::DLQ_REASON),
            h(headers::DLQ_STAGE),
            h(headers::IDEMPOTENCY_KEY),
        ));
        *dead_keys.entry(h(headers::IDEMPOTENCY_KEY)).or_default() += 1;
    }
    let mut wrong_dlq = Vec::new();
    for (r, at) in &tickets {
        if let Kind::Malformed { reason } = r.kind {
            let found = dead_coordinates.get(&(at.partition, at.offset));
            let ok = found.is_some_and(|d| d.iter().any(|(why, stage, _)| why == reason && stage == "ingest-dedup"));
            if !ok {
                wrong_dlq.push(format!("malformed {}@{} ({reason}): {found:?}", at.partition, at.offset));
            }
        }
    }
    // Under strict-key a poison record behind an earlier dead letter of its key is parked
    // with the rest, not dead-lettered.
    let parked_poison = sent.poison.iter().filter(|id| parked.contains(&key_of(id))).count();
    for id in &sent.poison {
        let key = key_of(id);
        if parked.contains(&key) {
            continue;
        }
        let ours: HashSet<(i32, i64)> = tickets
            .iter()
            .filter(|(r, _)| r.ticket.as_ref().is_some_and(|t| &t.id == id))
            .map(|(_, at)| (at.partition, at.offset))
            .collect();
        let ok = dead_coordinates.iter().any(|(at, d)| {
            ours.contains(at)
                && d.iter().any(|(why, stage, k)| why == "max_attempts" && stage == "enricher" && *k == key)
        });
        if !ok {
            wrong_dlq.push(format!("poison {key} not dead-lettered with its source coordinates"));
        }
    }
    let malformed_count = tickets.iter().filter(|(r, _)| matches!(r.kind, Kind::Malformed { .. })).count();
    let expected_dead = malformed_count + sent.poison.len() - parked_poison;
    let extra_dead: Vec<String> = dead_keys
        .keys()
        .filter(|k| {
            k.strip_prefix(&format!("{p}:")).is_some_and(|id| unique_ids.contains(id) && !sent.poison.contains(id))
        })
        .cloned()
        .collect();
    // The DLQ topic is written at least once (a stage killed between writing a dead letter
    // and committing its offset writes it again); the admin store must hold each once.
    let dlq_repeats: usize = dead_keys.values().map(|n| n - 1).sum();
    let listed_twice: Vec<String> = sqlx::query_as::<_, (String, i64)>(
        "SELECT idempotency_key, count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'
         GROUP BY idempotency_key, CASE WHEN stage = 'ingest-dedup' THEN source_partition || '@' || source_offset ELSE '' END
         HAVING count(*) > 1",
    )
    .bind(p)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(k, n)| format!("{k} ({n}x)"))
    .collect();
    if !listed_twice.is_empty() {
        violations.push(violation("a dead letter listed more than once by the admin API", &listed_twice));
    }
    // Every key that ended dead-lettered can be listed and replayed: it has a listed
    // dead letter (none left pending).
    let unlisted: Vec<String> = sqlx::query_as::<_, (String,)>(
        "SELECT s.idempotency_key FROM enrich_state s
          WHERE s.pipeline = $1 AND s.state = 'dead_lettered'
            AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.pipeline = s.pipeline
                              AND d.idempotency_key = s.idempotency_key AND d.status = 'dead')",
    )
    .bind(p)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(k,)| k)
    .collect();
    if !unlisted.is_empty() {
        violations.push(violation("a dead-lettered key without a listed dead letter", &unlisted));
    }
    if !wrong_dlq.is_empty() {
        violations.push(violation("DLQ misses a record or has the wrong reason", &wrong_dlq));
    }
    if !extra_dead.is_empty() {
        violations.push(violation("DLQ holds a record that is neither poison nor malformed", &extra_dead));
    }

    // Each sent record ends as exactly one of published / dead-lettered / duplicate,
    // as recorded by ingest, and each key is forwarded once.
    let partitions: Vec<i32> = sent.produced.iter().map(|x| x.partition).collect();
    let offsets: Vec<i64> = sent.produced.iter().map(|x| x.offset).collect();
    let dispositions: Vec<(i32, i64, i64, Option<String>)> = sqlx::query_as(
        "SELECT s.p, s.o, count(r.id), min(r.status)
         FROM UNNEST($3::int[], $4::bigint[]) AS s(p, o)
         LEFT JOIN run_history r ON r.pipeline = $1 AND r.stage = 'ingest-dedup' AND r.source_topic = $2
                                 AND r.source_partition = s.p AND r.source_offset = s.o
         GROUP BY s.p, s.o",
    )
    .bind(p)
    .bind(source)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(pool)
    .await?;
    let not_once: Vec<String> =
        dispositions.iter().filter(|d| d.2 != 1).map(|d| format!("{}@{}: {} dispositions", d.0, d.1, d.2)).collect();
    if !not_once.is_empty() {
        violations.push(violation("a sent record without exactly one ingest disposition", &not_once));
    }
    let duplicates = dispositions.iter().filter(|d| d.3.as_deref() == Some("duplicate")).count();
    let expected_duplicates = tickets.len() - malformed_count - unique_ids.len();
    if duplicates != expected_duplicates {
        violations.push(json!({"violation": "recorded duplicates differ from the duplicates sent",
                               "recorded": duplicates, "sent": expected_duplicates}));
    }

    // Order per Kafka key, for keys none of whose records went through a delayed retry.
    let retried: HashSet<String> = sqlx::query_as::<_, (String,)>(
        "SELECT DISTINCT idempotency_key FROM run_history WHERE pipeline = $1 AND status = 'retry_scheduled'",
    )
    .bind(p)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(k,)| k)
    .collect();
    let mut source_order: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
    for (r, _) in &tickets {
        if r.kind == Kind::Unique
            && let (Some(t), Some(k)) = (&r.ticket, &r.key)
        {
            source_order.entry(k.clone()).or_default().push(key_of(&t.id));
        }
    }
    let mut out_of_order = Vec::new();
    let mut keys_checked = 0;
    for (k, expected) in &source_order {
        if !strict && expected.iter().any(|key| retried.contains(key)) {
            continue;
        }
        keys_checked += 1;
        let got: Vec<&String> =
            order.get(k).map(|v| v.iter().filter(|key| expected.contains(key)).collect()).unwrap_or_default();
        let want: Vec<&String> = expected.iter().filter(|key| got.contains(key)).collect();
        if got != want {
            out_of_order.push(String::from_utf8_lossy(k).into_owned());
        }
    }
    if !out_of_order.is_empty() {
        violations.push(violation("output order differs from source order for a key", &out_of_order));
    }

    // Paid calls: at most one successful call per unique key, from llm-sim's count
    // (llm-sim restarted by an outage counts from zero, so only without one).
    let expected_calls = (unique_ids.len() - sent.poison.len() - parked_count) as u64;
    let excess = sim_calls.saturating_sub(expected_calls);
    let lost_paid_call_possible = faults.iter().any(Fault::can_lose_a_paid_call);
    let excess_cause = if excess == 0 {
        Value::Null
    } else if lost_paid_call_possible {
        json!(
            "answers that never reached a stored result: the enricher was killed, frozen or cut from the database mid-call, or llm-sim was stopped while answering (the attempt counter made the retry)"
        )
    } else {
        violations.push(json!({"violation": "more successful LLM calls than unique keys", "excess": excess}));
        json!("unexplained")
    };
    let (audit_calls,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT idempotency_key FROM step_outcomes WHERE pipeline = $1 AND step = 'llm_call' AND status = 'ok'
                               GROUP BY idempotency_key HAVING count(*) > 1) x",
    )
    .bind(p)
    .fetch_one(pool)
    .await?;
    if audit_calls > 0 {
        violations.push(json!({"violation": "keys with more than one stored successful call", "count": audit_calls}));
    }

    // Every published key: a complete audit history in one connected trace.
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT idempotency_key, stage, status, trace_id, source_partition, source_offset
         FROM run_history WHERE pipeline = $1 AND status IN ('forwarded', 'enriched', 'reused', 'published')",
    )
    .bind(p)
    .fetch_all(pool)
    .await?;
    let mut by_key: HashMap<&str, Vec<&RunRow>> = HashMap::new();
    for r in &runs {
        by_key.entry(r.0.as_str()).or_default().push(r);
    }
    let mut incomplete = Vec::new();
    let mut disconnected = Vec::new();
    for key in published.keys() {
        let rows = by_key.get(key.as_str()).cloned().unwrap_or_default();
        let has =
            |stage: &str, statuses: &[&str]| rows.iter().any(|r| r.1 == stage && statuses.contains(&r.2.as_str()));
        if !(has("ingest-dedup", &["forwarded"])
            && has("enricher", &["enriched", "reused"])
            && has("publisher", &["published"]))
        {
            incomplete.push(key.clone());
            continue;
        }
        let owner = rows.iter().find(|r| r.1 == "ingest-dedup" && r.2 == "forwarded").and_then(|r| r.3.clone());
        if rows.iter().filter(|r| r.1 != "ingest-dedup").any(|r| r.3 != owner) {
            disconnected.push(key.clone());
        }
    }
    if !incomplete.is_empty() {
        violations.push(violation("published key without a complete audit history", &incomplete));
    }
    if !disconnected.is_empty() {
        violations.push(violation("published key whose stages are not in one trace", &disconnected));
    }

    Ok(json!({
        "sent": sent.produced.len(),
        "unique": unique_ids.len(),
        "published": published.len(),
        "outputs": output.len(),
        "dead_lettered": dlq.len(),
        "dead_letters_expected": expected_dead,
        "duplicates": duplicates,
        "llm_calls": sim_calls,
        "llm_calls_expected": expected_calls,
        "llm_calls_excess_cause": excess_cause,
        "uncommitted_repeats": uncommitted_repeats,
        "dlq_repeats": dlq_repeats,
        "parked": parked_count,
        "keys_order_checked": keys_checked,
        "faults": faults.iter().map(Fault::label).collect::<Vec<_>>(),
        "violations": violations,
    }))
}

/// The markdown table of a chaos run.
pub fn markdown(results: &[Value]) -> String {
    let mut out = String::from(
        "| scenario | sent | published once | DLQ records (expected; written again after a kill) | duplicates | LLM calls (unique keys) | faults | violations |\n|---|---:|---:|---|---:|---|---|---:|\n",
    );
    for r in results {
        let rep = &r["report"];
        out.push_str(&format!(
            "| {} | {} | {} | {} ({}; {}) | {} | {} ({}) | {} | {} |\n",
            r["scenario"].as_str().unwrap_or(""),
            rep["sent"],
            rep["published"],
            rep["dead_lettered"],
            rep["dead_letters_expected"],
            rep["dlq_repeats"],
            rep["duplicates"],
            rep["llm_calls"],
            rep["llm_calls_expected"],
            rep["faults"]
                .as_array()
                .map(|f| f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            rep["violations"].as_array().map_or(0, Vec::len),
        ));
    }
    out
}
