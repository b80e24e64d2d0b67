//! The CLI's client side: the admin API over HTTP. The API address comes from
//! `--api URL` or `ENRICH_ADMIN_API` (default `http://127.0.0.1:9104`), the token from
//! `ENRICH_ADMIN_TOKEN` (never printed).

use serde_json::Value;

use crate::replay::{DeadLetter, Filter, ReplayOutcome};

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
            ] {
                if let Some(v) = v {
                    query.push((k, v.clone()));
                }
            }
            let page = Self::answer(self.http.get(format!("{}/v1/dead-letters", self.api)).query(&query).send().await?)
                .await?;
            let items: Vec<DeadLetter> = serde_json::from_value(page["items"].clone())?;
            out.extend(items);
            match page["next_after_id"].as_i64() {
                Some(next) => after = next,
                None => return Ok(out),
            }
        }
    }

    pub async fn show(&self, id: i64) -> anyhow::Result<Value> {
        Self::answer(self.http.get(format!("{}/v1/dead-letters/{id}", self.api)).send().await?).await
    }

    pub async fn replay(&self, filter: &Filter, dry_run: bool, note: Option<&str>) -> anyhow::Result<ReplayOutcome> {
        let mut body = serde_json::to_value(filter)?;
        body["dry_run"] = Value::Bool(dry_run);
        if let Some(n) = note {
            body["note"] = Value::String(n.to_string());
        }
        let mut request = self.http.post(format!("{}/v1/replay", self.api)).json(&body);
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        Ok(serde_json::from_value(Self::answer(request.send().await?).await?)?)
    }

    pub async fn discard(&self, id: i64, note: Option<&str>) -> anyhow::Result<()> {
        let mut request = self
            .http
            .post(format!("{}/v1/dead-letters/{id}/discard", self.api))
            .json(&serde_json::json!({"note": note}));
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
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
