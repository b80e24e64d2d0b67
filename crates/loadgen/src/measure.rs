//! What `loadgen bench` measures besides throughput and latency: the machine's CPU over
//! a run (every process, from /proc/stat), and PostgreSQL's work per stage
//! (statements, rows and WAL bytes from `pg_stat_statements`, each stage connected as
//! its own role so the view tells them apart).

use serde_json::{Value, json};
use sqlx::PgConnection;

/// Busy and total CPU time of the whole machine so far, in clock ticks (/proc/stat).
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
}

/// Clock ticks per second as /proc reports them (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

impl MachineCpu {
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse_cpu_line(stat.lines().next()?)
    }

    /// CPU seconds the machine spent busy since `earlier` (all cores together).
    pub fn busy_seconds_since(&self, earlier: &MachineCpu) -> f64 {
        self.busy.saturating_sub(earlier.busy) as f64 / TICKS_PER_SECOND
    }

    /// The share of the machine's CPU time (all cores) that was busy since `earlier`.
    pub fn busy_share_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 { 0.0 } else { self.busy.saturating_sub(earlier.busy) as f64 / total as f64 }
    }
}

/// The aggregate `cpu` line: user nice system idle iowait irq softirq steal …; idle and
/// iowait are not busy, guest time is already inside user.
fn parse_cpu_line(line: &str) -> Option<MachineCpu> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if values.len() < 5 {
        return None;
    }
    let total: u64 = values.iter().sum();
    let idle = values[3] + values[4];
    Some(MachineCpu { busy: total - idle, total })
}

/// CPU ticks (user + system) so far of every running process, summed by command name
/// (`java` is the broker, `postgres` every PostgreSQL process).
pub fn cpu_by_command() -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if let Some((command, ticks)) = parse_process_stat(&stat) {
            *out.entry(command).or_insert(0) += ticks;
        }
    }
    out
}

/// CPU seconds per command name between two [`cpu_by_command`] readings, largest first.
pub fn cpu_seconds_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = after
        .iter()
        .map(|(c, t)| (c.clone(), t.saturating_sub(before.get(c).copied().unwrap_or(0)) as f64 / TICKS_PER_SECOND))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// (command, utime + stime) from a /proc/PID/stat line; the command may hold spaces
/// and parentheses, so it ends at the last ')'.
fn parse_process_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let command = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((command, ticks))
}

/// Mean milliseconds per publisher batch phase, from its `/metrics`
/// (`enrich_publisher_batch_phase_seconds{phase=...}` sums and counts).
pub async fn publisher_phases(port: u16) -> Value {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else { return Value::Null };
    let Ok(text) = response.text().await else { return Value::Null };
    phases_of(&text)
}

fn phases_of(metrics: &str) -> Value {
    let mut sums: std::collections::BTreeMap<String, (f64, f64)> = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("enrich_publisher_batch_phase_seconds_") else { continue };
        let (kind, rest) = rest.split_once('{').unwrap_or(("", rest));
        let Some(phase) = rest.split("phase=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let e = sums.entry(phase.to_string()).or_default();
        match kind {
            "sum" => e.0 += value,
            "count" => e.1 += value,
            _ => {}
        }
    }
    let batches = sums.get("bind").map_or(0.0, |e| e.1);
    json!({
        "batches": batches,
        "mean_ms": sums.iter().filter(|(_, (_, n))| *n > 0.0).map(|(p, (s, n))| (p.clone(), json!(s / n * 1000.0))).collect::<serde_json::Map<_, _>>(),
    })
}

/// The role each stage connects as during a bench run (created by deploy/local/stack.sh).
pub const STAGE_ROLES: [(&str, &str); 3] = [
    ("ingest-dedup", "enrich_bench_ingest"),
    ("enricher", "enrich_bench_enricher"),
    ("publisher", "enrich_bench_publisher"),
];

/// `url` with its user replaced by `user` (the password kept), or None when the URL
/// names no user.
pub fn with_user(url: &str, user: &str) -> Option<String> {
    let scheme_end = url.find("://")? + 3;
    let at = url[scheme_end..].find('@')? + scheme_end;
    let userinfo = &url[scheme_end..at];
    let password = userinfo.find(':').map(|i| &userinfo[i..]).unwrap_or("");
    Some(format!("{}{user}{password}{}", &url[..scheme_end], &url[at..]))
}

/// Whether per-stage roles and pg_stat_statements are there; when they are, gives the
/// roles the tables of the scratch database `db` (already migrated by its owner).
pub async fn prepare(admin: &mut PgConnection, db: &mut PgConnection) -> anyhow::Result<bool> {
    let (roles, statements): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)),
                EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_stat_statements')",
    )
    .bind(STAGE_ROLES.iter().map(|(_, r)| r.to_string()).collect::<Vec<_>>())
    .fetch_one(&mut *admin)
    .await?;
    if roles != STAGE_ROLES.len() as i64 || !statements {
        return Ok(false);
    }
    let names = STAGE_ROLES.iter().map(|(_, r)| *r).collect::<Vec<_>>().join(", ");
    for grant in [
        format!("GRANT USAGE ON SCHEMA public TO {names}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {names}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {names}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(grant)).execute(&mut *db).await?;
    }
    Ok(true)
}

/// What PostgreSQL did for database `db_name` during the run: per stage (role), the
/// statements executed, rows they returned or changed and WAL bytes they wrote, with
/// the few statements that ran most often; `per_record` divides by `records`.
pub async fn statements(admin: &mut PgConnection, db_name: &str, records: usize) -> anyhow::Result<Value> {
    let rows: Vec<(String, String, i64, i64, f64)> = sqlx::query_as(
        "SELECT r.rolname, s.query, s.calls, s.rows, s.wal_bytes::float8
           FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
          WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = $1)
          ORDER BY s.calls DESC",
    )
    .bind(db_name)
    .fetch_all(&mut *admin)
    .await?;
    let n = records.max(1) as f64;
    let mut stages = Vec::new();
    for (stage, role) in STAGE_ROLES {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == role).collect();
        let calls: i64 = mine.iter().map(|r| r.2).sum();
        let changed: i64 = mine.iter().map(|r| r.3).sum();
        let wal: f64 = mine.iter().map(|r| r.4).sum();
        let top: Vec<Value> = mine
            .iter()
            .take(6)
            .map(|r| json!({"calls_per_record": r.2 as f64 / n, "query": one_line(&r.1, 160)}))
            .collect();
        stages.push(json!({
            "stage": stage,
            "statements_per_record": calls as f64 / n,
            "rows_per_record": changed as f64 / n,
            "wal_bytes_per_record": wal / n,
            "top": top,
        }));
    }
    Ok(json!(stages))
}

fn one_line(query: &str, max: usize) -> String {
    let flat = query.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

/// WAL written by the whole server between two `pg_current_wal_lsn()` readings, bytes.
pub async fn wal_lsn(admin: &mut PgConnection) -> anyhow::Result<String> {
    let (lsn,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text").fetch_one(admin).await?;
    Ok(lsn)
}

pub async fn wal_bytes_between(admin: &mut PgConnection, from: &str) -> anyhow::Result<f64> {
    let (bytes,): (f64,) = sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
        .bind(from)
        .fetch_one(admin)
        .await?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_line_counts_idle_and_iowait_as_not_busy() {
        let cpu = parse_cpu_line("cpu  100 5 50 1000 20 3 2 0 0 0").unwrap();
        assert_eq!(cpu.total, 1180);
        assert_eq!(cpu.busy, 160);
        assert!(parse_cpu_line("cpu0 1 2 3 4 5").is_none());
        let later = MachineCpu { busy: 260, total: 1380 };
        assert!((later.busy_seconds_since(&cpu) - 1.0).abs() < 1e-9);
        assert!((later.busy_share_since(&cpu) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_process_stat_line_gives_its_command_and_cpu_ticks() {
        let line = "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_process_stat(line), Some(("tokio (rt) x".to_string(), 280)));
        let before = std::collections::HashMap::from([("java".to_string(), 100)]);
        let after = std::collections::HashMap::from([("java".to_string(), 350), ("postgres".to_string(), 500)]);
        assert_eq!(cpu_seconds_between(&before, &after), vec![("postgres".into(), 5.0), ("java".into(), 2.5)]);
    }

    #[test]
    fn publisher_phases_are_read_from_the_metrics_text() {
        let text = "enrich_publisher_batch_phase_seconds_sum{phase=\"bind\"} 0.5\n\
                    enrich_publisher_batch_phase_seconds_count{phase=\"bind\"} 10\n\
                    enrich_publisher_batch_phase_seconds_bucket{le=\"0.001\",phase=\"bind\"} 1\n\
                    enrich_publisher_batch_phase_seconds_sum{phase=\"commit\"} 0.2\n\
                    enrich_publisher_batch_phase_seconds_count{phase=\"commit\"} 10\n";
        let v = phases_of(text);
        assert_eq!(v["batches"], 10.0);
        assert!((v["mean_ms"]["bind"].as_f64().unwrap() - 50.0).abs() < 1e-9);
        assert!((v["mean_ms"]["commit"].as_f64().unwrap() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn the_user_is_replaced_and_the_password_kept() {
        assert_eq!(
            with_user("postgres://enrich:secret@127.0.0.1:5432/db?sslmode=prefer", "enrich_bench_ingest").as_deref(),
            Some("postgres://enrich_bench_ingest:secret@127.0.0.1:5432/db?sslmode=prefer")
        );
        assert_eq!(with_user("postgres://u@h/db", "v").as_deref(), Some("postgres://v@h/db"));
        assert_eq!(with_user("postgres://h/db", "v"), None);
    }
}
