//! The command line every stage shares: `--config PATH` (or `ENRICH_CONFIG`; default
//! `config/pipeline.toml`).

use std::path::PathBuf;

use crate::config::Settings;

pub fn config_path_from_args() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args().skip(1);
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
    let path = config_path_from_args()?;
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
    crate::telemetry::init(service);
    let settings = match load_settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start");
            eprintln!("{service}: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(settings, crate::shutdown::on_signals()).await {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped on error");
            eprintln!("{service}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
