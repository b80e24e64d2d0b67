//! The CLI's client side: the admin API over HTTP. The API address comes from
//! `--api URL` or `ENRICH_ADMIN_API` (default `http://127.0.0.1:9104`), the token from
//! `ENRICH_ADMIN_TOKEN` (the read or the admin token; sent with every call, never
//! printed).

use serde_json::Value;

use crate::replay::{DeadLetter, Filter, History, ReplayOutcome};

pub struct Client {
    pub api: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(api: impl Into<String>, token: Option<String>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self { api: api.into().trim_end_matches('/').to_string(), token, http: reqwest::Client::new() }
    }

    pub fn from_env(api: Option<String>) -> Self {
        let api =
            api.or_else(|| std::env::var("ENRICH_ADMIN_API").ok()).unwrap_or_else(|| "http://127.0.0.1:9104".into());
        Self::new(api, std::env::var("ENRICH_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()))
    }

    /// A request carrying the token, when there is one.
    fn request(&self, method: reqwest::Method, url: impl reqwest::IntoUrl) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            anyhow::bail!("{status}: {}", body["error"].as_str().unwrap_or("(no detail)"))
        }
    }

    /// Every dead letter with `status` matching the filter (follows the pages).
    pub async fn list(&self, status: &str, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        let mut after = 0i64;
        loop {
            let mut query: Vec<(&str, String)> =
                vec![("status", status.into()), ("after_id", after.to_string()), ("limit", "500".into())];
            for (k, v) in [
                ("reason", &filter.reason),
                ("stage", &filter.stage),
                ("key", &filter.key),
                ("from", &filter.from),
                ("to", &filter.to),
                ("text", &filter.text),
            ] {
                if let Some(v) = v {
                    query.push((k, v.clone()));
                }
            }
            let url = format!("{}/v1/dead-letters", self.api);
            let page = Self::answer(self.request(reqwest::Method::GET, url).query(&query).send().await?).await?;
            let items: Vec<DeadLetter> = serde_json::from_value(page["items"].clone())?;
            out.extend(items);
            match page["next_after_id"].as_i64() {
                Some(next) => after = next,
                None => return Ok(out),
            }
        }
    }

    /// A key's timeline across stages (`GET /v1/messages/{key}`), every page of it.
    pub async fn history(&self, key: &str) -> anyhow::Result<History> {
        let mut url = reqwest::Url::parse(&self.api)?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("{} cannot be a base URL", self.api))?
            .pop_if_empty()
            .extend(["v1", "messages", key]);
        let (mut runs_after, mut steps_after) = (0i64, 0i64);
        let mut whole: Option<History> = None;
        loop {
            let query = [
                ("limit", "1000".to_string()),
                ("runs_after", runs_after.to_string()),
                ("steps_after", steps_after.to_string()),
            ];
            let next: History = serde_json::from_value(
                Self::answer(self.request(reqwest::Method::GET, url.clone()).query(&query).send().await?).await?,
            )?;
            let (more_runs, more_steps) = (next.next_runs_after, next.next_steps_after);
            match &mut whole {
                None => whole = Some(next),
                Some(h) => {
                    h.runs.extend(next.runs);
                    h.steps.extend(next.steps);
                }
            }
            if more_runs.is_none() && more_steps.is_none() {
                break;
            }
            // A kind that is done asks for nothing more of it: past every id.
            runs_after = more_runs.unwrap_or(i64::MAX);
            steps_after = more_steps.unwrap_or(i64::MAX);
        }
        let mut h = whole.ok_or_else(|| anyhow::anyhow!("no answer"))?;
        h.next_runs_after = None;
        h.next_steps_after = None;
        Ok(h)
    }

    /// The kill switch: `pause` with a reason, or resume.
    pub async fn set_paused(&self, paused: bool, reason: Option<&str>) -> anyhow::Result<Value> {
        let path = if paused { "pause" } else { "resume" };
        let request = self
            .request(reqwest::Method::POST, format!("{}/v1/enrichment/{path}", self.api))
            .json(&serde_json::json!({"reason": reason}));
        Self::answer(request.send().await?).await
    }

    pub async fn show(&self, id: i64) -> anyhow::Result<Value> {
        Self::answer(self.request(reqwest::Method::GET, format!("{}/v1/dead-letters/{id}", self.api)).send().await?)
            .await
    }

    pub async fn replay(&self, filter: &Filter, dry_run: bool, note: Option<&str>) -> anyhow::Result<ReplayOutcome> {
        let mut body = serde_json::to_value(filter)?;
        body["dry_run"] = Value::Bool(dry_run);
        if let Some(n) = note {
            body["note"] = Value::String(n.to_string());
        }
        let request = self.request(reqwest::Method::POST, format!("{}/v1/replay", self.api)).json(&body);
        Ok(serde_json::from_value(Self::answer(request.send().await?).await?)?)
    }

    pub async fn discard(&self, id: i64, note: Option<&str>) -> anyhow::Result<()> {
        let request = self
            .request(reqwest::Method::POST, format!("{}/v1/dead-letters/{id}/discard", self.api))
            .json(&serde_json::json!({"note": note}));
        Self::answer(request.send().await?).await.map(|_| ())
    }
}

/// A table of dead letters for the terminal.
pub fn table(items: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:>8}  {:<24}  {:<13}  {:<18}  {:>3}  {:<40}  {}\n",
        "ID", "WHEN", "STAGE", "REASON", "ATT", "KEY", "ERROR"
    );
    for d in items {
        let error: String = d.error.chars().take(60).collect();
        out.push_str(&format!(
            "{:>8}  {:<24}  {:<13}  {:<18}  {:>3}  {:<40}  {}\n",
            d.id, d.created_at, d.stage, d.reason, d.attempts, d.idempotency_key, error
        ));
    }
    out.push_str(&format!("{} dead letter(s)\n", items.len()));
    out
}

/// A key's history for the terminal: what is known of it, then every run and step in
/// time order.
pub fn timeline(h: &History) -> String {
    let mut out = format!("key       {}\n", h.idempotency_key);
    out.push_str(&format!(
        "state     {} (attempts: {})\n",
        h.state.as_deref().unwrap_or("unknown"),
        h.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
    ));
    if let (Some(t), Some(p), Some(o)) = (&h.source_topic, h.source_partition, h.source_offset) {
        out.push_str(&format!("source    {t}/{p}@{o}\n"));
    }
    out.push_str(&format!("traces    {}\n", h.trace_ids.join(", ")));
    out.push_str(&format!("tokens    {} in, {} out, ${:.6}\n\n", h.tokens.input, h.tokens.output, h.tokens.cost_usd));
    let mut rows: Vec<(String, String)> = h
        .runs
        .iter()
        .map(|r| {
            let line = format!(
                "{:<13}  {:<15}  {:>3}  {}",
                r.stage,
                format!("run:{}", r.status),
                r.attempt,
                r.detail.as_deref().unwrap_or("")
            );
            (r.at.clone(), line)
        })
        .chain(h.steps.iter().map(|s| {
            let mut detail = String::new();
            if let Some(ms) = s.duration_ms {
                detail.push_str(&format!("{ms:.0} ms "));
            }
            if let (Some(i), Some(o)) = (s.input_tokens, s.output_tokens) {
                detail.push_str(&format!("{i}+{o} tokens "));
            }
            if let Some(m) = &s.model {
                detail.push_str(&format!("{m} "));
            }
            if let Some(e) = &s.error {
                detail.push_str(e);
            }
            let line =
                format!("{:<13}  {:<15}  {:>3}  {}", s.stage, format!("{}:{}", s.step, s.status), s.attempt, detail);
            (s.at.clone(), line)
        }))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    out.push_str(&format!("{:<24}  {:<13}  {:<15}  {:>3}  {}\n", "WHEN", "STAGE", "EVENT", "ATT", "DETAIL"));
    for (at, line) in rows {
        out.push_str(&format!("{at:<24}  {line}\n"));
    }
    for d in &h.dead_letters {
        out.push_str(&format!("\ndead letter {} ({}): {} — {}\n", d.id, d.status, d.reason, d.error));
    }
    out
}
