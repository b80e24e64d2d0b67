//! Running the topology's binaries as processes (bench, chaos): ports, readiness,
//! signals, a graceful stop, and llm-sim's own count of what it served.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Waits until `http://127.0.0.1:{port}{path}` answers 2xx; fails when the process
/// exits first or `limit` passes.
pub async fn wait_up(port: u16, path: &str, child: &mut Child, name: &str, limit: Duration) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{name} exited ({status}) before it was up");
        }
        if started.elapsed() > limit {
            anyhow::bail!("{name} not up on {url} after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM to each (the last started first), then waits for each to drain; one still
/// running after 30 s is killed.
pub fn stop(children: Vec<Child>) {
    for c in children.iter().rev() {
        signal(c.id(), "TERM");
    }
    for mut c in children {
        let started = Instant::now();
        while matches!(c.try_wait(), Ok(None)) {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.wait();
    }
}

/// llm-sim's count of completions served, from its `/metrics` at `base` (`http://host:port`).
pub async fn sim_completions(base: &str) -> Option<u64> {
    let text = reqwest::get(format!("{}/metrics", base.trim_end_matches('/'))).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("llm_sim_completions_total ")).and_then(|v| v.trim().parse().ok())
}
