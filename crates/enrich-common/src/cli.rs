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
                path = Some(
                    args.next()
                        .ok_or_else(|| anyhow::anyhow!("--config needs a path"))?
                        .into(),
                );
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
