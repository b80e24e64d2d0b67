//! The LLM client: one HTTP client and error classification, and one [`ChatApi`] per
//! provider: OpenAI-compatible chat completions (OpenAI, Azure OpenAI's compatible
//! endpoint, vLLM, Ollama, llama.cpp server, LiteLLM, llm-sim) with `response_format`
//! `json_schema`, and Anthropic Messages with the schema as a forced tool's input
//! schema. The answer is validated locally either way. Every failure is classified
//! here, once.

use enrich_common::ErrorClass;
use enrich_common::config::{LlmSettings, ModelPrice, Provider, ResponseFormat};
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::flow::DeclaredLimits;
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
    /// breaker counts): no connection, timeouts, 502/503/504/529, 401/403, an unknown
    /// model, a spent quota. A plain 500 may be about one record (a poison input), so it
    /// is retried and, when attempts run out, dead-lettered, without tripping the breaker.
    /// A 429 is not an outage: flow control slows the calls down instead.
    pub fn endpoint_down(&self) -> bool {
        matches!(
            self.error.reason,
            Reason::Timeout
                | Reason::Connection
                | Reason::Unavailable
                | Reason::Unauthorized
                | Reason::ModelNotFound
                | Reason::QuotaExceeded
        )
    }

    /// Whether the next fallback model is worth a try: this model is unavailable or
    /// unknown (the endpoint itself answered or timed out).
    pub fn try_fallback(&self) -> bool {
        matches!(self.error.reason, Reason::Timeout | Reason::Unavailable | Reason::ModelNotFound)
    }

    fn new(class: ErrorClass, reason: Reason, message: impl Into<String>) -> Self {
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

/// What differs between provider APIs: the request, and how to read the answer.
pub trait ChatApi: Send + Sync {
    /// `gen_ai.provider.name`.
    fn name(&self) -> &'static str;
    /// The endpoint path under the base URL.
    fn path(&self) -> &'static str;
    /// Authentication and version headers.
    fn auth_headers(&self, api_key: Option<&str>) -> Vec<(&'static str, String)>;
    fn body(&self, call: &CallShape<'_>, prompt: &Prompt) -> Value;
    fn parse(&self, text: &str, latency: Duration) -> Result<Completion, LlmError>;
}

/// What every request carries, whatever the API.
pub struct CallShape<'a> {
    pub model: &'a str,
    pub format: ResponseFormat,
    pub temperature: f32,
    pub max_output_tokens: u32,
    pub schema: &'a Value,
}

pub struct LlmClient {
    http: reqwest::Client,
    api: Box<dyn ChatApi>,
    url: String,
    api_key: Option<String>,
    extra_headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    /// The model, then the fallbacks in order.
    models: Vec<String>,
    temperature: f32,
    max_output_tokens: u32,
    /// `llm.max_response_bytes`: the most of a body read.
    max_response_bytes: usize,
    schema: Value,
    format: ResponseFormat,
    /// USD per million tokens, in and out, per model called.
    prices: Vec<ModelPrice>,
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
        let api: Box<dyn ChatApi> = match llm.provider {
            Provider::Openai => Box::new(OpenAi),
            Provider::Anthropic => Box::new(Anthropic),
        };
        let mut extra_headers = Vec::new();
        for (name, value) in &llm.extra_headers {
            let n = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| anyhow::anyhow!("llm.extra_headers: {name:?} is not a header name: {e}"))?;
            let v = reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| anyhow::anyhow!("llm.extra_headers: the value of {name:?} is not a header value"))?;
            extra_headers.push((n, v));
        }
        Ok(Self {
            http,
            url: format!("{}/{}", llm.base_url.trim_end_matches('/'), api.path()),
            api,
            api_key,
            extra_headers,
            models: std::iter::once(&llm.model).chain(&llm.fallback_models).cloned().collect(),
            temperature: llm.temperature,
            max_output_tokens: llm.max_output_tokens,
            max_response_bytes: llm.max_response_bytes,
            schema: schema.clone(),
            format: llm.response_format,
            prices: std::iter::once(&llm.model).chain(&llm.fallback_models).map(|m| llm.price_of(m)).collect(),
        })
    }

    /// The configured model (the first tried).
    pub fn model(&self) -> &str {
        &self.models[0]
    }

    /// The models to try in order: the model, then the fallbacks.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    pub fn max_output_tokens(&self) -> u32 {
        self.max_output_tokens
    }

    /// `gen_ai.provider.name` of the API spoken.
    pub fn provider(&self) -> &'static str {
        self.api.name()
    }

    /// What a call to model number `model` (in [`Self::models`]) with these token counts
    /// costs, at its prices.
    pub fn cost_usd(&self, model: usize, input_tokens: u32, output_tokens: u32) -> f64 {
        let p = self.prices.get(model).or(self.prices.first());
        p.map_or(0.0, |p| {
            (f64::from(input_tokens) * p.input_usd_per_mtok + f64::from(output_tokens) * p.output_usd_per_mtok)
                / 1_000_000.0
        })
    }

    /// One call to model number `model` (in [`Self::models`]), with the rate limits the
    /// provider declared in the answer's headers.
    pub async fn complete(&self, prompt: &Prompt, model: usize) -> (Result<Completion, LlmError>, DeclaredLimits) {
        let mut declared = DeclaredLimits::default();
        let result = self.send(prompt, model, &mut declared).await;
        (result, declared)
    }

    async fn send(&self, prompt: &Prompt, model: usize, declared: &mut DeclaredLimits) -> Result<Completion, LlmError> {
        let shape = CallShape {
            model: self.models.get(model).unwrap_or(&self.models[0]),
            format: self.format,
            temperature: self.temperature,
            max_output_tokens: self.max_output_tokens,
            schema: &self.schema,
        };
        let body = self.api.body(&shape, prompt);
        let started = Instant::now();
        let mut request = self.http.post(&self.url).json(&body);
        for (name, value) in self.api.auth_headers(self.api_key.as_deref()) {
            request = request.header(name, value);
        }
        for (name, value) in &self.extra_headers {
            request = request.header(name.clone(), value.clone());
        }
        let response = request.send().await.map_err(classify_transport)?;
        *declared = declared_limits(response.headers());
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let (text, cut) = read_capped(response, self.max_response_bytes).await?;
        if !status.is_success() {
            // An error's body only explains it: its beginning is enough.
            let mut err = classify_status(status, &text);
            err.retry_after = retry_after;
            return Err(err);
        }
        if cut {
            return Err(LlmError::new(
                ErrorClass::Permanent,
                Reason::BadResponse,
                format!(
                    "the answer's body is longer than llm.max_response_bytes ({} bytes); it was not read further",
                    self.max_response_bytes
                ),
            ));
        }
        let latency = started.elapsed();
        self.api.parse(&text, latency)
    }
}

/// The body, read chunk by chunk up to `cap` bytes (an answer longer than any enrichment
/// must not take the replica's memory); whether it was cut there. Nothing past the cap is
/// buffered: reading stops at the chunk that crosses it, and the connection is dropped.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<(String, bool), LlmError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Ok((String::new(), true));
    }
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify_transport)? {
        if body.len() + chunk.len() > cap {
            body.extend_from_slice(&chunk[..cap - body.len()]);
            return Ok((String::from_utf8_lossy(&body).into_owned(), true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&body).into_owned(), false))
}

/// OpenAI chat completions.
pub struct OpenAi;

impl ChatApi for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn path(&self) -> &'static str {
        "chat/completions"
    }

    fn auth_headers(&self, api_key: Option<&str>) -> Vec<(&'static str, String)> {
        api_key.map(|k| vec![("authorization", format!("Bearer {k}"))]).unwrap_or_default()
    }

    fn body(&self, call: &CallShape<'_>, prompt: &Prompt) -> Value {
        let mut messages =
            vec![json!({"role": "system", "content": prompt.system}), json!({"role": "user", "content": prompt.user})];
        if let Some(repair) = &prompt.repair {
            messages.push(json!({"role": "assistant", "content": repair.previous}));
            messages.push(json!({"role": "user", "content": repair.instruction()}));
        }
        let mut body = json!({
            "model": call.model,
            "messages": messages,
            "temperature": call.temperature,
            "max_tokens": call.max_output_tokens,
        });
        body["response_format"] = match call.format {
            ResponseFormat::JsonSchema => json!({
                "type": "json_schema",
                "json_schema": {"name": "enrichment", "strict": true, "schema": call.schema}
            }),
            ResponseFormat::JsonObject => json!({"type": "json_object", "schema": call.schema}),
            ResponseFormat::None => return body,
        };
        body
    }

    fn parse(&self, text: &str, latency: Duration) -> Result<Completion, LlmError> {
        parse_completion(text, latency)
    }
}

/// The tool the Anthropic API is made to call: its input is the enrichment.
pub const ANTHROPIC_TOOL: &str = "enrichment";
/// The Messages API version sent.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic Messages, structured output through a forced tool call.
pub struct Anthropic;

impl ChatApi for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn path(&self) -> &'static str {
        "messages"
    }

    fn auth_headers(&self, api_key: Option<&str>) -> Vec<(&'static str, String)> {
        let mut h = vec![("anthropic-version", ANTHROPIC_VERSION.to_string())];
        if let Some(k) = api_key {
            h.push(("x-api-key", k.to_string()));
        }
        h
    }

    fn body(&self, call: &CallShape<'_>, prompt: &Prompt) -> Value {
        let mut messages = vec![json!({"role": "user", "content": prompt.user})];
        if let Some(repair) = &prompt.repair {
            messages.push(json!({"role": "assistant", "content": repair.previous}));
            messages.push(json!({"role": "user", "content": repair.instruction()}));
        }
        json!({
            "model": call.model,
            "system": prompt.system,
            "messages": messages,
            "temperature": call.temperature,
            "max_tokens": call.max_output_tokens,
            "tools": [{
                "name": ANTHROPIC_TOOL,
                "description": "Record the enrichment of the ticket.",
                "input_schema": call.schema,
            }],
            "tool_choice": {"type": "tool", "name": ANTHROPIC_TOOL},
        })
    }

    fn parse(&self, text: &str, latency: Duration) -> Result<Completion, LlmError> {
        let bad = |m: String| LlmError::new(ErrorClass::Transient, Reason::BadResponse, m);
        let response: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not a Messages answer: {}", json_error(&e))))?;
        let usage = |k: &str| response.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).unwrap_or(0) as u32;
        if response.get("stop_reason").and_then(Value::as_str) == Some("max_tokens") {
            return Err(LlmError::new(
                ErrorClass::Permanent,
                Reason::OutputTruncated,
                "the answer hit llm.max_output_tokens",
            ));
        }
        if response.get("stop_reason").and_then(Value::as_str) == Some("refusal") {
            return Err(LlmError::new(ErrorClass::Permanent, Reason::Refusal, "the model refused"));
        }
        let blocks = response.get("content").and_then(Value::as_array).ok_or_else(|| bad("no content".into()))?;
        // The tool call's input is the answer; a text block (a model that ignored the
        // tool) is taken as the answer's text, for validation to judge.
        let content = blocks
            .iter()
            .find(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
            .and_then(|b| b.get("input"))
            .map(Value::to_string)
            .or_else(|| {
                blocks
                    .iter()
                    .find(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                    .and_then(|b| b.get("text").and_then(Value::as_str))
                    .map(str::to_string)
            })
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| LlmError::new(ErrorClass::Permanent, Reason::EmptyOutput, "the answer has no content"))?;
        Ok(Completion {
            content,
            model: response.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
            input_tokens: usage("input_tokens"),
            output_tokens: usage("output_tokens"),
            latency,
        })
    }
}

fn classify_transport(e: reqwest::Error) -> LlmError {
    // The URL can carry a key in its query (Azure's `api-version` beside a gateway's key).
    let e = e.without_url();
    let message = enrich_common::error::chain(&e);
    if e.is_timeout() {
        LlmError::new(ErrorClass::Transient, Reason::Timeout, message)
    } else if e.is_connect() {
        LlmError::new(ErrorClass::Transient, Reason::Connection, message)
    } else {
        LlmError::new(ErrorClass::Transient, Reason::Http, message)
    }
}

/// What an error body says that cannot be the request's own text: the provider's error
/// type, code and parameter (OpenAI's `error.{type,code,param}`, Anthropic's
/// `error.type`), each a short identifier. The error's message is left out: providers
/// quote the request in it, and a dead letter's error is shown in listings.
fn error_identifiers(body: &str) -> String {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return format!("a body of {} bytes, not recorded", body.len());
    };
    let ident = |v: &Value| {
        v.as_str()
            .filter(|s| s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-[]".contains(c)))
            .map(str::to_string)
    };
    let fields: Vec<String> = ["type", "code", "param"]
        .iter()
        .filter_map(|k| value.pointer(&format!("/error/{k}")).and_then(ident).map(|v| format!("{k} {v}")))
        .collect();
    if fields.is_empty() { "no error type given".to_string() } else { fields.join(", ") }
}

/// A JSON error of a provider's answer without its text (serde's message can quote the
/// value it refused).
fn json_error(e: &serde_json::Error) -> String {
    format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column())
}

/// Maps an HTTP error status (and the body's error code) to a class.
pub fn classify_status(status: StatusCode, body: &str) -> LlmError {
    let message = format!("HTTP {} ({})", status.as_u16(), error_identifiers(body));
    if status.is_client_error() && status.as_u16() != 429 {
        // The provider's own words, for the operator who asked for them: they can quote
        // the record, so never at the default level and never in a dead letter.
        let said: String = body.chars().take(500).collect();
        tracing::debug!(status = status.as_u16(), body = %said, "the provider refused the request");
    }
    match status.as_u16() {
        // A spent quota is not cured by waiting a few seconds.
        429 if body.contains("insufficient_quota") => LlmError::new(ErrorClass::Outage, Reason::QuotaExceeded, message),
        429 => LlmError::new(ErrorClass::Transient, Reason::RateLimited, message),
        // The model does not exist here: a configuration problem, never the record's.
        404 => LlmError::new(ErrorClass::Outage, Reason::ModelNotFound, message),
        408 => LlmError::new(ErrorClass::Transient, Reason::Timeout, message),
        500 => LlmError::new(ErrorClass::Transient, Reason::ServerError, message),
        502 | 503 | 504 | 529 => LlmError::new(ErrorClass::Transient, Reason::Unavailable, message),
        401 | 403 => LlmError::new(ErrorClass::Outage, Reason::Unauthorized, message),
        400 | 413 | 422
            if body.contains("context_length_exceeded")
                || body.contains("maximum context length")
                || body.contains("prompt is too long") =>
        {
            LlmError::new(ErrorClass::Permanent, Reason::ContextTooLong, message)
        }
        400..=499 => LlmError::new(ErrorClass::Permanent, Reason::BadRequest, message),
        _ => LlmError::new(ErrorClass::Transient, Reason::ServerError, message),
    }
}

/// The per-minute limits in OpenAI's `x-ratelimit-limit-*` or Anthropic's
/// `anthropic-ratelimit-*-limit` headers.
fn declared_limits(headers: &reqwest::header::HeaderMap) -> DeclaredLimits {
    let number = |names: [&str; 2]| {
        names.iter().find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()))
    };
    DeclaredLimits {
        requests_per_minute: number(["x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit"]),
        tokens_per_minute: number(["x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit"]),
        requests_remaining: number(["x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"]),
        tokens_remaining: number(["x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"]),
    }
}

/// `retry-after-ms` (OpenAI), `Retry-After` in seconds, or OpenAI's
/// `x-ratelimit-reset-requests` such as `1s` or `6m0s`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(3600.0)));
    }
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
    let response: ChatResponse = serde_json::from_str(text).map_err(|e| {
        LlmError::new(ErrorClass::Transient, Reason::BadResponse, format!("not a chat completion: {}", json_error(&e)))
    })?;
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::new(ErrorClass::Transient, Reason::BadResponse, "the answer has no choices"))?;
    if let Some(refusal) = choice.message.refusal.filter(|r| !r.is_empty()) {
        // Its text can quote the record: the dead letter says only that it came.
        let said = format!("the model refused (a refusal of {} characters, not recorded)", refusal.chars().count());
        return Err(LlmError::new(ErrorClass::Permanent, Reason::Refusal, said));
    }
    if choice.finish_reason.as_deref() == Some("length") {
        return Err(LlmError::new(
            ErrorClass::Permanent,
            Reason::OutputTruncated,
            "the answer hit llm.max_output_tokens",
        ));
    }
    let content = choice
        .message
        .content
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| LlmError::new(ErrorClass::Permanent, Reason::EmptyOutput, "the answer has no content"))?;
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
        assert_eq!(class(429, ""), (ErrorClass::Transient, Reason::RateLimited));
        assert_eq!(class(500, ""), (ErrorClass::Transient, Reason::ServerError));
        for code in [502, 503, 504, 529] {
            assert_eq!(class(code, ""), (ErrorClass::Transient, Reason::Unavailable));
        }
        assert_eq!(
            class(400, r#"{"error":{"code":"context_length_exceeded"}}"#),
            (ErrorClass::Permanent, Reason::ContextTooLong)
        );
        assert_eq!(class(400, "{}"), (ErrorClass::Permanent, Reason::BadRequest));
        assert_eq!(class(401, ""), (ErrorClass::Outage, Reason::Unauthorized));
        assert_eq!(class(404, ""), (ErrorClass::Outage, Reason::ModelNotFound));
        assert_eq!(
            class(429, r#"{"error":{"code":"insufficient_quota"}}"#),
            (ErrorClass::Outage, Reason::QuotaExceeded)
        );
        let quoted = r#"{"error":{"message":"Invalid content: 'my card 4111'","type":"invalid_request_error","param":"messages[1].content","code":null}}"#;
        let e = classify_status(StatusCode::BAD_REQUEST, quoted).error;
        assert_eq!(e.message, "HTTP 400 (type invalid_request_error, param messages[1].content)");
        let e = classify_status(StatusCode::BAD_GATEWAY, "<html>my card 4111</html>").error;
        assert_eq!(e.message, "HTTP 502 (a body of 25 bytes, not recorded)");
        let odd = r#"{"error":{"type":"my card 4111 and more words"}}"#;
        assert_eq!(classify_status(StatusCode::BAD_REQUEST, odd).error.message, "HTTP 400 (no error type given)");
        let e = classify_status(StatusCode::SERVICE_UNAVAILABLE, "");
        assert!(e.try_fallback() && e.endpoint_down());
        let e = classify_status(StatusCode::TOO_MANY_REQUESTS, "");
        assert!(!e.try_fallback() && !e.endpoint_down(), "429s are flow control's, not the breaker's");
        let e = classify_status(StatusCode::INTERNAL_SERVER_ERROR, "");
        assert!(!e.try_fallback() && !e.endpoint_down(), "a 500 may be the record's own");
    }

    #[test]
    fn anthropic_answers_parse_from_the_tool_call() {
        let ok = r#"{"model":"claude-x","content":[{"type":"text","text":"Here you go"},
            {"type":"tool_use","id":"t1","name":"enrichment","input":{"category":"billing"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":12,"output_tokens":7}}"#;
        let c = Anthropic.parse(ok, Duration::ZERO).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&c.content).unwrap(), json!({"category": "billing"}));
        assert_eq!((c.model.as_str(), c.input_tokens, c.output_tokens), ("claude-x", 12, 7));
        // A model that ignored the tool: its text goes to validation (and the repair call).
        let text = r#"{"content":[{"type":"text","text":"not json"}],"usage":{}}"#;
        assert_eq!(Anthropic.parse(text, Duration::ZERO).unwrap().content, "not json");
        let cut = r#"{"content":[{"type":"text","text":"{"}],"stop_reason":"max_tokens"}"#;
        assert_eq!(Anthropic.parse(cut, Duration::ZERO).unwrap_err().error.reason, Reason::OutputTruncated);
        assert_eq!(Anthropic.parse("<html>", Duration::ZERO).unwrap_err().error.reason, Reason::BadResponse);
        let too_long = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 250000 tokens > 200000 maximum"}}"#;
        assert_eq!(classify_status(StatusCode::BAD_REQUEST, too_long).error.reason, Reason::ContextTooLong);
    }

    #[test]
    fn each_api_authenticates_its_way() {
        assert_eq!(OpenAi.auth_headers(Some("k")), vec![("authorization", "Bearer k".to_string())]);
        assert!(OpenAi.auth_headers(None).is_empty());
        let a = Anthropic.auth_headers(Some("k"));
        assert!(
            a.contains(&("x-api-key", "k".to_string()))
                && a.contains(&("anthropic-version", ANTHROPIC_VERSION.to_string()))
        );
    }

    #[test]
    fn declared_limits_are_read_from_either_api() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "500".parse().unwrap());
        h.insert("x-ratelimit-limit-tokens", "30000".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "499".parse().unwrap());
        assert_eq!(
            declared_limits(&h),
            DeclaredLimits {
                requests_per_minute: Some(500),
                tokens_per_minute: Some(30000),
                requests_remaining: Some(499),
                tokens_remaining: None
            }
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
        assert_eq!(declared_limits(&h), DeclaredLimits { requests_per_minute: Some(50), ..Default::default() });
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "1".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(1)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "1.5s".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
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
        let e = parse_completion(refused, Duration::ZERO).unwrap_err().error;
        assert_eq!(
            (e.reason, e.message.as_str()),
            (Reason::Refusal, "the model refused (a refusal of 7 characters, not recorded)")
        );
        // serde's message would quote the string it refused.
        let odd = r#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":"my card 4111"}}"#;
        let e = parse_completion(odd, Duration::ZERO).unwrap_err().error;
        assert!(!e.message.contains("4111") && e.message.contains("Data error"), "{}", e.message);
        let cut = r#"{"choices":[{"message":{"content":"{\"a\":"},"finish_reason":"length"}]}"#;
        assert_eq!(parse_completion(cut, Duration::ZERO).unwrap_err().error.reason, Reason::OutputTruncated);
        assert_eq!(parse_completion("<html>", Duration::ZERO).unwrap_err().error.class, ErrorClass::Transient);
    }
}
