//! The OpenAI-compatible chat-completions client (OpenAI, vLLM, Ollama, llama.cpp
//! server, LiteLLM, llm-sim), with JSON-schema structured output. Every failure is
//! classified here, once.

use enrich_common::ErrorClass;
use enrich_common::config::LlmSettings;
use enrich_common::error::RecordError;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::prompt::Prompt;

/// A classified LLM failure, with the wait the server asked for, if any.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct LlmError {
    pub error: RecordError,
    pub retry_after: Option<Duration>,
}

impl LlmError {
    /// Whether the failure says the endpoint as a whole is unavailable (what the circuit
    /// breaker counts): no connection, timeouts, 429, 502/503/504/529, 401/403. A plain
    /// 500 may be about one record (a poison input), so it is retried and, when attempts
    /// run out, dead-lettered, without tripping the breaker.
    pub fn endpoint_down(&self) -> bool {
        matches!(self.error.reason, "timeout" | "connection" | "rate_limited" | "unavailable" | "unauthorized")
    }

    fn new(class: ErrorClass, reason: &'static str, message: impl Into<String>) -> Self {
        Self { error: RecordError::new(class, reason, message), retry_after: None }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    pub model: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub latency: Duration,
}

pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    model: String,
    temperature: f32,
    max_output_tokens: u32,
    response_format: Value,
    /// USD per million tokens, in and out.
    price: (f64, f64),
}

impl LlmClient {
    pub fn new(llm: &LlmSettings, schema: &Value) -> anyhow::Result<Self> {
        // reqwest is built without a bundled crypto provider: install ring's once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(llm.connect_timeout_ms))
            .timeout(Duration::from_millis(llm.request_timeout_ms))
            .pool_max_idle_per_host(256)
            .build()?;
        let api_key = match &llm.api_key_env {
            Some(var) => std::env::var(var).ok().filter(|k| !k.is_empty()),
            None => None,
        };
        if llm.api_key_env.is_some() && api_key.is_none() {
            tracing::info!(
                variable = llm.api_key_env.as_deref().unwrap_or(""),
                "no LLM API key set; calling without Authorization"
            );
        }
        Ok(Self {
            http,
            url: format!("{}/chat/completions", llm.base_url.trim_end_matches('/')),
            api_key,
            model: llm.model.clone(),
            temperature: llm.temperature,
            max_output_tokens: llm.max_output_tokens,
            response_format: json!({
                "type": "json_schema",
                "json_schema": {"name": "enrichment", "strict": true, "schema": schema}
            }),
            price: (llm.input_usd_per_mtok, llm.output_usd_per_mtok),
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// `gen_ai.provider.name` of the API spoken.
    pub fn provider(&self) -> &'static str {
        "openai"
    }

    /// What a call with these token counts costs, at the configured prices.
    pub fn cost_usd(&self, input_tokens: u32, output_tokens: u32) -> f64 {
        (f64::from(input_tokens) * self.price.0 + f64::from(output_tokens) * self.price.1) / 1_000_000.0
    }

    pub async fn complete(&self, prompt: &Prompt) -> Result<Completion, LlmError> {
        let mut messages =
            vec![json!({"role": "system", "content": prompt.system}), json!({"role": "user", "content": prompt.user})];
        if let Some(repair) = &prompt.repair {
            messages.push(json!({"role": "assistant", "content": repair.previous}));
            messages.push(json!({"role": "user", "content": repair.instruction()}));
        }
        let body = json!({
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_output_tokens,
            "response_format": self.response_format,
        });
        let started = Instant::now();
        let mut request = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(classify_transport)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.map_err(classify_transport)?;
        if !status.is_success() {
            let mut err = classify_status(status, &text);
            err.retry_after = retry_after;
            return Err(err);
        }
        let latency = started.elapsed();
        parse_completion(&text, latency)
    }
}

fn classify_transport(e: reqwest::Error) -> LlmError {
    let message = enrich_common::error::chain(&e);
    if e.is_timeout() {
        LlmError::new(ErrorClass::Transient, "timeout", message)
    } else if e.is_connect() {
        LlmError::new(ErrorClass::Transient, "connection", message)
    } else {
        LlmError::new(ErrorClass::Transient, "http", message)
    }
}

/// Maps an HTTP error status (and the body's error code) to a class.
pub fn classify_status(status: StatusCode, body: &str) -> LlmError {
    let detail: String = body.chars().take(500).collect();
    let message = format!("HTTP {}: {detail}", status.as_u16());
    match status.as_u16() {
        429 => LlmError::new(ErrorClass::Transient, "rate_limited", message),
        408 => LlmError::new(ErrorClass::Transient, "timeout", message),
        500 => LlmError::new(ErrorClass::Transient, "server_error", message),
        502 | 503 | 504 | 529 => LlmError::new(ErrorClass::Transient, "unavailable", message),
        401 | 403 => LlmError::new(ErrorClass::Outage, "unauthorized", message),
        400 | 413 | 422 if body.contains("context_length_exceeded") || body.contains("maximum context length") => {
            LlmError::new(ErrorClass::Permanent, "context_too_long", message)
        }
        400..=499 => LlmError::new(ErrorClass::Permanent, "bad_request", message),
        _ => LlmError::new(ErrorClass::Transient, "server_error", message),
    }
}

/// `Retry-After` in seconds, or OpenAI's `x-ratelimit-reset-requests` such as `1s` or `6m0s`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(secs) = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
    {
        return Some(Duration::from_secs_f64(secs.min(3600.0)));
    }
    headers.get("x-ratelimit-reset-requests").and_then(|v| v.to_str().ok()).and_then(parse_go_duration)
}

/// Parses durations such as `1s`, `250ms`, `6m0s`, `1h2m3.5s`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut number = String::new();
    let mut chars = s.trim().chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    (any && number.is_empty()).then(|| Duration::from_secs_f64(total.min(3600.0)))
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: String,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

fn parse_completion(text: &str, latency: Duration) -> Result<Completion, LlmError> {
    let response: ChatResponse = serde_json::from_str(text)
        .map_err(|e| LlmError::new(ErrorClass::Transient, "bad_response", format!("not a chat completion: {e}")))?;
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::new(ErrorClass::Transient, "bad_response", "the answer has no choices"))?;
    if let Some(refusal) = choice.message.refusal.filter(|r| !r.is_empty()) {
        return Err(LlmError::new(ErrorClass::Permanent, "refusal", refusal));
    }
    if choice.finish_reason.as_deref() == Some("length") {
        return Err(LlmError::new(ErrorClass::Permanent, "output_truncated", "the answer hit llm.max_output_tokens"));
    }
    let content = choice
        .message
        .content
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| LlmError::new(ErrorClass::Permanent, "empty_output", "the answer has no content"))?;
    let usage = response.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 });
    Ok(Completion {
        content,
        model: response.model,
        input_tokens: usage.prompt_tokens,
        output_tokens: usage.completion_tokens,
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_classes() {
        let class = |code: u16, body: &str| {
            let e = classify_status(StatusCode::from_u16(code).unwrap(), body).error;
            (e.class, e.reason)
        };
        assert_eq!(class(429, ""), (ErrorClass::Transient, "rate_limited"));
        assert_eq!(class(500, ""), (ErrorClass::Transient, "server_error"));
        for code in [502, 503, 504, 529] {
            assert_eq!(class(code, ""), (ErrorClass::Transient, "unavailable"));
        }
        assert_eq!(
            class(400, r#"{"error":{"code":"context_length_exceeded"}}"#),
            (ErrorClass::Permanent, "context_too_long")
        );
        assert_eq!(class(400, "{}"), (ErrorClass::Permanent, "bad_request"));
        assert_eq!(class(401, ""), (ErrorClass::Outage, "unauthorized"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m2.5s"), Some(Duration::from_secs_f64(62.5)));
        // Waits are capped at an hour.
        assert_eq!(parse_go_duration("2h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("12"), None);
    }

    #[test]
    fn completions_parse_and_refusals_are_permanent() {
        let ok = r#"{"model":"m1","choices":[{"message":{"content":"{\"a\":1}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let c = parse_completion(ok, Duration::ZERO).unwrap();
        assert_eq!((c.content.as_str(), c.model.as_str(), c.input_tokens, c.output_tokens), ("{\"a\":1}", "m1", 12, 3));
        let refused = r#"{"choices":[{"message":{"content":null,"refusal":"I can't"}}]}"#;
        assert_eq!(parse_completion(refused, Duration::ZERO).unwrap_err().error.reason, "refusal");
        let cut = r#"{"choices":[{"message":{"content":"{\"a\":"},"finish_reason":"length"}]}"#;
        assert_eq!(parse_completion(cut, Duration::ZERO).unwrap_err().error.reason, "output_truncated");
        assert_eq!(parse_completion("<html>", Duration::ZERO).unwrap_err().error.class, ErrorClass::Transient);
    }
}
