//! llm-sim: a simulator of an OpenAI-compatible chat-completions API
//! (`/v1/chat/completions`) and of Anthropic's Messages API (`/v1/messages`), for tests,
//! demos and benchmarks. It is not a language model: its answers are deterministic functions
//! of the last user message (see [`rules`]), so tests can assert them.

pub mod faults;
pub mod latency;
pub mod limits;
pub mod rules;

pub use faults::Faults;
pub use latency::Latency;
pub use limits::RateLimits;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Latency added to every completion (a function of the request's text).
    pub latency: Latency,
    /// The model name listed by `/v1/models`.
    pub model: String,
    /// Fault injection at start (changeable at runtime).
    pub faults: Faults,
    /// Requests and tokens per minute (changeable at runtime).
    pub limits: RateLimits,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency: Latency::default(),
            model: "llm-sim-support-v1".into(),
            faults: Faults::default(),
            limits: RateLimits::default(),
        }
    }
}

#[derive(Default)]
struct Counters {
    completions: AtomicU64,
    rejected: AtomicU64,
    /// Requests answered with the forced outage status or an injected fault.
    failed: AtomicU64,
    /// Requests refused with 429 by the rate limits.
    rate_limited: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

struct AppState {
    config: SimConfig,
    counters: Counters,
    /// While set, every completion is answered with this HTTP status (an outage).
    outage: std::sync::Mutex<Option<u16>>,
    faults: std::sync::Mutex<Faults>,
    limiter: std::sync::Mutex<limits::Limiter>,
    /// Texts seen so far, for the `-once` markers.
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
    rng: AtomicU64,
    /// The latest requests (path, headers, body), for `GET /admin/requests`.
    requests: std::sync::Mutex<std::collections::VecDeque<Value>>,
    /// While true, every completion that has been received waits before it answers
    /// (see [`RunningSim::hold`]).
    held: tokio::sync::watch::Sender<bool>,
}

/// A running simulator.
pub struct RunningSim {
    pub addr: SocketAddr,
    state: Arc<AppState>,
    pub handle: tokio::task::JoinHandle<()>,
    router: Router,
    shutdown: CancellationToken,
    /// Stops this incarnation of the server (see `stop` and `restart`).
    serving: CancellationToken,
}

impl RunningSim {
    /// Completions answered with 200 so far.
    pub fn completions(&self) -> u64 {
        self.state.counters.completions.load(Ordering::SeqCst)
    }

    /// Tokens reported in the `usage` of successful completions so far: (prompt, completion).
    pub fn tokens(&self) -> (u64, u64) {
        (
            self.state.counters.prompt_tokens.load(Ordering::SeqCst),
            self.state.counters.completion_tokens.load(Ordering::SeqCst),
        )
    }

    /// Requests answered with the outage status so far.
    pub fn failed(&self) -> u64 {
        self.state.counters.failed.load(Ordering::SeqCst)
    }

    /// Requests refused with 429 by the rate limits so far.
    pub fn rate_limited(&self) -> u64 {
        self.state.counters.rate_limited.load(Ordering::SeqCst)
    }

    /// Replaces the rate limits (the buckets start full).
    pub fn set_limits(&self, limits: RateLimits) {
        if let Ok(mut l) = self.state.limiter.lock() {
            *l = limits::Limiter::new(limits, std::time::Instant::now());
        }
    }

    /// The latest requests received (newest last): `{"path", "headers", "body"}`.
    pub fn requests(&self) -> Vec<Value> {
        self.state.requests.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// Replaces the fault injection (markers on or off, rates).
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.state.faults.lock() {
            *f = faults;
        }
    }

    /// Starts (Some(status), e.g. 503) or ends (None) an outage: every completion fails.
    pub fn set_outage(&self, status: Option<u16>) {
        if let Ok(mut o) = self.state.outage.lock() {
            *o = status;
        }
    }

    /// Holds (true) or releases (false) the answers: while held, every completion is
    /// received (and listed in [`requests`](Self::requests)) but answers only once
    /// released, after its latency. Tests use it to keep a call in flight for as long
    /// as they need, instead of racing a fixed latency.
    pub fn hold(&self, held: bool) {
        self.state.held.send_replace(held);
    }

    /// Stops serving, as a process that exits would: the listener closes, requests in
    /// flight finish, idle connections are closed, new connections are refused.
    pub async fn stop(&mut self) {
        self.serving.cancel();
        let _ = (&mut self.handle).await;
    }

    /// Serves again on the same address, with the same counters and faults.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} again: {e}", self.addr))?;
        self.serving = self.shutdown.child_token();
        self.handle = serve(listener, self.router.clone(), self.serving.clone());
        Ok(())
    }

    /// The base URL to configure as `llm.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Starts serving on `bind:port` (port 0 picks one) until `shutdown` is cancelled.
pub async fn start(
    bind: &str,
    port: u16,
    config: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningSim> {
    let state = Arc::new(AppState {
        faults: std::sync::Mutex::new(config.faults.clone()),
        limiter: std::sync::Mutex::new(limits::Limiter::new(config.limits, std::time::Instant::now())),
        config,
        counters: Counters::default(),
        outage: std::sync::Mutex::new(None),
        seen: std::sync::Mutex::new(std::collections::HashSet::new()),
        rng: AtomicU64::new(0x2545_F491_4F6C_DD1D),
        requests: std::sync::Mutex::new(std::collections::VecDeque::new()),
        held: tokio::sync::watch::Sender::new(false),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/admin/requests", get(requests))
        .route("/v1/models", get(models))
        .route("/admin/outage", post(outage))
        .route("/admin/faults", post(set_faults))
        .route("/admin/limits", post(set_limits))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind((bind, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind}:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    let serving = shutdown.child_token();
    let handle = serve(listener, router.clone(), serving.clone());
    Ok(RunningSim { addr, state, handle, router, shutdown, serving })
}

/// With the product's limits (header-read and request timeouts, a connection limit).
fn serve(listener: tokio::net::TcpListener, router: Router, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let limits = enrich_common::config::HttpSettings::default();
    tokio::spawn(enrich_common::http::serve_on(listener, router, limits, stop))
}

fn openai_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"message": message.into(), "type": kind, "code": Value::Null}}))).into_response()
}

/// Text of the first user message (the record; later user turns are repair
/// instructions): a string, or the text parts of a content array.
fn first_user_text(messages: &[Value]) -> Option<String> {
    let message = messages.iter().find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    match message.get("content")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            Some(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n"))
        }
        _ => None,
    }
}

/// Rough token count: one token per four bytes, at least one.
fn tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4).max(1)
}

/// `POST /admin/faults` with `{"markers": false, "rate_429": 0.0, "rate_500": 0.0}`.
async fn set_faults(State(state): State<Arc<AppState>>, Json(faults): Json<Faults>) -> Response {
    if let Ok(mut f) = state.faults.lock() {
        *f = faults.clone();
    }
    Json(json!(faults)).into_response()
}

/// `POST /admin/limits` with `{"rpm": 600, "tpm": 100000, "burst_secs": 1}` (0: no limit).
async fn set_limits(State(state): State<Arc<AppState>>, Json(limits): Json<RateLimits>) -> Response {
    if let Err(e) = limits.validate() {
        return openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", e);
    }
    if let Ok(mut l) = state.limiter.lock() {
        *l = limits::Limiter::new(limits, std::time::Instant::now());
    }
    Json(json!(limits)).into_response()
}

fn with_headers(response: &mut Response, headers: impl IntoIterator<Item = (&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, v);
        }
    }
}

fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// xorshift64*: a uniform number in [0, 1) for the fault rates.
fn next_roll(rng: &AtomicU64) -> f64 {
    let mut x = rng.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng.store(x, Ordering::Relaxed);
    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

/// `POST /admin/outage` with `{"status": 503}` starts an outage, `{"status": null}` ends it.
async fn outage(State(state): State<Arc<AppState>>, Json(body): Json<Value>) -> Response {
    let status = body.get("status").and_then(Value::as_u64).and_then(|s| u16::try_from(s).ok());
    if let Some(code) = status
        && StatusCode::from_u16(code).is_err()
    {
        return openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", format!("{code} is not an HTTP status"));
    }
    if let Ok(mut o) = state.outage.lock() {
        *o = status;
    }
    Json(json!({"outage": status})).into_response()
}

/// The API a request came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `POST /v1/chat/completions`
    OpenAi,
    /// `POST /v1/messages`
    Anthropic,
}

impl Api {
    fn error(self, status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
        match self {
            Api::OpenAi => openai_error(status, kind, message),
            Api::Anthropic => {
                let kind = match status.as_u16() {
                    429 => "rate_limit_error",
                    400 => "invalid_request_error",
                    529 => "overloaded_error",
                    _ => "api_error",
                };
                (status, Json(json!({"type": "error", "error": {"type": kind, "message": message.into()}})))
                    .into_response()
            }
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(&state, Api::OpenAi, &headers, &body).await
}

async fn messages(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    answer(&state, Api::Anthropic, &headers, &body).await
}

/// The requests received lately (newest last): path and body. Never their headers, which
/// carry the caller's API key; the in-process `RunningSim::requests` has them for tests.
async fn requests(State(state): State<Arc<AppState>>) -> Json<Value> {
    let kept = state.requests.lock().map(|r| r.iter().map(without_headers).collect()).unwrap_or_default();
    Json(Value::Array(kept))
}

fn without_headers(request: &Value) -> Value {
    json!({"path": request["path"], "body": request["body"]})
}

/// Most requests kept for `GET /admin/requests`.
const KEPT_REQUESTS: usize = 1000;

async fn answer(state: &AppState, api: Api, headers: &axum::http::HeaderMap, body: &[u8]) -> Response {
    if let Ok(mut kept) = state.requests.lock() {
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), Value::String(v.to_str().unwrap_or("").to_string())))
            .collect();
        let body = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
        let path = if api == Api::OpenAi { "/v1/chat/completions" } else { "/v1/messages" };
        kept.push_back(json!({"path": path, "headers": headers, "body": body}));
        while kept.len() > KEPT_REQUESTS {
            kept.pop_front();
        }
    }
    let forced = state.outage.lock().ok().and_then(|o| *o);
    if let Some(code) = forced {
        state.counters.failed.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return api.error(status, "server_error", "llm-sim outage (POST /admin/outage to end it)");
    }
    let reject = |message: &str| {
        state.counters.rejected.fetch_add(1, Ordering::SeqCst);
        api.error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    };
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return reject("the body is not valid JSON");
    };
    let Some(model) = request.get("model").and_then(Value::as_str).map(str::to_string) else {
        return reject("`model` is required");
    };
    if api == Api::Anthropic && request.get("max_tokens").and_then(Value::as_u64).is_none() {
        return reject("`max_tokens` is required");
    }
    let Some(messages) = request.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return reject("`messages` must be a non-empty array");
    };
    let Some(text) = first_user_text(messages) else {
        return reject("no user message with text content");
    };
    let system = request.get("system").and_then(Value::as_str).map(tokens).unwrap_or(0);
    let prompt_tokens: u64 =
        system + messages.iter().filter_map(|m| m.get("content").and_then(Value::as_str)).map(tokens).sum::<u64>();
    // The rate limits count the prompt and the room asked for the answer.
    let max_tokens = request.get("max_tokens").or_else(|| request.get("max_completion_tokens")).and_then(Value::as_u64);
    let verdict = match state.limiter.lock() {
        Ok(mut l) => l.check(prompt_tokens + max_tokens.unwrap_or(0), std::time::Instant::now()),
        Err(_) => limits::Verdict { retry_after: None, headers: vec![] },
    };
    if let Some(wait) = verdict.retry_after {
        state.counters.rate_limited.fetch_add(1, Ordering::SeqCst);
        let mut response =
            api.error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "llm-sim rate limit reached (rpm/tpm)");
        let retry = [
            ("retry-after", wait.as_secs_f64().ceil().max(1.0).to_string()),
            ("retry-after-ms", wait.as_millis().max(1).to_string()),
        ];
        with_headers(&mut response, retry.into_iter().chain(verdict.headers));
        return response;
    }
    let faults = state.faults.lock().map(|f| f.clone()).unwrap_or_default();
    if faults.unavailable_models.contains(&model) {
        state.counters.failed.fetch_add(1, Ordering::SeqCst);
        // Anthropic says "overloaded" with 529; OpenAI-compatible servers 503.
        let status = if api == Api::Anthropic { 529 } else { 503 };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return api.error(status, "server_error", format!("llm-sim: model {model} is unavailable"));
    }
    let repair = messages.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    let first_time = state.seen.lock().map(|mut seen| seen.insert(text_hash(&text))).unwrap_or(true);
    let decision = faults::decide(&faults, &text, first_time, repair, next_roll(&state.rng));
    match decision {
        faults::Decision::Status { code, retry_after_ms } => {
            state.counters.failed.fetch_add(1, Ordering::SeqCst);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = api.error(status, "server_error", format!("llm-sim injected {code}"));
            if let Some(ms) = retry_after_ms {
                let secs = ms.div_ceil(1000).max(1);
                with_headers(&mut response, [("retry-after", secs.to_string()), ("retry-after-ms", ms.to_string())]);
            }
            return response;
        }
        faults::Decision::EchoBadRequest => {
            state.counters.failed.fetch_add(1, Ordering::SeqCst);
            return api.error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("Invalid 'messages[1].content': could not process {text:?}"),
            );
        }
        faults::Decision::Hang => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            return api.error(StatusCode::GATEWAY_TIMEOUT, "server_error", "hung");
        }
        _ => {}
    }
    let latency = state.config.latency.for_text(&text);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Released (or never held): answers at once; the sender lives as long as the state.
    let _ = state.held.subscribe().wait_for(|held| !held).await;

    let mut answer = rules::enrich(&text);
    // Honour the schema asked for (OpenAI's response format, or the forced tool's input
    // schema): answer only the properties it names.
    let schema = match api {
        Api::OpenAi => request
            .pointer("/response_format/json_schema/schema/properties")
            .or_else(|| request.pointer("/response_format/schema/properties")),
        Api::Anthropic => request.pointer("/tools/0/input_schema/properties"),
    };
    if let Some(props) = schema.and_then(Value::as_object)
        && let Value::Object(fields) = &mut answer
    {
        fields.retain(|k, _| props.contains_key(k));
    }
    if let Some(n) = faults::answer_bytes(&faults, &text) {
        pad_tags(&mut answer, n);
    }
    let refusal = (decision == faults::Decision::Refuse).then(|| format!("I can't help with {text:?}."));
    let content = match decision {
        faults::Decision::Refuse => String::new(),
        faults::Decision::InvalidJson => format!("Sure! Here is the enrichment: {answer}"),
        faults::Decision::SchemaViolation => json!({"category": "spaceship", "mood": "?"}).to_string(),
        _ => answer.to_string(),
    };
    let completion_tokens = tokens(&content);
    let n = state.counters.completions.fetch_add(1, Ordering::SeqCst) + 1;
    state.counters.prompt_tokens.fetch_add(prompt_tokens, Ordering::SeqCst);
    state.counters.completion_tokens.fetch_add(completion_tokens, Ordering::SeqCst);
    let mut response = match api {
        Api::OpenAi => {
            let created =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            Json(json!({
                "id": format!("chatcmpl-sim-{n}"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": match &refusal {
                        Some(r) => json!({"role": "assistant", "content": Value::Null, "refusal": r}),
                        None => json!({"role": "assistant", "content": content, "refusal": Value::Null}),
                    },
                    "finish_reason": "stop"
                }],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens
                }
            }))
            .into_response()
        }
        Api::Anthropic => {
            // The forced tool's call carries the answer; text that is not JSON comes
            // back as a text block (a model that ignored the tool).
            let tool = request.pointer("/tools/0/name").and_then(Value::as_str).unwrap_or("enrichment");
            let block = match serde_json::from_str::<Value>(&content) {
                _ if refusal.is_some() => json!({"type": "text", "text": refusal.clone().unwrap_or_default()}),
                Ok(input) if input.is_object() => {
                    json!({"type": "tool_use", "id": format!("toolu_sim_{n}"), "name": tool, "input": input})
                }
                _ => json!({"type": "text", "text": content}),
            };
            Json(json!({
                "id": format!("msg_sim_{n}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": if refusal.is_some() { "refusal" } else { "tool_use" },
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
            }))
            .into_response()
        }
    };
    with_headers(&mut response, verdict.headers);
    response
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.config.model, "object": "model", "created": 0, "owned_by": "llm-sim"}]
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let c = &state.counters;
    format!(
        "# HELP llm_sim_completions_total Chat completions answered with 200.\n\
         # TYPE llm_sim_completions_total counter\n\
         llm_sim_completions_total {}\n\
         # HELP llm_sim_rejected_total Requests rejected with 400.\n\
         # TYPE llm_sim_rejected_total counter\n\
         llm_sim_rejected_total {}\n\
         # HELP llm_sim_failed_total Requests answered with the outage status.\n\
         # TYPE llm_sim_failed_total counter\n\
         llm_sim_failed_total {}\n\
         # HELP llm_sim_rate_limited_total Requests refused with 429 by the rate limits.\n\
         # TYPE llm_sim_rate_limited_total counter\n\
         llm_sim_rate_limited_total {}\n\
         # HELP llm_sim_prompt_tokens_total Prompt tokens counted.\n\
         # TYPE llm_sim_prompt_tokens_total counter\n\
         llm_sim_prompt_tokens_total {}\n\
         # HELP llm_sim_completion_tokens_total Completion tokens returned.\n\
         # TYPE llm_sim_completion_tokens_total counter\n\
         llm_sim_completion_tokens_total {}\n",
        c.completions.load(Ordering::SeqCst),
        c.rejected.load(Ordering::SeqCst),
        c.failed.load(Ordering::SeqCst),
        c.rate_limited.load(Ordering::SeqCst),
        c.prompt_tokens.load(Ordering::SeqCst),
        c.completion_tokens.load(Ordering::SeqCst),
    )
}

/// Pads the answer's `tags` with schema-valid tags of 1,000 characters until its JSON is at
/// least `n` bytes (`[[sim:answer-bytes:N]]`).
fn pad_tags(answer: &mut Value, n: usize) {
    let mut len = answer.to_string().len();
    let Some(tags) = answer.get_mut("tags").and_then(Value::as_array_mut) else { return };
    let mut i = 0usize;
    while len < n {
        let tag = format!("pad-{i:06}-{}", "x".repeat(989));
        len += tag.len() + 3;
        tags.push(Value::String(tag));
        i += 1;
    }
}
