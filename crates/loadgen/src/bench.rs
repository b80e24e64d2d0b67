//! `loadgen bench`: runs the whole topology (llm-sim and the three stages as separate
//! processes) on fresh topics and a fresh database per scenario, and measures
//! throughput, efficiency against the Little's-law bound, end-to-end latency, LLM calls
//! per unique key, and CPU seconds and peak RSS per stage.

use enrich_common::{Settings, headers, kafka};
use rdkafka::Message;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::accounting::account;
use crate::kafka_io::{Pace, header, produce_paced, read_to_end};
use crate::measure::{self, MachineCpu};
use crate::procs::{free_port, sim_completions, stop, wait_up};
use crate::workload::{Spec, build};

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub records: usize,
    pub duplicate_share: f64,
    pub partitions: i32,
    /// llm-sim latency spec (`fixed:200`, `lognormal:200,0.5,0.01:20000`, ...).
    pub latency: String,
    pub in_flight: usize,
    /// `key` or `partition`.
    pub ordering: &'static str,
    pub pace: Pace,
    /// Bytes appended to each ticket's body (0: the sample tickets as they are): a run of
    /// records near the size limit, for the stages' memory.
    pub padding: usize,
}

pub struct Bench {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
}

/// How long a process may take to come up.
const READY: Duration = Duration::from_secs(60);

struct StageProcess {
    name: &'static str,
    child: Child,
    port: u16,
}

/// CPU seconds (user + system) and peak RSS (MB) of a running process, from /proc.
fn usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some((ticks / 100.0, hwm_kb / 1024.0))
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Bench {
    pub async fn run(&self, scenario: &Scenario, index: usize) -> anyhow::Result<Value> {
        let stamp = crate::kafka_io::now_ms();
        let p = format!("bench{stamp}x{index}");
        let base = Settings::load(&self.config)?;
        let admin_url = base.database.url.expose().to_string();
        let db_name = format!("enrich_bench_{stamp}_{index}");
        let mut admin = PgConnection::connect(&admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}"))).execute(&mut admin).await?;
        let db_url = format!("{}/{db_name}", &admin_url[..admin_url.rfind('/').unwrap_or(admin_url.len())]);
        // Migrated here by the database's owner; each stage then connects as its own
        // role (when the stack made them), so pg_stat_statements tells the stages apart.
        let mut db = PgConnection::connect(&db_url).await?;
        enrich_common::db::MIGRATOR.run(&mut db).await?;
        let per_stage_roles = measure::prepare(&mut admin, &mut db).await?;
        db.close().await?;
        let stage_env = |name: &str| -> Vec<(String, String)> {
            let role = measure::STAGE_ROLES.iter().find(|(stage, _)| *stage == name).map(|(_, role)| *role);
            match role.filter(|_| per_stage_roles).and_then(|role| measure::with_user(&db_url, role)) {
                Some(url) => vec![
                    ("ENRICH_DATABASE__URL".into(), url),
                    ("ENRICH_DATABASE__MIGRATE_ON_START".into(), "false".into()),
                ],
                None => Vec::new(),
            }
        };

        let sim_port = free_port()?;
        let mut env: Vec<(String, String)> = crate::isolated_pipeline_env(&p);
        env.extend([
            ("ENRICH_KAFKA__PARTITIONS".into(), scenario.partitions.to_string()),
            ("ENRICH_DATABASE__URL".into(), db_url.clone()),
            ("ENRICH_DATABASE__MAX_CONNECTIONS".into(), "24".into()),
            ("ENRICH_LLM__BASE_URL".into(), format!("http://127.0.0.1:{sim_port}/v1")),
            ("ENRICH_ENRICHER__MAX_IN_FLIGHT".into(), scenario.in_flight.to_string()),
            ("ENRICH_ENRICHER__ORDERING".into(), scenario.ordering.to_string()),
            ("ENRICH_ENRICHER__MAX_BUFFERED_PER_PARTITION".into(), (scenario.in_flight * 2).max(1000).to_string()),
            ("RUST_LOG".into(), "warn".into()),
        ]);
        let ports: Vec<(&'static str, String, u16)> = vec![
            ("ingest-dedup", "ENRICH_INGEST__HTTP_PORT".into(), free_port()?),
            ("enricher", "ENRICH_ENRICHER__HTTP_PORT".into(), free_port()?),
            ("publisher", "ENRICH_PUBLISHER__HTTP_PORT".into(), free_port()?),
        ];
        env.extend(ports.iter().map(|(_, k, port)| (k.clone(), port.to_string())));
        let process_env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("ENRICH_")).collect();
        let settings =
            Settings::from_toml(&std::fs::read_to_string(&self.config)?, process_env.into_iter().chain(env.clone()))?;
        let source = format!("{p}.raw");
        kafka::ensure_topics(&settings, &[&source]).await?;

        let duplicates = (scenario.records as f64 * scenario.duplicate_share).round() as usize;
        let unique = scenario.records - duplicates;
        let mut records = build(&Spec { run: p.clone(), unique, duplicates, malformed: 0 });
        if scenario.padding > 0 {
            for r in &mut records {
                if let Some(mut t) = r.ticket.clone() {
                    t.body.push(' ');
                    t.body.push_str(&"x".repeat(scenario.padding));
                    *r = crate::workload::Record { kind: r.kind.clone(), ..crate::workload::Record::of_ticket(t) };
                }
            }
        }

        let logs = self.out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let spawn = |name: &'static str, args: &[String]| -> anyhow::Result<Child> {
            let log = std::fs::File::create(logs.join(format!("{}-{name}.log", scenario.name)))?;
            Command::new(self.bin_dir.join(name))
                .args(args)
                .envs(env.iter().cloned())
                .envs(stage_env(name))
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.bin_dir.join(name).display()))
        };

        // Backlog scenarios produce everything first: the stages then drain at full speed.
        let backlog = matches!(scenario.pace, Pace::Unlimited);
        let mut produced = if backlog {
            produce_paced(&settings, &source, &records, |_| false, Pace::Unlimited, |_| {}).await?
        } else {
            Vec::new()
        };
        // The machine's CPU and the server's WAL from here, before the stages start.
        let cpu_at_start = MachineCpu::now();
        let commands_at_start = measure::cpu_by_command();
        let wal_at_start = measure::wal_lsn(&mut admin).await?;
        let mut sim =
            spawn("llm-sim", &["--port".into(), sim_port.to_string(), "--latency".into(), scenario.latency.clone()])?;
        wait_up(sim_port, "/healthz", &mut sim, "llm-sim", READY).await?;
        let mut processes = vec![StageProcess { name: "llm-sim", child: sim, port: sim_port }];
        let config_arg = ["--config".to_string(), self.config.display().to_string()];
        for (name, _, port) in &ports {
            let mut child = spawn(name, &config_arg)?;
            wait_up(*port, "/readyz", &mut child, name, READY).await?;
            processes.push(StageProcess { name, child, port: *port });
        }
        if !backlog {
            produced = produce_paced(&settings, &source, &records, |_| false, scenario.pace, |_| {}).await?;
        }

        let pool = enrich_common::db::connect(&settings.database, "loadgen").await?;
        let started = Instant::now();
        let mut last_report = Instant::now();
        // A cheap poll (an index count) while the stages run, so the measurement does not
        // compete with them for the database; the full accounting once at the end.
        loop {
            let (finished,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM enrich_state WHERE pipeline = $1 AND state IN ('published', 'dead_lettered')",
            )
            .bind(&p)
            .fetch_one(&pool)
            .await?;
            if finished as usize >= unique {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                let secs = started.elapsed().as_secs_f64();
                println!("[bench] {}: published {finished}/{unique} unique after {secs:.0} s", scenario.name);
                last_report = Instant::now();
            }
            if started.elapsed() > Duration::from_secs(900) {
                stop(processes.into_iter().map(|p| p.child).collect());
                anyhow::bail!("{}: not finished after 900 s", scenario.name);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (machine_cpu_seconds, machine_busy) = match (MachineCpu::now(), cpu_at_start) {
            (Some(end), Some(start)) => (Some(end.busy_seconds_since(&start)), Some(end.busy_share_since(&start))),
            _ => (None, None),
        };
        let wal_bytes = measure::wal_bytes_between(&mut admin, &wal_at_start).await?;
        let by_command: Vec<Value> = measure::cpu_seconds_between(&commands_at_start, &measure::cpu_by_command())
            .into_iter()
            .take(8)
            .map(|(command, seconds)| json!({"command": command, "cpu_ms_per_record": seconds * 1000.0 / scenario.records.max(1) as f64}))
            .collect();
        let acct = account(&pool, &p, &source, &produced).await?;
        // The calls' own time per key, to take out of the end-to-end latency.
        let call_ms: HashMap<String, f64> = sqlx::query_as::<_, (String, f64)>(
            "SELECT idempotency_key, sum(duration_ms)::float8 FROM step_outcomes
              WHERE pipeline = $1 AND step = 'llm_call' AND duration_ms IS NOT NULL GROUP BY 1",
        )
        .bind(&p)
        .fetch_all(&pool)
        .await?
        .into_iter()
        .collect();

        // Steady-state window: first record ingested to last record published (database clock).
        let (window,): (f64,) = sqlx::query_as(
            "SELECT EXTRACT(EPOCH FROM (max(recorded_at) FILTER (WHERE stage = 'publisher')
                                     - min(recorded_at) FILTER (WHERE stage = 'ingest-dedup')))::float8
             FROM run_history WHERE pipeline = $1",
        )
        .bind(&p)
        .fetch_one(&pool)
        .await?;
        let usage_by_stage: Vec<Value> = processes
            .iter()
            .map(|proc_| {
                let (cpu, rss) = usage(proc_.child.id()).unwrap_or((f64::NAN, f64::NAN));
                json!({"stage": proc_.name, "cpu_seconds": cpu, "peak_rss_mb": rss})
            })
            .collect();
        let publisher_port = processes.iter().find(|p| p.name == "publisher").map(|p| p.port);
        let phases = match publisher_port {
            Some(port) => measure::publisher_phases(port).await,
            None => Value::Null,
        };
        let sim_calls = sim_completions(&format!("http://127.0.0.1:{}", processes[0].port)).await.unwrap_or(0);
        stop(processes.into_iter().map(|p| p.child).collect());

        // End-to-end latency: output CreateTime minus the source record's CreateTime.
        let mut produced_at: HashMap<String, i64> = HashMap::new();
        for (r, prod) in records.iter().zip(&produced) {
            if let Some(t) = &r.ticket {
                let e = produced_at.entry(format!("{p}:{}", t.id)).or_insert(prod.timestamp_ms);
                *e = (*e).min(prod.timestamp_ms);
            }
        }
        let output = read_to_end(&settings, &settings.topics.output, Duration::from_secs(120))?;
        // Where the added latency goes: each stage's run-history row (written when the
        // stage is done with the key) against the one before; the enricher's without
        // its calls.
        let marks: Vec<(String, String, f64)> = sqlx::query_as(
            "SELECT idempotency_key, stage, (EXTRACT(EPOCH FROM min(recorded_at)) * 1000)::float8 FROM run_history
              WHERE pipeline = $1 AND status IN ('forwarded', 'enriched', 'published') GROUP BY 1, 2",
        )
        .bind(&p)
        .fetch_all(&pool)
        .await?;
        let mut at: HashMap<String, [Option<f64>; 3]> = HashMap::new();
        for (key, stage, ms) in marks {
            let i = match stage.as_str() {
                "ingest-dedup" => 0,
                "enricher" => 1,
                _ => 2,
            };
            at.entry(key).or_default()[i] = Some(ms);
        }
        let mut segments: [Vec<i64>; 3] = Default::default();
        for (key, [ingest, enricher, publisher]) in &at {
            let (Some(source), Some(ingest), Some(enricher), Some(publisher)) =
                (produced_at.get(key), ingest, enricher, publisher)
            else {
                continue;
            };
            let calls = call_ms.get(key).copied().unwrap_or(0.0);
            segments[0].push((ingest - *source as f64).round() as i64);
            segments[1].push((enricher - ingest - calls).round() as i64);
            segments[2].push((publisher - enricher).round() as i64);
        }
        let by_stage: Vec<Value> = ["ingest-dedup", "enricher (without its calls)", "publisher"]
            .iter()
            .zip(segments.iter_mut())
            .map(|(stage, v)| {
                v.sort_unstable();
                json!({"stage": stage, "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)})
            })
            .collect();
        let (mut latencies, mut added): (Vec<i64>, Vec<i64>) = output
            .iter()
            .filter_map(|m| {
                let key = header(m, headers::IDEMPOTENCY_KEY)?;
                let end_to_end = m.timestamp().to_millis()? - produced_at.get(&key)?;
                let calls = call_ms.get(&key).copied().unwrap_or(0.0).round() as i64;
                Some((end_to_end, end_to_end - calls))
            })
            .unzip();
        latencies.sort_unstable();
        added.sort_unstable();
        // How many of the key rows' updates stayed on their page (HOT: no index entry).
        let (updates, hot): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(n_tup_upd), 0)::int8, coalesce(sum(n_tup_hot_upd), 0)::int8
               FROM pg_stat_user_tables WHERE relname = 'enrich_state'",
        )
        .fetch_one(&pool)
        .await?;
        let database = if per_stage_roles {
            measure::statements(&mut admin, &db_name, scenario.records).await?
        } else {
            Value::Null
        };
        pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")))
            .execute(&mut admin)
            .await;
        let t = &settings.topics;
        crate::kafka_io::delete_topics(
            &settings,
            &[source.as_str(), &t.requests, &t.retry, &t.results, &t.output, &t.dlq],
        )
        .await;

        let mean_ms =
            llm_sim::Latency::parse(&scenario.latency).map_err(anyhow::Error::msg)?.mean().as_secs_f64() * 1000.0;
        let bound = if mean_ms > 0.0 { scenario.in_flight as f64 / (mean_ms / 1000.0) } else { f64::INFINITY };
        let throughput = scenario.records as f64 / window.max(1e-3);
        let unique_rate = unique as f64 / window.max(1e-3);
        let per_record = |x: f64| x / scenario.records.max(1) as f64;
        Ok(json!({
            "scenario": scenario.name,
            "records": scenario.records,
            "unique": unique,
            "partitions": scenario.partitions,
            "latency": scenario.latency,
            "mean_llm_latency_ms": mean_ms,
            "in_flight": scenario.in_flight,
            "ordering": scenario.ordering,
            "paced_per_second": match scenario.pace { Pace::PerSecond(r) => Some(r), Pace::Unlimited => None },
            "elapsed_seconds": window,
            "throughput_records_per_s": throughput,
            "bound_records_per_s": if bound.is_finite() { Some(bound) } else { None },
            "efficiency": if bound.is_finite() { Some(throughput / bound) } else { None },
            "llm_utilisation": if bound.is_finite() { Some(unique_rate / bound) } else { None },
            "latency_ms": {"p50": percentile(&latencies, 0.5), "p95": percentile(&latencies, 0.95), "p99": percentile(&latencies, 0.99)},
            // End to end minus the key's own LLM call time: what the pipeline adds.
            "added_latency_ms": {"p50": percentile(&added, 0.5), "p95": percentile(&added, 0.95), "p99": percentile(&added, 0.99)},
            "added_latency_by_stage_ms": by_stage,
            "publisher_batch_phases": phases,
            "machine_cpu_ms_per_record": machine_cpu_seconds.map(|s| per_record(s * 1000.0)),
            "machine_busy_share": machine_busy,
            "machine_cpu_by_command": by_command,
            "key_row_updates_per_record": per_record(updates as f64),
            "key_row_hot_share": if updates > 0 { Some(hot as f64 / updates as f64) } else { None },
            "wal_bytes_per_record": per_record(wal_bytes),
            "database_by_stage": database,
            "outputs": output.len(),
            "published": acct.published,
            "llm_calls_audit": acct.llm_calls,
            "llm_calls_served": sim_calls,
            "llm_calls_per_unique_key": sim_calls as f64 / unique as f64,
            "stages": usage_by_stage,
        }))
    }
}

/// The markdown table of a bench run.
pub fn markdown(results: &[Value]) -> String {
    let mut out = String::from(
        "| scenario | records | LLM latency | in-flight | ordering | records/s | bound/s | efficiency | p50 / p95 / p99 ms | calls per key | CPU s (ingest / enricher / publisher) | peak RSS MB (ingest / enricher / publisher) |\n\
         |---|---:|---|---:|---|---:|---:|---:|---|---:|---|---|\n",
    );
    for r in results {
        let stage = |name: &str, field: &str| {
            r["stages"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["stage"] == name))
                .and_then(|s| s[field].as_f64())
                .unwrap_or(f64::NAN)
        };
        let opt = |v: &Value, digits: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.digits$}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} / {} / {} | {:.2} | {:.1} / {:.1} / {:.1} | {:.0} / {:.0} / {:.0} |\n",
            r["scenario"].as_str().unwrap_or(""),
            r["records"],
            r["latency"].as_str().unwrap_or(""),
            r["in_flight"],
            r["ordering"].as_str().unwrap_or(""),
            r["throughput_records_per_s"].as_f64().unwrap_or(0.0),
            opt(&r["bound_records_per_s"], 0),
            opt(&r["efficiency"], 2),
            r["latency_ms"]["p50"],
            r["latency_ms"]["p95"],
            r["latency_ms"]["p99"],
            r["llm_calls_per_unique_key"].as_f64().unwrap_or(0.0),
            stage("ingest-dedup", "cpu_seconds"),
            stage("enricher", "cpu_seconds"),
            stage("publisher", "cpu_seconds"),
            stage("ingest-dedup", "peak_rss_mb"),
            stage("enricher", "peak_rss_mb"),
            stage("publisher", "peak_rss_mb"),
        ));
    }
    out.push_str(
        "\n| scenario | unique calls/s | LLM-slot utilisation | added latency p50 / p95 / p99 ms | machine CPU ms per record | machine busy | PostgreSQL statements per record (ingest / enricher / publisher) | rows per record | WAL bytes per record |\n\
         |---|---:|---:|---|---:|---:|---|---|---|\n",
    );
    for r in results {
        let db = |field: &str| {
            let values: Vec<String> = r["database_by_stage"]
                .as_array()
                .map(|a| a.iter().map(|s| s[field].as_f64().map_or("–".into(), |x| format!("{x:.1}"))).collect())
                .unwrap_or_default();
            if values.is_empty() { "–".to_string() } else { values.join(" / ") }
        };
        let unique_rate = r["unique"].as_f64().unwrap_or(0.0) / r["elapsed_seconds"].as_f64().unwrap_or(1.0).max(1e-3);
        let opt = |v: &Value, digits: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.digits$}"));
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} / {} / {} | {} | {} | {} | {} | {} (server {:.0}) |\n",
            r["scenario"].as_str().unwrap_or(""),
            unique_rate,
            opt(&r["llm_utilisation"], 2),
            r["added_latency_ms"]["p50"],
            r["added_latency_ms"]["p95"],
            r["added_latency_ms"]["p99"],
            opt(&r["machine_cpu_ms_per_record"], 2),
            opt(&r["machine_busy_share"], 2),
            db("statements_per_record"),
            db("rows_per_record"),
            db("wal_bytes_per_record"),
            r["wal_bytes_per_record"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    out
}

pub fn write_results(out_dir: &Path, results: &[Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("bench.json"), serde_json::to_string_pretty(&json!({"results": results}))?)?;
    std::fs::write(out_dir.join("bench.md"), markdown(results))?;
    Ok(())
}
