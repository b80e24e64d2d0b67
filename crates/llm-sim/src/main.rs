//! `llm-sim [--bind ADDR] [--port N] [--latency SPEC | --latency-ms N]`; also LLM_SIM_BIND,
//! LLM_SIM_PORT, LLM_SIM_LATENCY (SPEC) and LLM_SIM_LATENCY_MS.
//! SPEC: fixed:MS, uniform:MIN-MAX, lognormal:MEDIAN,SIGMA[,SHARE:TAIL_MS].

use llm_sim::Latency;

const HELP: &str =
    "llm-sim [--bind ADDR] [--port N] [--latency SPEC | --latency-ms N] [--rate-429 F] [--rate-500 F] [--rate-hang F] [--no-markers]
        [--rpm N] [--tpm N] [--burst-secs F] [--undeclared-limits] [--unavailable-model NAME]...
An OpenAI-compatible simulator (not a model): deterministic answers from the ticket text.
Markers in the text such as [[sim:always-500]] inject faults (see crates/llm-sim/src/faults.rs).
--rpm/--tpm: requests/tokens per minute, answered 429 with Retry-After and x-ratelimit-* headers
beyond them; --burst-secs: seconds of allowance a bucket holds (default 60);
--undeclared-limits: no x-ratelimit-* headers (Retry-After alone).
--unavailable-model: that model is answered 503 (529 on /v1/messages).
SPEC: fixed:MS | uniform:MIN-MAX | lognormal:MEDIAN,SIGMA[,SHARE:TAIL_MS]  (milliseconds)";

fn parse_latency(spec: &str) -> anyhow::Result<Latency> {
    Latency::parse(spec).map_err(|e| anyhow::anyhow!("--latency: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Some(code) = enrich_common::cli::probe_from_args() {
        std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
    }
    enrich_common::telemetry::init_logs("llm-sim");
    let mut bind = std::env::var("LLM_SIM_BIND").unwrap_or_else(|_| "0.0.0.0".into());
    let mut port: u16 = match std::env::var("LLM_SIM_PORT") {
        Ok(v) => v.parse().map_err(|e| anyhow::anyhow!("LLM_SIM_PORT={v:?}: {e}"))?,
        Err(_) => 8080,
    };
    let mut latency = match (std::env::var("LLM_SIM_LATENCY"), std::env::var("LLM_SIM_LATENCY_MS")) {
        (Ok(spec), _) => parse_latency(&spec)?,
        (_, Ok(ms)) => parse_latency(&format!("fixed:{ms}"))?,
        _ => Latency::default(),
    };
    let mut faults = llm_sim::Faults::default();
    let mut limits = llm_sim::RateLimits::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow::anyhow!("{name} needs a value"));
        match arg.as_str() {
            "--bind" => bind = value("--bind")?,
            "--port" => port = value("--port")?.parse().map_err(|e| anyhow::anyhow!("--port: {e}"))?,
            "--latency" => latency = parse_latency(&value("--latency")?)?,
            "--latency-ms" => latency = parse_latency(&format!("fixed:{}", value("--latency-ms")?))?,
            "--rate-hang" => {
                faults.rate_hang = value("--rate-hang")?.parse().map_err(|e| anyhow::anyhow!("--rate-hang: {e}"))?
            }
            "--rate-429" => {
                faults.rate_429 = value("--rate-429")?.parse().map_err(|e| anyhow::anyhow!("--rate-429: {e}"))?
            }
            "--rate-500" => {
                faults.rate_500 = value("--rate-500")?.parse().map_err(|e| anyhow::anyhow!("--rate-500: {e}"))?
            }
            "--no-markers" => faults.markers = false,
            "--rpm" => limits.rpm = value("--rpm")?.parse().map_err(|e| anyhow::anyhow!("--rpm: {e}"))?,
            "--tpm" => limits.tpm = value("--tpm")?.parse().map_err(|e| anyhow::anyhow!("--tpm: {e}"))?,
            "--burst-secs" => {
                limits.burst_secs = value("--burst-secs")?.parse().map_err(|e| anyhow::anyhow!("--burst-secs: {e}"))?
            }
            "--undeclared-limits" => limits.declare = false,
            "--unavailable-model" => faults.unavailable_models.push(value("--unavailable-model")?),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    limits.validate().map_err(|e| anyhow::anyhow!("--burst-secs: {e}"))?;
    let shutdown = enrich_common::shutdown::on_signals();
    let mean_ms = latency.mean().as_secs_f64() * 1000.0;
    let config = llm_sim::SimConfig { latency: latency.clone(), faults, limits, ..Default::default() };
    let sim = llm_sim::start(&bind, port, config, shutdown).await?;
    tracing::info!(addr = %sim.addr, latency = ?latency, mean_ms, rpm = limits.rpm, tpm = limits.tpm, "llm-sim listening");
    sim.handle.await?;
    Ok(())
}
