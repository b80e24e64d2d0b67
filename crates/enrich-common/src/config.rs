//! Typed configuration: one TOML file per deployment, every key overridable by an
//! `ENRICH_<SECTION>__<KEY>` environment variable (double underscore between levels,
//! e.g. `ENRICH_KAFKA__BOOTSTRAP_SERVERS`, `ENRICH_LLM__MODEL`). Validated at start;
//! errors name the offending field and say what is wrong, never its value (a value may
//! be a password). An override is text unless the key's type wants a number, a boolean, a
//! list or a table: a token `0123`, a password `1e3` or `true` stay as they were typed.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::idempotency::KeyStrategy;

mod ui;
pub use ui::UiSettings;

/// A configuration error, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{field}`: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// A value that must never reach a log line.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Client properties passed through as text (librdkafka's `kafka.client`). `Debug` shows
/// every key but hides the value of each secret-looking one (passwords, keys, tokens,
/// JAAS or OAuth configuration).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties(BTreeMap<String, String>);

impl Properties {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.get(key)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<(String, String)> for Properties {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar_map(d).map(Self)
    }
}

/// Whether a property or header name looks like it holds a credential.
pub fn secret_looking(key: &str) -> bool {
    const WORDS: [&str; 9] =
        ["password", "passwd", "secret", "token", "key", "credential", "jaas", "oauthbearer.config", "auth"];
    let key = key.to_ascii_lowercase();
    WORDS.iter().any(|w| key.contains(w))
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (k, v) in &self.0 {
            if secret_looking(k) {
                map.entry(k, &format_args!("***"));
            } else {
                map.entry(k, v);
            }
        }
        map.finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub pipeline: PipelineSettings,
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub topics: Topics,
    pub database: DatabaseSettings,
    pub llm: LlmSettings,
    #[serde(default)]
    pub ingest: IngestSettings,
    #[serde(default)]
    pub enricher: EnricherSettings,
    #[serde(default)]
    pub publisher: PublisherSettings,
    #[serde(default)]
    pub dlq_replayer: DlqReplayerSettings,
    #[serde(default)]
    pub dlq_limit: DlqLimitSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub ui: UiSettings,
}

/// What every HTTP server of the product (health, metrics, the admin API) allows a client.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// A connection that has not sent a whole request head within this time is closed (a
    /// half-sent request cannot hold a connection).
    pub header_read_timeout_ms: u64,
    /// A request (its body read and its answer) taking longer is answered 503. A replay
    /// cut short this way still runs to its end.
    pub request_timeout_ms: u64,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { header_read_timeout_ms: 5_000, request_timeout_ms: 60_000, max_connections: 256 }
    }
}

/// What the spans may carry (export itself is configured by the standard `OTEL_*`
/// variables).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Put prompts and completions on the LLM call spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`). Off by default: event contents stay out of traces.
    pub capture_content: bool,
}

/// The run history and step outcomes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// Audit rows older than this many days are deleted by the dlq-replayer's retention
    /// job. 0 keeps them forever.
    pub retention_days: u32,
    /// How often the retention job runs.
    pub retention_interval_secs: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self { retention_days: 30, retention_interval_secs: 3600 }
    }
}

/// When a stage stops dead-lettering (see enrich_common::dlq_limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlqLimitSettings {
    /// How many recent records the share is computed over.
    pub window: usize,
    /// Largest share of dead letters among them.
    pub max_share: f64,
    /// Most dead letters in a row.
    pub max_consecutive: u32,
    /// The share is judged only once the window holds this many records.
    pub min_records: usize,
}

impl Default for DlqLimitSettings {
    fn default() -> Self {
        Self { window: 500, max_share: 0.5, max_consecutive: 100, min_records: 50 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Namespaces idempotency keys, consumer groups and database rows.
    pub name: String,
    /// The source topics and how each derives its idempotency key.
    pub sources: Vec<SourceTopic>,
    /// Larger source records are dead-lettered (`too_large`) without LLM spend.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

fn default_max_record_bytes() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceTopic {
    pub topic: String,
    pub key: KeyStrategy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// librdkafka properties passed through unchanged to every client (SASL, TLS, ...).
    /// Numbers and booleans are accepted and passed as their text; an `ENRICH_*` override
    /// is passed exactly as typed. `Debug` hides secret-looking values.
    pub client: Properties,
    /// Whether stages create the topics they write to when missing.
    pub create_topics: bool,
    /// Partitions of the topics a stage creates.
    pub partitions: i32,
    pub replication_factor: i32,
}

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// librdkafka's bounds of `message.max.bytes`.
const MESSAGE_MAX_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1_000..=1_000_000_000;

impl KafkaSettings {
    /// The largest record the stages' producers accept (`message.max.bytes`: the
    /// `kafka.client` override, else librdkafka's default), value, key and headers
    /// together. Validated at start.
    pub fn message_max_bytes(&self) -> usize {
        self.client
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client: Properties::default(),
            create_topics: true,
            partitions: 12,
            replication_factor: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub requests: String,
    pub retry: String,
    pub results: String,
    pub output: String,
    pub dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            requests: "enrich.requests".into(),
            retry: "enrich.retry".into(),
            results: "enrich.results".into(),
            output: "events.enriched".into(),
            dlq: "enrich.dlq".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/db`; never logged.
    pub url: Secret,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Apply pending migrations at start (safe with many replicas: sqlx takes a lock).
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

fn default_max_connections() -> u32 {
    10
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// The API spoken: `openai` (chat completions: OpenAI, Azure OpenAI's compatible
    /// endpoint, vLLM, Ollama, llama.cpp server, LiteLLM) or `anthropic` (Messages).
    #[serde(default)]
    pub provider: Provider,
    /// Base URL of the API, up to and including `/v1`.
    pub base_url: String,
    /// How an OpenAI-compatible API is asked for structured output: `json_schema`
    /// (OpenAI, vLLM, recent llama.cpp server), `json_object` (`{"type": "json_object",
    /// "schema": ...}`: llama-cpp-python's server) or `none` (the prompt alone; the answer
    /// is validated either way).
    #[serde(default)]
    pub response_format: ResponseFormat,
    /// Extra HTTP headers sent with every call (an Azure `api-key`, a gateway's routing
    /// header). Values are never logged (`Debug` hides every one).
    #[serde(default)]
    pub extra_headers: BTreeMap<String, Secret>,
    /// Name of the environment variable holding the API key (the key itself is never in
    /// the file). Unset: no Authorization header.
    #[serde(default)]
    pub api_key_env: Option<String>,
    pub model: String,
    /// Models tried in order, within the same attempt, when the one before is
    /// unavailable (502/503/504/529, a timeout) or unknown (404). The answer records the
    /// model that gave it.
    #[serde(default)]
    pub fallback_models: Vec<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    /// The most bytes of an answer's body read; a longer one fails the call
    /// (`bad_response`, permanent) and is not read further.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// The system message, sent as is.
    pub system_prompt: String,
    /// A minijinja template rendered over the record's JSON fields (and `record`, the
    /// whole object): the user message.
    pub user_template: String,
    /// The record's top-level fields the template may see; the others never leave the
    /// process. Unset: every field.
    #[serde(default)]
    pub input_fields: Option<Vec<String>>,
    /// The longest user message sent, in characters.
    #[serde(default = "default_max_input_chars")]
    pub max_input_chars: usize,
    /// What happens to a longer one: `truncate` (cut, marked `[input truncated]`) or
    /// `dead_letter` (reason `input_too_long`).
    #[serde(default)]
    pub oversized_input: OversizedInput,
    /// The JSON schema the answer must satisfy (JSON text).
    pub output_schema: String,
    /// Paid attempts per key over all deliveries, counted in PostgreSQL before each
    /// call; then the record is dead-lettered (`max_attempts`).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Quick in-process retries of a transient failure within one delivery (exponential
    /// backoff, full jitter, `Retry-After` honoured). After them the record goes to the
    /// retry topic, due `retry_delay_ms` later.
    #[serde(default = "default_quick_retries")]
    pub quick_retries: u32,
    /// 429s one record may receive in one delivery while the endpoint answers the
    /// replica's other calls (since the record's previous 429, more of them answered
    /// than refused: a provider refusing this record, e.g. an oversized request, not
    /// throttling everyone); past them its attempts count: the retry topic, then the DLQ
    /// after `max_attempts`. 429s while the other calls are refused too (a provider-wide
    /// throttle) are never charged: flow control slows consumption.
    #[serde(default = "default_max_rate_limited")]
    pub max_rate_limited: u32,
    /// Delay of the first delayed retry through the retry topic; doubled for each later
    /// one, up to `retry_max_delay_ms`.
    #[serde(default = "default_retry_delay_ms")]
    pub retry_delay_ms: u64,
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// Consecutive endpoint failures (timeouts, connection errors, 429, 5xx, 401/403)
    /// that open the circuit breaker: calls pause, nothing is dead-lettered.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe call.
    #[serde(default = "default_breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// Spend limits, each over a fixed window: `[[llm.budgets]] usd = 5.0,
    /// window_secs = 3600`. A call's estimated cost is reserved in every window before it
    /// starts; when one would be passed, calls wait for the next window.
    #[serde(default)]
    pub budgets: Vec<BudgetWindow>,
    /// How long a validated answer stays in the response cache (PostgreSQL), served to
    /// any record with the same provider, model, prompt version and rendered input.
    /// 0: no cache.
    #[serde(default)]
    pub cache_ttl_secs: u64,
    /// Prices in USD per million tokens, for the cost recorded per call (audit, metrics,
    /// spans). 0: cost not tracked.
    #[serde(default)]
    pub input_usd_per_mtok: f64,
    #[serde(default)]
    pub output_usd_per_mtok: f64,
    /// Prices per model (the longest configured name the model starts with), for the
    /// models whose prices differ from the pair above: `[llm.prices."gpt-4o-mini"]
    /// input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.6`.
    #[serde(default)]
    pub prices: BTreeMap<String, ModelPrice>,
    /// Requests per minute this replica sends at most (a token bucket holding one
    /// second's allowance). 0: no limit. Set it to the provider's limit divided by the
    /// replicas.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Tokens per minute (prompt estimate + `max_output_tokens`, settled with the real
    /// usage after the call) this replica uses at most. 0: no limit.
    #[serde(default)]
    pub tokens_per_minute: u32,
    /// Adapt the concurrency limit (AIMD between `min_concurrency` and
    /// `enricher.max_in_flight`): halve it on a 429, lower it when latency rises, grow it
    /// back while calls are answered.
    #[serde(default = "default_true")]
    pub adaptive_concurrency: bool,
    #[serde(default = "default_min_concurrency")]
    pub min_concurrency: usize,
    /// Latency counts as rising when the recent average passes this many times the
    /// long-run one. 0: latency is not a signal (429s alone lower the limit).
    #[serde(default = "default_latency_tolerance")]
    pub latency_tolerance: f64,
}

/// A model's prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

impl LlmSettings {
    /// The prices of `model`: the longest configured name it starts with, else the
    /// default pair.
    pub fn price_of(&self, model: &str) -> ModelPrice {
        self.prices
            .iter()
            .filter(|(name, _)| model.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
            .unwrap_or(ModelPrice {
                input_usd_per_mtok: self.input_usd_per_mtok,
                output_usd_per_mtok: self.output_usd_per_mtok,
            })
    }

    /// Whether any call has a price (a budget needs one).
    fn priced(&self) -> bool {
        self.input_usd_per_mtok > 0.0
            || self.output_usd_per_mtok > 0.0
            || self.prices.values().any(|p| p.input_usd_per_mtok > 0.0 || p.output_usd_per_mtok > 0.0)
    }
}

fn default_min_concurrency() -> usize {
    1
}
fn default_latency_tolerance() -> f64 {
    2.0
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_max_output_tokens() -> u32 {
    512
}
fn default_max_response_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_max_attempts() -> u32 {
    4
}
fn default_max_input_chars() -> usize {
    32_000
}
fn default_quick_retries() -> u32 {
    1
}
fn default_max_rate_limited() -> u32 {
    5
}
fn default_retry_delay_ms() -> u64 {
    30_000
}
fn default_retry_max_delay_ms() -> u64 {
    600_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_ms() -> u64 {
    5_000
}

/// One budget: at most `usd` of LLM spend per `window_secs`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetWindow {
    pub usd: f64,
    pub window_secs: u64,
}

/// How structured output is requested from an OpenAI-compatible API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    JsonSchema,
    JsonObject,
    None,
}

/// What the enricher does with a rendered input over `llm.max_input_chars`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OversizedInput {
    #[default]
    Truncate,
    DeadLetter,
}

/// Which LLM API the enricher speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// OpenAI chat completions, `response_format` with `json_schema`.
    #[default]
    Openai,
    /// Anthropic Messages; the schema goes in as a tool's input schema.
    Anthropic,
}

/// Consumer settings every stage has.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerTuning {
    /// Most records handled as one batch (one database round trip per step).
    pub batch_size: usize,
    /// Most bytes (values, keys, headers) in one batch: a batch is closed once it holds
    /// this many, however few records that is (at least one).
    pub batch_max_bytes: usize,
    /// How long a batch waits for more records after its first.
    pub batch_linger_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    pub http_port: u16,
    /// Default `<pipeline>.ingest-dedup`.
    pub group_id: Option<String>,
    pub batch_size: usize,
    /// Most bytes of source records in one batch (see `ConsumerTuning`).
    pub batch_max_bytes: usize,
    pub batch_linger_ms: u64,
}

/// The default byte bound of a stage's batch: a run of 1 MB records makes batches of 8.
const DEFAULT_BATCH_MAX_BYTES: usize = 8 << 20;

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            http_port: 9101,
            group_id: None,
            batch_size: 500,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_linger_ms: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnricherSettings {
    pub http_port: u16,
    /// Default `<pipeline>.enricher`.
    pub group_id: Option<String>,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    /// Most records being enriched at once in one replica (LLM calls in flight).
    pub max_in_flight: usize,
    /// A partition holding this many unfinished records is paused until it drains to
    /// half: the bound on memory whatever the backlog.
    pub max_buffered_per_partition: usize,
    /// Bytes (values, keys, headers) of unfinished records over all partitions of the
    /// replica: past it, every partition that delivers a record is paused until they
    /// drain to half. The bound on memory whatever the records' size.
    pub max_buffered_bytes: usize,
    /// `key`: records of one Kafka key run in order, different keys concurrently; a
    /// delayed retry may be overtaken by later records of its key.
    /// `strict-key`: as `key`, and later records of a key whose earlier record waits for
    /// a delayed retry or sits in the DLQ are parked, and released in order once it is
    /// enriched (after a retry or a replay) or discarded.
    /// `partition`: one record at a time per partition (the classic consumer).
    pub ordering: OrderingMode,
    /// How long a replica holds a key for one LLM call; must exceed the request timeout
    /// so a live call is never duplicated. A replica that dies holding a key delays that
    /// key by at most this long.
    pub lease_ms: u64,
    /// Replica identity recorded as the lease owner. Default: a random id per process.
    pub instance_id: Option<String>,
    /// Testing only: a record whose payload contains `[[enricher:abort]]` aborts the
    /// process right after its attempt is counted (to prove crash loops end in the DLQ).
    pub failpoints: bool,
}

impl Default for EnricherSettings {
    fn default() -> Self {
        Self {
            http_port: 9102,
            group_id: None,
            batch_size: 256,
            batch_linger_ms: 10,
            max_in_flight: 64,
            max_buffered_per_partition: 1000,
            max_buffered_bytes: 64 << 20,
            ordering: OrderingMode::Key,
            lease_ms: 60_000,
            instance_id: None,
            failpoints: false,
        }
    }
}

/// How the enricher orders records inside a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    Key,
    #[serde(rename = "strict-key", alias = "strict_key")]
    StrictKey,
    Partition,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublisherSettings {
    pub http_port: u16,
    /// Default `<pipeline>.publisher`.
    pub group_id: Option<String>,
    pub batch_size: usize,
    /// Most bytes of results records in one batch, one transaction (see
    /// `ConsumerTuning`).
    pub batch_max_bytes: usize,
    pub batch_linger_ms: u64,
    /// Kafka transactional id; must be stable across restarts of one replica so a
    /// restarted publisher fences its previous incarnation. Default
    /// `<pipeline>.publisher.<hostname>`.
    pub transactional_id: Option<String>,
    pub transaction_timeout_ms: u64,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            http_port: 9103,
            group_id: None,
            batch_size: 500,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_linger_ms: 20,
            transactional_id: None,
            transaction_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlqReplayerSettings {
    pub http_port: u16,
    /// The same admin API over gRPC (`enrichment.admin.v1.DeadLetters`).
    pub grpc_port: u16,
    /// Bearer token every mutating admin call must carry (replay, discard, pause,
    /// resume); it reads too. At least 16 characters. Unset or empty: those calls are
    /// refused with 401. Secret: set it with ENRICH_DLQ_REPLAYER__ADMIN_TOKEN.
    pub admin_token: Option<Secret>,
    /// Bearer token for the admin API's reads (list, show, history, the kill switch's
    /// state); at least 16 characters. With either token set, every read needs one of
    /// them. With neither, reads are open (a demo) but never return a payload.
    pub read_token: Option<Secret>,
    /// A key is replayed at most this many times; further replays are refused.
    pub max_replays_per_key: u32,
    /// Replays produced per second at most.
    pub replay_rate_per_sec: u32,
}

impl Default for DlqReplayerSettings {
    fn default() -> Self {
        Self {
            http_port: 9104,
            grpc_port: 9105,
            admin_token: None,
            read_token: None,
            max_replays_per_key: 3,
            replay_rate_per_sec: 200,
        }
    }
}

/// The stages, for naming groups and ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingest,
    Enricher,
    Publisher,
    DlqReplayer,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest-dedup",
            Stage::Enricher => "enricher",
            Stage::Publisher => "publisher",
            Stage::DlqReplayer => "dlq-replayer",
        }
    }
}

impl Settings {
    /// Reads the file, applies `ENRICH_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("--config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment overrides and validates the result.
    pub fn from_toml(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| file_error(text, &e))?;
        let overrides = env_overrides(env)?;
        for o in &overrides {
            o.apply(&mut doc, toml::Value::String(o.raw.clone()))?;
        }
        // Every override is text first. One the key's type refuses as text (a number, a
        // boolean, a list, a table) is read as a TOML value instead, and the whole is read
        // again: at most once per override.
        let mut typed = vec![false; overrides.len()];
        loop {
            let read: Result<Settings, _> = serde_path_to_error::deserialize(toml::Value::Table(doc.clone()));
            match read {
                Ok(settings) => {
                    settings.validate()?;
                    return Ok(settings);
                }
                Err(e) => {
                    let at = e.path().to_string();
                    let retry = overrides.iter().position(|o| o.dotted() == at).filter(|&i| !typed[i]).and_then(|i| {
                        let value = parse_env_value(&overrides[i].raw);
                        (!value.is_str()).then_some((i, value))
                    });
                    match retry {
                        Some((i, value)) => {
                            typed[i] = true;
                            overrides[i].apply(&mut doc, value)?;
                        }
                        None => return Err(ConfigError::new(at, describe(&e.into_inner().to_string()))),
                    }
                }
            }
        }
    }

    pub fn group_id(&self, stage: Stage) -> String {
        let configured = match stage {
            Stage::Ingest => self.ingest.group_id.clone(),
            Stage::Enricher => self.enricher.group_id.clone(),
            Stage::Publisher => self.publisher.group_id.clone(),
            Stage::DlqReplayer => None,
        };
        configured.unwrap_or_else(|| format!("{}.{}", self.pipeline.name, stage.as_str()))
    }

    pub fn source_topics(&self) -> Vec<&str> {
        self.pipeline.sources.iter().map(|s| s.topic.as_str()).collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        let name_ok = !p.name.is_empty()
            && p.name.len() <= 100
            && p.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(ConfigError::new(
                "pipeline.name",
                "must be 1-100 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if p.sources.is_empty() {
            return Err(ConfigError::new("pipeline.sources", "at least one source topic is required"));
        }
        for (i, source) in p.sources.iter().enumerate() {
            if source.topic.trim().is_empty() {
                return Err(ConfigError::new(format!("pipeline.sources[{i}].topic"), "must not be empty"));
            }
            match &source.key {
                KeyStrategy::JsonPointer { pointers } => {
                    if pointers.is_empty() {
                        return Err(ConfigError::new(
                            format!("pipeline.sources[{i}].key.pointers"),
                            "at least one JSON pointer is required",
                        ));
                    }
                    if let Some(j) = pointers.iter().position(|ptr| !ptr.starts_with('/')) {
                        return Err(ConfigError::new(
                            format!("pipeline.sources[{i}].key.pointers[{j}]"),
                            "is not a JSON pointer (it must start with '/')",
                        ));
                    }
                }
                KeyStrategy::Header { name } if name.is_empty() => {
                    return Err(ConfigError::new(format!("pipeline.sources[{i}].key.name"), "must not be empty"));
                }
                _ => {}
            }
        }
        if p.max_record_bytes == 0 {
            return Err(ConfigError::new("pipeline.max_record_bytes", "must be greater than 0"));
        }
        if let Some(v) = self.kafka.client.get("message.max.bytes")
            && !v.trim().parse::<usize>().is_ok_and(|n| MESSAGE_MAX_BYTES_RANGE.contains(&n))
        {
            return Err(ConfigError::new(
                "kafka.client.message.max.bytes",
                "must be a whole number of bytes from 1000 to 1000000000",
            ));
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::new("kafka.bootstrap_servers", "must not be empty"));
        }
        if self.kafka.partitions < 1 {
            return Err(ConfigError::new("kafka.partitions", "must be at least 1"));
        }
        if self.kafka.replication_factor < 1 {
            return Err(ConfigError::new("kafka.replication_factor", "must be at least 1"));
        }
        let t = &self.topics;
        let named = [
            ("topics.requests", &t.requests),
            ("topics.retry", &t.retry),
            ("topics.results", &t.results),
            ("topics.output", &t.output),
            ("topics.dlq", &t.dlq),
        ];
        for (i, (field, topic)) in named.iter().enumerate() {
            if topic.trim().is_empty() {
                return Err(ConfigError::new(*field, "must not be empty"));
            }
            if let Some((other, _)) = named[..i].iter().find(|(_, o)| o == topic) {
                return Err(ConfigError::new(*field, format!("is the same topic as `{other}`")));
            }
            if p.sources.iter().any(|s| &s.topic == *topic) {
                return Err(ConfigError::new(*field, "is also a source topic"));
            }
        }
        let url = self.database.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            // The value itself may hold a password: name the field, not the value.
            return Err(ConfigError::new("database.url", "must be a postgres:// URL"));
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::new("database.max_connections", "must be at least 1"));
        }
        let llm = &self.llm;
        if !(llm.base_url.starts_with("http://") || llm.base_url.starts_with("https://")) {
            // The URL may carry a key in its query string or its user part: never echoed.
            return Err(ConfigError::new("llm.base_url", "must be an http:// or https:// URL"));
        }
        if llm.model.trim().is_empty() {
            return Err(ConfigError::new("llm.model", "must not be empty"));
        }
        if llm.request_timeout_ms == 0 || llm.connect_timeout_ms == 0 {
            return Err(ConfigError::new("llm.request_timeout_ms", "timeouts must be greater than 0"));
        }
        if llm.max_response_bytes < 1024 {
            return Err(ConfigError::new("llm.max_response_bytes", "must be at least 1024"));
        }
        if llm.max_attempts == 0 {
            return Err(ConfigError::new("llm.max_attempts", "must be at least 1"));
        }
        if llm.max_rate_limited == 0 {
            return Err(ConfigError::new("llm.max_rate_limited", "must be at least 1"));
        }
        if llm.breaker_failures == 0 {
            return Err(ConfigError::new("llm.breaker_failures", "must be at least 1"));
        }
        for b in &llm.budgets {
            if !(b.usd > 0.0 && b.usd.is_finite()) || b.window_secs == 0 {
                return Err(ConfigError::new("llm.budgets", "each needs usd > 0 and window_secs > 0"));
            }
            if !llm.priced() {
                return Err(ConfigError::new(
                    "llm.budgets",
                    "a budget needs prices (llm.input_usd_per_mtok, llm.output_usd_per_mtok or llm.prices)",
                ));
            }
        }
        for (i, m) in llm.fallback_models.iter().enumerate() {
            if m.trim().is_empty() || *m == llm.model || llm.fallback_models[..i].contains(m) {
                return Err(ConfigError::new(
                    format!("llm.fallback_models[{i}]"),
                    "must name a model other than llm.model and the fallbacks before it",
                ));
            }
        }
        let price_ok = |x: f64| x.is_finite() && x >= 0.0;
        if !price_ok(llm.input_usd_per_mtok) || !price_ok(llm.output_usd_per_mtok) {
            return Err(ConfigError::new("llm.input_usd_per_mtok", "prices must be finite and not negative"));
        }
        for (name, p) in &llm.prices {
            if name.is_empty() || !price_ok(p.input_usd_per_mtok) || !price_ok(p.output_usd_per_mtok) {
                return Err(ConfigError::new(
                    format!("llm.prices.{name:?}"),
                    "needs a model name and finite, non-negative prices",
                ));
            }
        }
        if llm.min_concurrency == 0 || llm.min_concurrency > self.enricher.max_in_flight {
            return Err(ConfigError::new("llm.min_concurrency", "must be between 1 and enricher.max_in_flight"));
        }
        if !(llm.latency_tolerance == 0.0 || (llm.latency_tolerance > 1.0 && llm.latency_tolerance.is_finite())) {
            return Err(ConfigError::new("llm.latency_tolerance", "must be 0 (off) or greater than 1"));
        }
        if llm.max_input_chars == 0 {
            return Err(ConfigError::new("llm.max_input_chars", "must be greater than 0"));
        }
        if llm.retry_delay_ms == 0 {
            return Err(ConfigError::new("llm.retry_delay_ms", "must be greater than 0"));
        }
        if llm.retry_max_delay_ms < llm.retry_delay_ms {
            return Err(ConfigError::new("llm.retry_max_delay_ms", "must be at least llm.retry_delay_ms"));
        }
        if llm.breaker_open_ms == 0 {
            return Err(ConfigError::new("llm.breaker_open_ms", "must be greater than 0"));
        }
        match serde_json::from_str::<serde_json::Value>(&llm.output_schema) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => {
                return Err(ConfigError::new("llm.output_schema", "must be a JSON object"));
            }
            Err(e) => {
                return Err(ConfigError::new("llm.output_schema", format!("is not valid JSON: {e}")));
            }
        }
        if let Some(var) = &llm.api_key_env
            && var.trim().is_empty()
        {
            return Err(ConfigError::new("llm.api_key_env", "must name an environment variable"));
        }
        for (field, size) in [
            ("ingest.batch_size", self.ingest.batch_size),
            ("enricher.batch_size", self.enricher.batch_size),
            ("enricher.max_in_flight", self.enricher.max_in_flight),
            ("enricher.max_buffered_per_partition", self.enricher.max_buffered_per_partition),
            ("enricher.max_buffered_bytes", self.enricher.max_buffered_bytes),
            ("publisher.batch_size", self.publisher.batch_size),
            ("ingest.batch_max_bytes", self.ingest.batch_max_bytes),
            ("publisher.batch_max_bytes", self.publisher.batch_max_bytes),
        ] {
            if size == 0 {
                return Err(ConfigError::new(field, "must be at least 1"));
            }
        }
        if self.enricher.lease_ms <= llm.request_timeout_ms {
            return Err(ConfigError::new(
                "enricher.lease_ms",
                "must exceed llm.request_timeout_ms, or a slow call could be repeated by another replica",
            ));
        }
        let limit = &self.dlq_limit;
        if limit.window == 0 || limit.min_records > limit.window {
            return Err(ConfigError::new(
                "dlq_limit.min_records",
                "must be at most dlq_limit.window (and the window at least 1)",
            ));
        }
        if !(limit.max_share > 0.0 && limit.max_share <= 1.0) {
            return Err(ConfigError::new("dlq_limit.max_share", "must be in (0, 1]"));
        }
        if limit.max_consecutive == 0 {
            return Err(ConfigError::new("dlq_limit.max_consecutive", "must be at least 1"));
        }
        if self.dlq_replayer.replay_rate_per_sec == 0 {
            return Err(ConfigError::new("dlq_replayer.replay_rate_per_sec", "must be at least 1"));
        }
        for (field, token) in [
            ("dlq_replayer.admin_token", &self.dlq_replayer.admin_token),
            ("dlq_replayer.read_token", &self.dlq_replayer.read_token),
        ] {
            if token.as_ref().is_some_and(|t| !t.expose().is_empty() && t.expose().len() < 16) {
                return Err(ConfigError::new(field, "must be at least 16 characters"));
            }
        }
        let http = &self.http;
        for (field, value) in [
            ("http.header_read_timeout_ms", http.header_read_timeout_ms),
            ("http.request_timeout_ms", http.request_timeout_ms),
            ("http.max_connections", http.max_connections as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be greater than 0"));
            }
        }
        if self.publisher.transaction_timeout_ms < 1_000 {
            return Err(ConfigError::new("publisher.transaction_timeout_ms", "must be at least 1000"));
        }
        self.ui.validate()?;
        Ok(())
    }
}

impl IngestSettings {
    pub fn tuning(&self) -> ConsumerTuning {
        ConsumerTuning {
            batch_size: self.batch_size,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger_ms: self.batch_linger_ms,
        }
    }
}
impl EnricherSettings {
    pub fn tuning(&self) -> ConsumerTuning {
        ConsumerTuning {
            batch_size: self.batch_size,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_linger_ms: self.batch_linger_ms,
        }
    }
}
impl PublisherSettings {
    pub fn tuning(&self) -> ConsumerTuning {
        ConsumerTuning {
            batch_size: self.batch_size,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger_ms: self.batch_linger_ms,
        }
    }
}

/// A table of scalars read as text (librdkafka takes every property as a string).
fn scalar_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| match v {
            toml::Value::String(s) => Ok((k, s)),
            toml::Value::Integer(i) => Ok((k, i.to_string())),
            toml::Value::Float(f) => Ok((k, f.to_string())),
            toml::Value::Boolean(b) => Ok((k, b.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "must be a string, number or boolean (`{k}` is {})",
                other.type_str()
            ))),
        })
        .collect()
}

const ENV_PREFIX: &str = "ENRICH_";

/// One `ENRICH_A__B__C=v` variable: it sets `a.b.c`.
struct Override {
    name: String,
    path: Vec<String>,
    raw: String,
}

impl Override {
    fn dotted(&self) -> String {
        self.path.join(".")
    }

    fn apply(&self, doc: &mut toml::Table, value: toml::Value) -> Result<(), ConfigError> {
        let (last, parents) = self.path.split_last().ok_or_else(|| ConfigError::new(&self.name, "empty path"))?;
        let mut table = doc;
        for segment in parents {
            let entry = table.entry(segment.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::new(self.dotted(), format!("{}: `{segment}` is not a table", self.name)))?;
        }
        table.insert(last.clone(), value);
        Ok(())
    }
}

/// The `ENRICH_*` variables that are configuration paths, in a stable order; a name given
/// twice takes its last value. Variables without `__` (such as an API key named by
/// `llm.api_key_env`) are not paths.
fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> Result<Vec<Override>, ConfigError> {
    let vars: BTreeMap<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__")).collect();
    vars.into_iter()
        .map(|(name, raw)| {
            let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::new(name, "empty path segment in environment override"));
            }
            Ok(Override { name, path, raw })
        })
        .collect()
}

/// Numbers, booleans, arrays and inline tables in TOML syntax; anything else is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// The file is not TOML: where, and the parser's complaint, without the line itself
/// (which may hold a password).
fn file_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!(" at line {line}, column {column}")
    });
    ConfigError::new("<file>", format!("is not valid TOML{}", at.unwrap_or_default()))
}

/// What a deserialization error says is wrong, without the value it found: serde's
/// messages quote it ("invalid type: string \"1234\", expected u32").
fn describe(message: &str) -> String {
    let message = message.trim_end();
    let expected = message.rsplit_once(", expected ").map(|(_, e)| e);
    let wanted = |what: &str| match expected {
        Some(e) => format!("{what} (expected {e})"),
        None => what.to_string(),
    };
    if message.starts_with("invalid type") {
        wanted("has the wrong type")
    } else if message.starts_with("invalid value") {
        wanted("has an invalid value")
    } else if message.starts_with("invalid length") {
        wanted("has the wrong number of items")
    } else if message.starts_with("unknown variant") {
        wanted("is not one of the accepted values")
    } else if ["missing field", "unknown field", "duplicate field", "must be "].iter().any(|p| message.starts_with(p)) {
        // These name fields and types only.
        message.to_string()
    } else {
        "is not a valid value".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[pipeline]
name = "support"
[[pipeline.sources]]
topic = "events.raw"
key = { strategy = "json_pointer", pointers = ["/id"] }
[database]
url = "postgres://enrich:s3cret@127.0.0.1:5432/enrich"
[llm]
base_url = "http://127.0.0.1:8080/v1"
model = "sim"
system_prompt = "You enrich tickets."
user_template = "{{ subject }}"
output_schema = '{"type": "object"}'
"#;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_toml(BASE, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let s = load(&[]).unwrap();
        assert_eq!(s.topics.requests, "enrich.requests");
        assert_eq!(s.kafka.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(s.group_id(Stage::Enricher), "support.enricher");
        assert_eq!(s.pipeline.max_record_bytes, 1024 * 1024);
    }

    #[test]
    fn strict_key_ordering_is_spelled_as_documented() {
        let s = load(&[("ENRICH_ENRICHER__ORDERING", "strict-key")]).unwrap();
        assert_eq!(s.enricher.ordering, OrderingMode::StrictKey);
    }

    #[test]
    fn environment_overrides_any_key() {
        let s = load(&[
            ("ENRICH_TOPICS__OUTPUT", "out.v2"),
            // Given twice (a test's defaults, then its own): the last value holds.
            ("ENRICH_KAFKA__PARTITIONS", "9"),
            ("ENRICH_KAFKA__PARTITIONS", "3"),
            ("ENRICH_KAFKA__CLIENT__SECURITY.PROTOCOL", "SASL_SSL"),
            ("ENRICH_KAFKA__CLIENT__SESSION.TIMEOUT.MS", "6000"),
            ("ENRICH_PIPELINE__NAME", "0123"),
            ("ENRICH_LLM_API_KEY", "not-a-path"),
            ("OTHER__THING", "ignored"),
        ])
        .unwrap();
        assert_eq!(s.topics.output, "out.v2");
        assert_eq!(s.kafka.partitions, 3);
        assert_eq!(s.kafka.client.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        assert_eq!(s.kafka.client.get("session.timeout.ms").map(String::as_str), Some("6000"));
        assert_eq!(s.pipeline.name, "0123");
    }

    #[test]
    fn prices_come_from_the_longest_matching_model_name() {
        let prices = r#"{"gpt-4o" = {input_usd_per_mtok = 2.5, output_usd_per_mtok = 10.0},
            "gpt-4o-mini" = {input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.6}}"#;
        let s = load(&[
            ("ENRICH_LLM__PRICES", prices),
            ("ENRICH_LLM__INPUT_USD_PER_MTOK", "1.0"),
            ("ENRICH_LLM__OUTPUT_USD_PER_MTOK", "2.0"),
        ])
        .unwrap();
        let p = |m: &str| {
            let p = s.llm.price_of(m);
            (p.input_usd_per_mtok, p.output_usd_per_mtok)
        };
        assert_eq!(p("gpt-4o-mini-2024-07-18"), (0.15, 0.6));
        assert_eq!(p("gpt-4o-2024-08-06"), (2.5, 10.0));
        assert_eq!(p("claude-x"), (1.0, 2.0), "the default pair");
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("ENRICH_KAFKA__PARTITIONS", "many")], "kafka.partitions"),
            (&[("ENRICH_KAFKA__PARTITIONS", "0")], "kafka.partitions"),
            (&[("ENRICH_TOPICS__RETRY", "enrich.requests")], "topics.retry"),
            (&[("ENRICH_TOPICS__DLQ", "events.raw")], "topics.dlq"),
            (&[("ENRICH_LLM__BASE_URL", "localhost:8080")], "llm.base_url"),
            (&[("ENRICH_LLM__OUTPUT_SCHEMA", "{nope")], "llm.output_schema"),
            (&[("ENRICH_PIPELINE__NAME", "has space")], "pipeline.name"),
            (&[("ENRICH_ENRICHER__LEASE_MS", "30000")], "enricher.lease_ms"),
            (&[("ENRICH_INGEST__BATCH_SIZE", "0")], "ingest.batch_size"),
            (&[("ENRICH_INGEST__NO_SUCH_KEY", "1")], "ingest"),
            (&[("ENRICH_ENRICHER__ORDERING", "random")], "enricher.ordering"),
            (&[("ENRICH_LLM__RETRY_DELAY_MS", "0")], "llm.retry_delay_ms"),
            (&[("ENRICH_LLM__RETRY_MAX_DELAY_MS", "10")], "llm.retry_max_delay_ms"),
            (&[("ENRICH_LLM__BREAKER_FAILURES", "0")], "llm.breaker_failures"),
            (&[("ENRICH_LLM__MAX_RATE_LIMITED", "0")], "llm.max_rate_limited"),
            (&[("ENRICH_DLQ_LIMIT__MAX_SHARE", "1.5")], "dlq_limit.max_share"),
            (&[("ENRICH_LLM__FALLBACK_MODELS", r#"["b", "b"]"#)], "llm.fallback_models[1]"),
            (&[("ENRICH_LLM__MIN_CONCURRENCY", "0")], "llm.min_concurrency"),
            (&[("ENRICH_LLM__MIN_CONCURRENCY", "1000")], "llm.min_concurrency"),
            (&[("ENRICH_LLM__LATENCY_TOLERANCE", "0.5")], "llm.latency_tolerance"),
            (
                &[("ENRICH_LLM__PRICES", r#"{m = {input_usd_per_mtok = -1.0, output_usd_per_mtok = 1.0}}"#)],
                "llm.prices",
            ),
        ];
        for (env, field) in cases {
            let err = load(env).unwrap_err();
            assert!(err.field.starts_with(field), "{env:?}: got field {:?} ({})", err.field, err.message);
        }
    }

    #[test]
    fn database_errors_do_not_leak_the_url() {
        let err = load(&[("ENRICH_DATABASE__URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert_eq!(err.field, "database.url");
        assert!(!err.to_string().contains("hunter2"));
        let s = load(&[]).unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn an_integer_looking_secret_in_an_override_is_text_and_never_printed() {
        let s = load(&[
            // Keys the file does not have: their type decides, not their look.
            ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", "8675309867530986753"),
            ("ENRICH_KAFKA__CLIENT__SASL.PASSWORD", "31415e3"),
            ("ENRICH_KAFKA__CLIENT__SASL.USERNAME", "true"),
            ("ENRICH_KAFKA__CLIENT__LINGER.MS", "007"),
            ("ENRICH_LLM__EXTRA_HEADERS__X-GATEWAY", "27182818284590452"),
            // A number where the type wants one, still.
            ("ENRICH_KAFKA__PARTITIONS", "3"),
            ("ENRICH_LLM__TEMPERATURE", "0.5"),
        ])
        .unwrap_or_else(|e| panic!("refused: {e}"));
        assert_eq!(s.dlq_replayer.admin_token.as_ref().map(Secret::expose), Some("8675309867530986753"));
        let client = |k: &str| s.kafka.client.get(k).map(String::as_str);
        assert_eq!(client("sasl.password"), Some("31415e3"), "passed to librdkafka as typed");
        assert_eq!(client("sasl.username"), Some("true"));
        assert_eq!(client("linger.ms"), Some("007"));
        assert_eq!(s.llm.extra_headers.get("x-gateway").map(Secret::expose), Some("27182818284590452"));
        assert_eq!((s.kafka.partitions, s.llm.temperature), (3, 0.5));
        let debug = format!("{s:?}");
        for secret in ["8675309867530986753", "31415", "27182818284590452", "s3cret"] {
            assert!(!debug.contains(secret), "Debug shows {secret}: {debug}");
        }
        assert!(debug.contains("\"sasl.password\": ***") && debug.contains("\"linger.ms\": \"007\""), "{debug}");
    }

    #[test]
    fn a_bad_value_names_the_field_only() {
        let cases: &[(&str, &str, &str)] = &[
            ("ENRICH_DLQ_REPLAYER__ADMIN_TOKEN", "86753", "dlq_replayer.admin_token"),
            ("ENRICH_DLQ_REPLAYER__READ_TOKEN", "86753", "dlq_replayer.read_token"),
            ("ENRICH_HTTP__MAX_CONNECTIONS", "0", "http.max_connections"),
            ("ENRICH_HTTP__HEADER_READ_TIMEOUT_MS", "s3cr3t", "http.header_read_timeout_ms"),
            ("ENRICH_DLQ_REPLAYER__HTTP_PORT", "8675309", "dlq_replayer.http_port"),
            ("ENRICH_KAFKA__PARTITIONS", "s3cr3t-many", "kafka.partitions"),
            ("ENRICH_KAFKA__CREATE_TOPICS", "s3cr3t", "kafka.create_topics"),
            ("ENRICH_ENRICHER__ORDERING", "s3cr3t", "enricher.ordering"),
            ("ENRICH_LLM__BASE_URL", "localhost:8080/v1?api_key=s3cr3t", "llm.base_url"),
            ("ENRICH_LLM__FALLBACK_MODELS", "[\"a\", 8675309]", "llm.fallback_models[1]"),
            ("ENRICH_KAFKA__CLIENT", "[\"s3cr3t\"]", "kafka.client"),
            ("ENRICH_KAFKA__CLIENT__MESSAGE.MAX.BYTES", "86753s3cr3t", "kafka.client.message.max.bytes"),
            ("ENRICH_KAFKA__CLIENT__MESSAGE.MAX.BYTES", "999", "kafka.client.message.max.bytes"),
            ("ENRICH_LLM__MAX_RESPONSE_BYTES", "1023", "llm.max_response_bytes"),
        ];
        for (name, value, field) in cases {
            let err = load(&[(name, value)]).expect_err(name);
            assert_eq!(&err.field, field, "{name}: {err}");
            assert!(!err.message.is_empty(), "{name}: says what is wrong");
            let shown = format!("{err} {err:?}");
            for part in ["s3cr3t", "86753"] {
                assert!(!shown.contains(part), "{name}: the error shows the value: {shown}");
            }
        }
        let text = format!("{BASE}\n[kafka.client]\n\"sasl.password\" = s3cr3t\n");
        let err = Settings::from_toml(&text, []).unwrap_err();
        assert_eq!(err.field, "<file>");
        let line = text.lines().position(|l| l.contains("s3cr3t")).map(|i| i + 1);
        assert!(err.message.contains(&format!("line {}", line.unwrap_or(0))), "says where: {err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn bad_pointer_and_unknown_strategy_are_named() {
        let text = BASE.replace("[\"/id\"]", "[\"id\"]");
        let err = Settings::from_toml(&text, []).unwrap_err();
        assert_eq!(err.field, "pipeline.sources[0].key.pointers[0]");
        let text = BASE.replace("json_pointer", "magic");
        let err = Settings::from_toml(&text, []).unwrap_err();
        assert!(err.field.starts_with("pipeline.sources"), "{err}");
    }

    #[test]
    fn the_shipped_pipeline_config_is_valid() {
        let text = include_str!("../../../config/pipeline.toml");
        let s = Settings::from_toml(text, []).unwrap();
        assert_eq!(s.source_topics(), vec!["events.raw"]);
    }
}
