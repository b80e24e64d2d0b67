//! `llm-sim [--bind ADDR] [--port N] [--latency-ms N]`; also LLM_SIM_PORT, LLM_SIM_LATENCY_MS.

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    enrich_common::telemetry::init("llm-sim");
    let mut bind = std::env::var("LLM_SIM_BIND").unwrap_or_else(|_| "0.0.0.0".into());
    let mut port: u16 = env_number("LLM_SIM_PORT")?.unwrap_or(8080);
    let mut latency_ms: u64 = env_number("LLM_SIM_LATENCY_MS")?.unwrap_or(0);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match arg.as_str() {
            "--bind" => bind = value("--bind")?,
            "--port" => {
                port = value("--port")?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--port: {e}"))?
            }
            "--latency-ms" => {
                latency_ms = value("--latency-ms")?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--latency-ms: {e}"))?
            }
            "-h" | "--help" => {
                println!(
                    "llm-sim [--bind ADDR] [--port N] [--latency-ms N]\nAn OpenAI-compatible simulator (not a model)."
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let shutdown = enrich_common::shutdown::on_signals();
    let config = llm_sim::SimConfig {
        latency: Duration::from_millis(latency_ms),
        ..Default::default()
    };
    let sim = llm_sim::start(&bind, port, config, shutdown).await?;
    tracing::info!(addr = %sim.addr, latency_ms, "llm-sim listening");
    sim.handle.await?;
    Ok(())
}

fn env_number<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        Err(_) => Ok(None),
    }
}
