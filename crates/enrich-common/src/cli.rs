//! The command line every stage shares: `--config PATH` (or `ENRICH_CONFIG`; default
//! `config/pipeline.toml`).

use std::path::PathBuf;

use crate::config::Settings;

pub fn config_path_from_args() -> anyhow::Result<PathBuf> {
    config_path_from(std::env::args().skip(1))
}

/// `--config PATH` from these arguments (a subcommand already taken off).
pub fn config_path_from(args: impl Iterator<Item = String>) -> anyhow::Result<PathBuf> {
    let mut args = args;
    let mut path = std::env::var("ENRICH_CONFIG").ok().map(PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                path = Some(args.next().ok_or_else(|| anyhow::anyhow!("--config needs a path"))?.into());
            }
            s if s.starts_with("--config=") => path = Some(s["--config=".len()..].into()),
            "-h" | "--help" => {
                println!(
                    "usage: {} [--config PATH]\n\nPATH defaults to $ENRICH_CONFIG, then config/pipeline.toml.\nAny key can be overridden by ENRICH_<SECTION>__<KEY>.",
                    std::env::args().next().unwrap_or_default()
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(path.unwrap_or_else(|| PathBuf::from("config/pipeline.toml")))
}

/// Loads and validates the settings named on the command line.
pub fn load_settings() -> anyhow::Result<Settings> {
    load_settings_from(std::env::args().skip(1))
}

/// Loads and validates the settings named by these arguments.
pub fn load_settings_from(args: impl Iterator<Item = String>) -> anyhow::Result<Settings> {
    let path = config_path_from(args)?;
    let settings = Settings::load(&path)?;
    tracing::info!(config = %path.display(), pipeline = %settings.pipeline.name, "configuration loaded");
    Ok(settings)
}

/// The whole `main` of a stage: logs, settings, run until SIGTERM/SIGINT. Errors are
/// logged with their cause chain (and printed once to stderr) instead of panicking;
/// exit code 2 for bad configuration, 1 for a failure while running.
pub async fn run_service<F, Fut>(service: &'static str, run: F) -> std::process::ExitCode
where
    F: FnOnce(Settings, crate::shutdown::Shutdown) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    if let Some(code) = probe_from_args() {
        return code;
    }
    let telemetry = match crate::telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start");
            eprintln!("{service}: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let settings = match load_settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start");
            eprintln!("{service}: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let code = match run(settings, crate::shutdown::on_signals()).await {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped on error");
            eprintln!("{service}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // The spans of the last records leave before the process does.
    telemetry.shutdown();
    code
}

/// `SERVICE --probe http://127.0.0.1:PORT/PATH`: a health check for containers that have
/// no curl (exit 0 on a 2xx answer). Returns None when the arguments ask for no probe.
pub fn probe_from_args() -> Option<std::process::ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("--probe") {
        return None;
    }
    let url = args.next().unwrap_or_default();
    Some(match probe(&url) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe {url}: {e}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// One plain HTTP/1.0 GET with a 2-second timeout; Ok on a 2xx status.
pub fn probe(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("only http:// URLs"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)?.next().ok_or_else(|| anyhow::anyhow!("no address"))?;
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') { Ok(()) } else { anyhow::bail!("status {code}") }
}

/// A one-shot command (`dlq-replayer setup`): logs, settings from the arguments after
/// the subcommand, run, exit code as in [`run_service`].
pub async fn run_once<F, Fut>(service: &'static str, run: F) -> std::process::ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init_logs(service);
    let settings = match load_settings_from(std::env::args().skip(2)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{service}: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "failed");
            eprintln!("{service}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
