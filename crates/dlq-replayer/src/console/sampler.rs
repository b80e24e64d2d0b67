//! Reads every stage's `/readyz` and `/metrics` (the URLs of `[ui]`, or each stage's own
//! port on 127.0.0.1) every `ui.sample_interval_ms`, keeps the latest readings for the
//! overview and one hour of throughput and spend for its charts, in memory.

use enrich_common::Settings;
use enrich_common::shutdown::Shutdown;
use std::collections::VecDeque;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The history the charts show.
const KEEP: Duration = Duration::from_secs(3600);

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus (or OpenMetrics) text exposition; lines it cannot read
/// are left out.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_once(' ')?,
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    Some(Sample { name: name.to_string(), labels, value })
}

fn parse_labels(mut s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.push((key.trim_start_matches(',').trim().to_string(), value));
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// A stage replica the console watches.
#[derive(Debug, Clone)]
pub struct Target {
    pub stage: &'static str,
    pub url: String,
}

/// The targets of the settings: `[ui]`'s URLs, or the stage's port on 127.0.0.1.
pub fn targets(settings: &Settings) -> Vec<Target> {
    let ui = &settings.ui;
    let mut out = Vec::new();
    for (stage, urls, port) in [
        ("ingest-dedup", &ui.ingest_urls, settings.ingest.http_port),
        ("enricher", &ui.enricher_urls, settings.enricher.http_port),
        ("publisher", &ui.publisher_urls, settings.publisher.http_port),
    ] {
        if urls.is_empty() {
            out.push(Target { stage, url: format!("http://127.0.0.1:{port}") });
        } else {
            out.extend(urls.iter().map(|u| Target { stage, url: u.trim_end_matches('/').to_string() }));
        }
    }
    out
}

/// What one replica said at the last sample.
#[derive(Debug, Clone)]
pub struct Reading {
    pub target: Target,
    /// It answered `/readyz` at all.
    pub up: bool,
    pub ready: bool,
    /// Why not ready (its `/readyz` text), or why it could not be read.
    pub why: Option<String>,
    pub samples: Vec<Sample>,
    /// Records read and written per second since the previous sample.
    pub in_per_sec: Option<f64>,
    pub out_per_sec: Option<f64>,
}

impl Reading {
    /// Records read (every topic) and records written (every topic), as counted.
    pub fn flow(&self) -> (f64, f64) {
        (self.sum("enrich_records_consumed_total", &[]), self.sum("enrich_records_produced_total", &[]))
    }

    /// The sum of every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

/// One point of the charts.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Unix seconds.
    pub at: i64,
    pub in_per_sec: f64,
    pub out_per_sec: f64,
    pub usd_per_min: f64,
}

/// Running totals behind the points (per sample, over every replica).
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    records_in: f64,
    records_out: f64,
    usd: f64,
}

pub struct Sampler {
    targets: Vec<Target>,
    interval: Duration,
    http: reqwest::Client,
    latest: RwLock<(Option<SystemTime>, Vec<Reading>)>,
    history: RwLock<VecDeque<Point>>,
    last: RwLock<Option<(Instant, Totals)>>,
}

impl Sampler {
    pub fn new(settings: &Settings) -> Self {
        let interval = Duration::from_millis(settings.ui.sample_interval_ms);
        let timeout = interval.min(Duration::from_millis(1500));
        // reqwest is built without a bundled TLS provider (a stage's URL may be https).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build().unwrap_or_default();
        Self {
            targets: targets(settings),
            interval,
            http,
            latest: RwLock::new((None, Vec::new())),
            history: RwLock::new(VecDeque::new()),
            last: RwLock::new(None),
        }
    }

    /// Samples every interval until `shutdown`.
    pub fn spawn(self: std::sync::Arc<Self>, shutdown: Shutdown) {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => self.sample().await,
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// The latest readings (empty before the first sample) and when they were taken.
    pub fn latest(&self) -> (Option<SystemTime>, Vec<Reading>) {
        self.latest.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// The last hour's points, oldest first.
    pub fn history(&self) -> Vec<Point> {
        self.history.read().map(|h| h.iter().copied().collect()).unwrap_or_default()
    }

    async fn read(http: reqwest::Client, target: Target) -> Reading {
        let ready = http.get(format!("{}/readyz", target.url)).send().await;
        let (up, ready, why) = match ready {
            Ok(r) => {
                let ok = r.status().is_success();
                let text = r.text().await.unwrap_or_default();
                let why = (!ok).then(|| text.trim().trim_start_matches("not ready: ").to_string());
                (true, ok, why)
            }
            Err(e) => (false, false, Some(describe(&e))),
        };
        let samples = if up {
            match http.get(format!("{}/metrics", target.url)).send().await {
                Ok(r) => parse(&r.text().await.unwrap_or_default()),
                Err(_) => Vec::new(),
            }
        } else {
            Vec::new()
        };
        Reading { target, up, ready, why, samples, in_per_sec: None, out_per_sec: None }
    }

    pub async fn sample(&self) {
        // Every replica at once: one that does not answer costs one timeout, not one each.
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let (http, t) = (self.http.clone(), t.clone());
            set.spawn(async move { (i, Self::read(http, t).await) });
        }
        let mut readings: Vec<(usize, Reading)> = set.join_all().await;
        readings.sort_by_key(|(i, _)| *i);
        let mut readings: Vec<Reading> = readings.into_iter().map(|(_, r)| r).collect();
        let (then, before) = self.latest();
        if let Some(then) = then {
            let secs = SystemTime::now().duration_since(then).map_or(0.0, |d| d.as_secs_f64()).max(0.001);
            for (now, was) in readings.iter_mut().zip(before.iter()).filter(|(n, w)| n.up && w.up) {
                let ((i1, o1), (i0, o0)) = (now.flow(), was.flow());
                now.in_per_sec = Some(if i1 >= i0 { i1 - i0 } else { i1 } / secs);
                now.out_per_sec = Some(if o1 >= o0 { o1 - o0 } else { o1 } / secs);
            }
        }
        let totals = Totals {
            records_in: readings
                .iter()
                .filter(|r| r.target.stage == "ingest-dedup")
                .map(|r| r.sum("enrich_records_consumed_total", &[]))
                .sum(),
            records_out: readings
                .iter()
                .filter(|r| r.target.stage == "publisher")
                .map(|r| r.sum("enrich_publisher_records_total", &[("outcome", "published")]))
                .sum(),
            usd: readings
                .iter()
                .filter(|r| r.target.stage == "enricher")
                .map(|r| r.sum("enrich_llm_cost_usd_total", &[]))
                .sum(),
        };
        let now = Instant::now();
        let previous = self.last.write().ok().and_then(|mut l| l.replace((now, totals)));
        if let Some((then, before)) = previous {
            let secs = now.duration_since(then).as_secs_f64().max(0.001);
            // A counter that went down is a restarted process: its whole value is new.
            let delta = |now: f64, before: f64| if now >= before { now - before } else { now };
            let point = Point {
                at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
                in_per_sec: delta(totals.records_in, before.records_in) / secs,
                out_per_sec: delta(totals.records_out, before.records_out) / secs,
                usd_per_min: delta(totals.usd, before.usd) / secs * 60.0,
            };
            if let Ok(mut h) = self.history.write() {
                h.push_back(point);
                while h.front().is_some_and(|p| point.at - p.at > KEEP.as_secs() as i64) {
                    h.pop_front();
                }
            }
        }
        if let Ok(mut l) = self.latest.write() {
            *l = (Some(SystemTime::now()), readings);
        }
    }
}

/// Why a stage could not be read, without the URL's query (none is used) or a body.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else {
        "could not be read".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_read_with_its_labels() {
        let text = "# HELP x y\nenrich_in_flight 3\nenrich_consumer_lag{topic=\"a.b\",partition=\"2\"} 17\n\
                    enrich_dead_letters_total{reason=\"odd \\\"one\\\"\"} 1\nenrich_llm_cost_usd_total 0.25\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!((s[0].name.as_str(), s[0].value), ("enrich_in_flight", 3.0));
        assert_eq!((s[1].label("topic"), s[1].label("partition"), s[1].value), (Some("a.b"), Some("2"), 17.0));
        assert_eq!(s[2].label("reason"), Some("odd \"one\""));
        let r = Reading {
            target: Target { stage: "enricher", url: String::new() },
            up: true,
            ready: true,
            why: None,
            samples: s,
            in_per_sec: None,
            out_per_sec: None,
        };
        assert_eq!(r.sum("enrich_consumer_lag", &[("partition", "2")]), 17.0);
        assert_eq!(r.sum("enrich_consumer_lag", &[("partition", "3")]), 0.0);
    }
}
