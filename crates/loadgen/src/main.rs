//! `loadgen demo [--config PATH] [--unique N] [--duplicates N] [--malformed N] [--timeout-secs N]`
//! `loadgen traces [--otlp ADDR] [--http ADDR]`: a local OTLP receiver and text trace viewer.
//!
//! Produces a sample of support tickets (with duplicates and malformed records) to the
//! pipeline's source topic, follows the running stages until every record is accounted
//! for, then prints a summary and three enriched records.

use enrich_common::{Settings, headers, kafka};
use loadgen::accounting::{Accounting, account};
use loadgen::bench::Scenario;
use loadgen::kafka_io::{Pace, header, produce_all, read_to_end};
use loadgen::workload::{Spec, build};
use rdkafka::Message;
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Args {
    config: PathBuf,
    unique: usize,
    duplicates: usize,
    malformed: usize,
    timeout: Duration,
    /// Fail unless every unique ticket was enriched and published (none dead-lettered).
    strict: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("demo") => {}
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        Some(other) => anyhow::bail!("unknown command {other:?} (try --help)"),
    }
    let mut out = Args {
        config: PathBuf::from("config/pipeline.toml"),
        unique: 900,
        duplicates: 90,
        malformed: 10,
        timeout: Duration::from_secs(300),
        strict: false,
    };
    while let Some(flag) = args.next() {
        if flag == "--strict" {
            out.strict = true;
            continue;
        }
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        let number = || value.parse::<usize>().map_err(|e| anyhow::anyhow!("{flag} {value:?}: {e}"));
        match flag.as_str() {
            "--config" => out.config = PathBuf::from(&value),
            "--unique" => out.unique = number()?,
            "--duplicates" => out.duplicates = number()?,
            "--malformed" => out.malformed = number()?,
            "--timeout-secs" => out.timeout = Duration::from_secs(number()? as u64),
            other => anyhow::bail!("unknown flag {other:?} (try --help)"),
        }
    }
    if out.unique == 0 {
        anyhow::bail!("--unique must be at least 1");
    }
    Ok(out)
}

const USAGE: &str = "usage:
  loadgen demo  [--config PATH] [--unique N] [--duplicates N] [--malformed N] [--timeout-secs N] [--strict]
  loadgen bench [--config PATH] [--bin-dir DIR] [--out DIR] [--only NAME,NAME] [--scale F]
  loadgen chaos [--short] [--records N] [--seed N] [--only NAME,NAME] [--bin-dir DIR] [--out DIR]
  loadgen traces [--otlp 127.0.0.1:4317] [--http 127.0.0.1:16687]   a local OTLP receiver and trace viewer";

/// The benchmark scenarios of `make bench` (issue targets: 20,000 tickets, 16 partitions,
/// 20% duplicates, in-flight 256).
fn bench_scenarios(scale: f64) -> Vec<Scenario> {
    let n = |records: usize| ((records as f64 * scale).round() as usize).max(100);
    let s =
        |name: &str, records: usize, latency: &str, in_flight: usize, ordering: &'static str, pace: Pace| Scenario {
            name: name.to_string(),
            records: n(records),
            duplicate_share: 0.2,
            partitions: 16,
            latency: latency.to_string(),
            in_flight,
            ordering,
            pace,
            padding: 0,
        };
    vec![
        s("fixed-200ms", 20_000, "fixed:200", 256, "key", Pace::Unlimited),
        s("fixed-0ms", 20_000, "fixed:0", 256, "key", Pace::Unlimited),
        s("lognormal-tail", 20_000, "lognormal:200,0.5,0.01:20000", 256, "key", Pace::Unlimited),
        s("one-per-partition", 2_000, "fixed:200", 256, "partition", Pace::Unlimited),
        s("inflight-32", 2_560, "fixed:200", 32, "key", Pace::Unlimited),
        s("inflight-64", 5_120, "fixed:200", 64, "key", Pace::Unlimited),
        s("inflight-128", 10_240, "fixed:200", 128, "key", Pace::Unlimited),
        s("paced-600rps", 6_000, "fixed:200", 256, "key", Pace::PerSecond(600.0 * scale.min(1.0))),
        // A hostile corpus for memory, run alone (`--only large-records`): a few hundred
        // records of about 900 KB (the envelopes stay under librdkafka's 1 MB message.max.bytes).
        Scenario {
            duplicate_share: 0.0,
            padding: 900_000,
            ..s("large-records", 300, "fixed:50", 64, "key", Pace::Unlimited)
        },
    ]
}

async fn bench(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut config = PathBuf::from("config/pipeline.toml");
    let mut bin_dir = PathBuf::from("target/release");
    let mut out = PathBuf::from("bench-results");
    let mut only: Option<Vec<String>> = None;
    let mut scale = 1.0;
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => config = value.into(),
            "--bin-dir" => bin_dir = value.into(),
            "--out" => out = value.into(),
            "--only" => only = Some(value.split(',').map(str::to_string).collect()),
            "--scale" => scale = value.parse().map_err(|e| anyhow::anyhow!("--scale {value:?}: {e}"))?,
            other => anyhow::bail!("unknown flag {other:?} (try --help)"),
        }
    }
    let scenarios: Vec<Scenario> = bench_scenarios(scale)
        .into_iter()
        .filter(|s| match &only {
            Some(o) => o.contains(&s.name),
            None => s.padding == 0,
        })
        .collect();
    let runner = loadgen::bench::Bench { config, bin_dir, out_dir: out.clone() };
    let mut results = Vec::new();
    for (i, scenario) in scenarios.iter().enumerate() {
        println!(
            "[bench] {}/{}: {} ({} records, {}, in-flight {}, {})",
            i + 1,
            scenarios.len(),
            scenario.name,
            scenario.records,
            scenario.latency,
            scenario.in_flight,
            scenario.ordering
        );
        let result = runner.run(scenario, i).await?;
        println!(
            "[bench] {}: {:.0} records/s, efficiency {}, p50/p99 {} / {} ms, {:.2} calls per key",
            scenario.name,
            result["throughput_records_per_s"].as_f64().unwrap_or(0.0),
            result["efficiency"].as_f64().map_or("n/a".into(), |e| format!("{e:.2}")),
            result["latency_ms"]["p50"],
            result["latency_ms"]["p99"],
            result["llm_calls_per_unique_key"].as_f64().unwrap_or(0.0),
        );
        results.push(result);
        loadgen::bench::write_results(&out, &results)?;
    }
    println!("\n{}", loadgen::bench::markdown(&results));
    println!("[bench] results in {}/bench.json and bench.md", out.display());
    Ok(())
}

async fn chaos(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut runner = loadgen::chaos::Chaos {
        config: PathBuf::from("config/pipeline.toml"),
        bin_dir: PathBuf::from("target/debug"),
        out_dir: PathBuf::from("chaos-results"),
        stack_script: PathBuf::from("deploy/local/stack.sh"),
        seed: 7,
    };
    let (mut records, mut short, mut only) = (None, false, None::<Vec<String>>);
    while let Some(flag) = args.next() {
        if flag == "--short" {
            short = true;
            continue;
        }
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => runner.config = value.into(),
            "--bin-dir" => runner.bin_dir = value.into(),
            "--out" => runner.out_dir = value.into(),
            "--seed" => runner.seed = value.parse().map_err(|e| anyhow::anyhow!("--seed {value:?}: {e}"))?,
            "--records" => {
                records = Some(value.parse::<usize>().map_err(|e| anyhow::anyhow!("--records {value:?}: {e}"))?)
            }
            "--only" => only = Some(value.split(',').map(str::to_string).collect()),
            other => anyhow::bail!("unknown flag {other:?} (try --help)"),
        }
    }
    let scenarios = if short {
        vec![loadgen::chaos::Scenario::short(records.unwrap_or(3_000))]
    } else {
        loadgen::chaos::Scenario::catalogue(records.unwrap_or(20_000))
            .into_iter()
            .filter(|s| only.as_ref().is_none_or(|o| o.contains(&s.name)))
            .collect()
    };
    std::fs::create_dir_all(&runner.out_dir)?;
    let mut results = Vec::new();
    for (i, scenario) in scenarios.iter().enumerate() {
        println!(
            "[chaos] {}/{}: {} ({} records, seed {}, faults: {})",
            i + 1,
            scenarios.len(),
            scenario.name,
            scenario.records,
            runner.seed.wrapping_add(i as u64),
            scenario.faults.len()
        );
        let started = Instant::now();
        let result = runner.run(scenario, i).await?;
        let violations = result["report"]["violations"].as_array().cloned().unwrap_or_default();
        println!(
            "[chaos] {}: {} violation(s) in {:.0} s",
            scenario.name,
            violations.len(),
            started.elapsed().as_secs_f64()
        );
        for v in &violations {
            println!("[chaos]   {v}");
        }
        results.push(result);
        std::fs::write(runner.out_dir.join("chaos.json"), serde_json::to_string_pretty(&results)?)?;
    }
    let table = loadgen::chaos::markdown(&results);
    std::fs::write(runner.out_dir.join("chaos.md"), &table)?;
    println!("\n{table}");
    let broken: usize = results.iter().map(|r| r["report"]["violations"].as_array().map_or(0, Vec::len)).sum();
    anyhow::ensure!(broken == 0, "{broken} guarantee violation(s); details in {}/chaos.json", runner.out_dir.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if std::env::args().nth(1).as_deref() == Some("bench") {
        return bench(std::env::args().skip(2)).await;
    }
    if std::env::args().nth(1).as_deref() == Some("chaos") {
        return chaos(std::env::args().skip(2)).await;
    }
    if std::env::args().nth(1).as_deref() == Some("traces") {
        let mut args = std::env::args().skip(2);
        let (mut otlp, mut http) = ("127.0.0.1:4317".to_string(), "127.0.0.1:16687".to_string());
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
            match flag.as_str() {
                "--otlp" => otlp = value,
                "--http" => http = value,
                other => anyhow::bail!("unknown flag {other:?} (try --help)"),
            }
        }
        return loadgen::traces::run(otlp.parse()?, http.parse()?).await;
    }
    let args = parse_args()?;
    let settings = Settings::load(&args.config)?;
    let source = settings.pipeline.sources[0].topic.clone();
    let pipeline = settings.pipeline.name.clone();
    let run = format!(
        "demo-{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    );
    let records =
        build(&Spec { run: run.clone(), unique: args.unique, duplicates: args.duplicates, malformed: args.malformed });
    println!(
        "[demo] run {run}: {} records to {source} ({} unique tickets, {} duplicates, {} malformed)",
        records.len(),
        args.unique,
        args.duplicates,
        args.malformed
    );

    kafka::ensure_topics(&settings, &[&source]).await?;
    let pool = enrich_common::db::connect(&settings.database, "loadgen").await?;
    let sim_before = sim_completions(&settings).await;
    let started = Instant::now();
    let produced = produce_all(
        &settings,
        &source,
        &records,
        |i| i % 2 == 0,
        |n| {
            println!("[demo] produced {n}/{}", records.len());
        },
    )
    .await?;

    let mut last = Accounting::default();
    let acct = loop {
        let a = account(&pool, &pipeline, &source, &produced).await?;
        if a != last {
            println!(
                "[demo] read {}/{}  duplicates {}  published {}/{}  dead-lettered {}",
                a.read,
                records.len(),
                a.duplicates,
                a.published,
                a.forwarded,
                a.dead_lettered_at_ingest + a.dead_lettered_at_enricher
            );
            last = a.clone();
        }
        if a.complete(records.len()) {
            break a;
        }
        if started.elapsed() > args.timeout {
            anyhow::bail!(
                "not every record was accounted for within {:?}: {a:?}; are the stages running (make up)? See .stack/logs/",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();
    let sim_calls = match (sim_before, sim_completions(&settings).await) {
        (Some(before), Some(after)) => format!("{}", after - before),
        _ => "n/a (llm-sim metrics not reachable)".into(),
    };

    println!();
    println!("| what                          | count |");
    println!("|-------------------------------|------:|");
    println!("| records sent                  | {:>5} |", records.len());
    println!("| read by ingest                | {:>5} |", acct.read);
    println!("| duplicates (recorded)         | {:>5} |", acct.duplicates);
    println!("| enriched and published        | {:>5} |", acct.published);
    println!(
        "| dead-lettered                 | {:>5} |",
        acct.dead_lettered_at_ingest + acct.dead_lettered_at_enricher
    );
    println!("| LLM calls (audit)             | {:>5} |", acct.llm_calls);
    println!("| LLM calls per unique key      | {:>5.2} |", acct.llm_calls as f64 / acct.forwarded.max(1) as f64);
    println!("| tokens in / out               | {} / {} |", acct.input_tokens, acct.output_tokens);
    println!("| llm-sim calls meanwhile (any) | {sim_calls} |");
    println!("| time to account for all       | {:.1} s |", elapsed.as_secs_f64());
    println!();

    if args.strict {
        anyhow::ensure!(
            acct.published == args.unique as i64 && acct.dead_lettered_at_enricher == 0,
            "--strict: {} of {} tickets published, {} dead-lettered by the enricher (see dlq-replayer list)",
            acct.published,
            args.unique,
            acct.dead_lettered_at_enricher
        );
    }
    let prefix = format!("{pipeline}:{run}-");
    let output = read_to_end(&settings, &settings.topics.output, Duration::from_secs(60))?;
    println!("Three enriched records from {}:", settings.topics.output);
    for m in
        output.iter().filter(|m| header(m, headers::IDEMPOTENCY_KEY).is_some_and(|k| k.starts_with(&prefix))).take(3)
    {
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        println!(
            "  key={} idempotency-key={} traceparent={}",
            String::from_utf8_lossy(m.key().unwrap_or_default()),
            header(m, headers::IDEMPOTENCY_KEY).unwrap_or_default(),
            header(m, headers::TRACEPARENT).unwrap_or_default()
        );
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    if acct.published + acct.dead_lettered_at_enricher != acct.forwarded || acct.read != records.len() as i64 {
        anyhow::bail!("accounting does not add up: {acct:?}");
    }
    Ok(())
}

/// llm-sim's count of completions served, when the configured endpoint is llm-sim.
async fn sim_completions(settings: &Settings) -> Option<u64> {
    loadgen::procs::sim_completions(settings.llm.base_url.trim_end_matches('/').trim_end_matches("/v1")).await
}
