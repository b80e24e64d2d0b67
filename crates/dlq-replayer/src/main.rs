//! dlq-replayer [--config PATH]                 serve the admin API
//! dlq-replayer setup [--config PATH]           migrations and topics, then exit
//! dlq-replayer list [--reason R] [--stage S] [--key K] [--status dead|replayed|discarded] [--api URL]
//! dlq-replayer show ID [--api URL]
//! dlq-replayer replay (--ids 1,2 | --reason R | --stage S | --key K) [--dry-run] [--note TEXT] [--api URL]
//! dlq-replayer discard ID [--note TEXT] [--api URL]
//! dlq-replayer history KEY [--api URL] [--json]
//! dlq-replayer pause [--note REASON] [--api URL] | dlq-replayer resume [--api URL]

use dlq_replayer::cli::{Client, table, timeline};
use dlq_replayer::replay::Filter;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("setup") => enrich_common::cli::run_once("dlq-replayer", dlq_replayer::setup).await,
        Some(cmd @ ("list" | "show" | "replay" | "discard" | "history" | "pause" | "resume")) => {
            match client_command(cmd, &args[1..]).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dlq-replayer {cmd}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => enrich_common::cli::run_service("dlq-replayer", dlq_replayer::run).await,
    }
}

async fn client_command(cmd: &str, args: &[String]) -> anyhow::Result<()> {
    let mut filter = Filter::default();
    let (mut api, mut note, mut dry_run, mut status, mut id) = (None, None, false, "dead".to_string(), None);
    let (mut key, mut json) = (None, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| anyhow::anyhow!("{name} needs a value"));
        match a.as_str() {
            "--api" => api = Some(value("--api")?),
            "--reason" => filter.reason = Some(value("--reason")?),
            "--stage" => filter.stage = Some(value("--stage")?),
            "--key" => filter.key = Some(value("--key")?),
            "--from" => filter.from = Some(value("--from")?),
            "--to" => filter.to = Some(value("--to")?),
            "--status" => status = value("--status")?,
            "--note" => note = Some(value("--note")?),
            "--dry-run" => dry_run = true,
            "--json" => json = true,
            other if cmd == "history" && key.is_none() && !other.starts_with('-') => key = Some(other.to_string()),
            "--ids" => {
                let ids: Result<Vec<i64>, _> = value("--ids")?.split(',').map(|s| s.trim().parse::<i64>()).collect();
                filter.ids = Some(ids.map_err(|e| anyhow::anyhow!("--ids: {e}"))?);
            }
            other if id.is_none() && !other.starts_with('-') => {
                id = Some(other.parse::<i64>().map_err(|e| anyhow::anyhow!("id {other:?}: {e}"))?)
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let client = Client::from_env(api);
    match cmd {
        "list" => print!("{}", table(&client.list(&status, &filter).await?)),
        "show" => {
            let id = id.ok_or_else(|| anyhow::anyhow!("show needs an id"))?;
            println!("{}", serde_json::to_string_pretty(&client.show(id).await?)?);
        }
        "replay" => {
            if let Some(id) = id {
                filter.ids = Some(vec![id]);
            }
            // A dry run first, always: say what would happen, then do it.
            let preview = client.replay(&filter, true, note.as_deref()).await?;
            println!(
                "{} matched: {} to replay, {} refused",
                preview.matched,
                preview.replayed.len(),
                preview.refused.len()
            );
            for r in &preview.refused {
                println!("  refused {} ({}): {}", r.id, r.idempotency_key, r.why);
            }
            if dry_run {
                return Ok(());
            }
            // The previewed ids, a chunk at a time, with progress.
            let total = preview.replayed.len();
            let started = std::time::Instant::now();
            let (mut replayed, mut refused) = (0usize, preview.refused.len());
            for chunk in preview.replayed.chunks(200) {
                let by_id = dlq_replayer::replay::Filter { ids: Some(chunk.to_vec()), ..Default::default() };
                let done = client.replay(&by_id, false, note.as_deref()).await?;
                replayed += done.replayed.len();
                refused += done.refused.len();
                let rate = replayed as f64 / started.elapsed().as_secs_f64().max(0.001);
                eprintln!("replayed {replayed}/{total} ({rate:.0}/s)");
            }
            println!("replayed {replayed}, refused {refused}");
        }
        "pause" | "resume" => {
            let state = client.set_paused(cmd == "pause", note.as_deref()).await?;
            println!(
                "enrichment {} ({})",
                if state["paused"].as_bool() == Some(true) { "paused" } else { "running" },
                state["reason"].as_str().unwrap_or("")
            );
        }
        "history" => {
            let key = key.ok_or_else(|| anyhow::anyhow!("history needs an idempotency key"))?;
            let h = client.history(&key).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print!("{}", timeline(&h));
            }
        }
        "discard" => {
            let id = id.ok_or_else(|| anyhow::anyhow!("discard needs an id"))?;
            client.discard(id, note.as_deref()).await?;
            println!("discarded {id}");
        }
        _ => unreachable!("matched above"),
    }
    Ok(())
}
