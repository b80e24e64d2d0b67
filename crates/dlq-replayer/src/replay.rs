//! The dead-letter operations, against PostgreSQL and Kafka: list, show, replay, discard.

use enrich_common::envelope::Envelope;
use enrich_common::spans::{RecordSpan, attr};
use enrich_common::{Settings, TraceContext, headers};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filter {
    #[serde(default)]
    pub ids: Option<Vec<i64>>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// RFC 3339 bounds on when the record was dead-lettered.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    /// Text the idempotency key or the error holds (case-insensitive).
    #[serde(default)]
    pub text: Option<String>,
}

impl Filter {
    /// Selects nothing narrower than everything: refused for replays.
    pub fn is_empty(&self) -> bool {
        self.ids.is_none()
            && self.reason.is_none()
            && self.stage.is_none()
            && self.key.is_none()
            && self.from.is_none()
            && self.to.is_none()
            && self.text.as_deref().is_none_or(str::is_empty)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub idempotency_key: String,
    pub stage: String,
    pub reason_class: String,
    pub reason: String,
    pub error: String,
    pub attempts: i32,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub trace_id: Option<String>,
    /// The context of the span that wrote the dead letter; a replay continues from it.
    pub traceparent: Option<String>,
    pub status: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    pub id: i64,
    pub idempotency_key: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayOutcome {
    pub dry_run: bool,
    pub matched: usize,
    pub replayed: Vec<i64>,
    pub refused: Vec<Refused>,
}

const COLUMNS: &str = "id, idempotency_key, stage, reason_class, reason, error, attempts, source_topic, source_partition,
                       source_offset, trace_id, traceparent, status, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at";

/// Dead letters matching the filter with `status`, oldest first, after `after_id`.
pub async fn list(
    pool: &PgPool,
    pipeline: &str,
    status: &str,
    filter: &Filter,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetter>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters
         WHERE pipeline = $1 AND status = $2 AND id > $3
           AND ($4::bigint[] IS NULL OR id = ANY($4))
           AND ($5::text IS NULL OR reason = $5)
           AND ($6::text IS NULL OR stage = $6)
           AND ($7::text IS NULL OR idempotency_key = $7)
           AND ($8::timestamptz IS NULL OR created_at >= $8::timestamptz)
           AND ($9::timestamptz IS NULL OR created_at < $9::timestamptz)
           AND ($11::text IS NULL OR strpos(lower(idempotency_key), lower($11)) > 0
                OR strpos(lower(error), lower($11)) > 0)
         ORDER BY id LIMIT $10"
    )))
    .bind(pipeline)
    .bind(status)
    .bind(after_id)
    .bind(&filter.ids)
    .bind(&filter.reason)
    .bind(&filter.stage)
    .bind(&filter.key)
    .bind(filter.from.as_deref().map(|s| s.to_string()))
    .bind(filter.to.as_deref().map(|s| s.to_string()))
    .bind(limit)
    .bind(filter.text.as_deref().filter(|t| !t.is_empty()))
    .fetch_all(pool)
    .await
}

/// One page of a key's audit rows: at most `limit` runs and `limit` steps, those after
/// the cursors (the ids the previous page ended with).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct Page {
    pub limit: i64,
    pub runs_after: i64,
    pub steps_after: i64,
}

impl Default for Page {
    fn default() -> Self {
        Self { limit: 200, runs_after: 0, steps_after: 0 }
    }
}

impl Page {
    /// The most rows of each kind one answer carries.
    pub const MAX: i64 = 1000;

    fn limit(&self) -> i64 {
        self.limit.clamp(1, Self::MAX)
    }
}

/// The dead letters of one key one answer lists at most (replays are few per key).
const DEAD_LETTERS_PER_KEY: i64 = 100;

/// A stage's run at the key, from the run history.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct RunEntry {
    pub id: i64,
    pub stage: String,
    pub attempt: i32,
    pub status: String,
    pub detail: Option<String>,
    pub worker: Option<String>,
    pub trace_id: Option<String>,
    pub at: String,
}

/// One step's outcome (a call, a validation), from the audit.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct StepEntry {
    pub id: i64,
    pub stage: String,
    pub step: String,
    pub attempt: i32,
    pub status: String,
    pub duration_ms: Option<f64>,
    pub model: Option<String>,
    pub input_tokens: Option<i32>,
    pub output_tokens: Option<i32>,
    pub cost_usd: Option<f64>,
    pub error: Option<String>,
    pub at: String,
}

/// One dead letter with its payload and a page of the key's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shown {
    pub dead_letter: DeadLetter,
    /// The original payload (as UTF-8 text, lossy); None for a caller without a token.
    pub payload: Option<String>,
    pub payload_withheld: bool,
    pub runs: Vec<RunEntry>,
    pub steps: Vec<StepEntry>,
    /// Pass as `runs_after` / `steps_after` for the next page; absent on the last.
    pub next_runs_after: Option<i64>,
    pub next_steps_after: Option<i64>,
}

/// One dead letter with (when `with_payload`) its payload, and a page of the key's history.
pub async fn show(
    pool: &PgPool,
    pipeline: &str,
    id: i64,
    page: Page,
    with_payload: bool,
) -> anyhow::Result<Option<Shown>> {
    let row: Option<DeadLetter> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE pipeline = $1 AND id = $2"
    )))
    .bind(pipeline)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let payload = async {
        if !with_payload {
            return Ok(None);
        }
        let (bytes,): (Vec<u8>,) =
            sqlx::query_as("SELECT envelope FROM dead_letters WHERE id = $1").bind(id).fetch_one(pool).await?;
        Ok(Some(
            Envelope::decode_from(&bytes).map(|e| String::from_utf8_lossy(&e.payload).into_owned()).unwrap_or_default(),
        ))
    };
    // The three reads at once, each on its own connection.
    let (payload, (runs, next_runs_after), (steps, next_steps_after)) = tokio::try_join!(
        payload,
        runs_of(pool, pipeline, &row.idempotency_key, page),
        steps_of(pool, pipeline, &row.idempotency_key, page),
    )?;
    Ok(Some(Shown {
        dead_letter: row,
        payload_withheld: payload.is_none(),
        payload,
        runs,
        steps,
        next_runs_after,
        next_steps_after,
    }))
}

/// The rows of a page, and the cursor of the next when there are more.
fn paged<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> (Vec<T>, Option<i64>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more { rows.last().map(id) } else { None };
    (rows, next)
}

const AT: &str = "to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at";

/// A page of the stages' runs at a key, in the order they were recorded, and the next
/// page's cursor.
pub async fn runs_of(
    pool: &PgPool,
    pipeline: &str,
    key: &str,
    page: Page,
) -> sqlx::Result<(Vec<RunEntry>, Option<i64>)> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, stage, attempt, status, detail, worker, trace_id, {AT}
         FROM run_history WHERE pipeline = $1 AND idempotency_key = $2 AND id > $3 ORDER BY id LIMIT $4"
    )))
    .bind(pipeline)
    .bind(key)
    .bind(page.runs_after)
    .bind(page.limit() + 1)
    .fetch_all(pool)
    .await?;
    Ok(paged(rows, page.limit(), |r: &RunEntry| r.id))
}

/// A page of the step outcomes at a key, in the order they were recorded, and the next
/// page's cursor.
pub async fn steps_of(
    pool: &PgPool,
    pipeline: &str,
    key: &str,
    page: Page,
) -> sqlx::Result<(Vec<StepEntry>, Option<i64>)> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, stage, step, attempt, status, duration_ms, model, input_tokens, output_tokens,
                cost_usd::float8 AS cost_usd, error, {AT}
         FROM step_outcomes WHERE pipeline = $1 AND idempotency_key = $2 AND id > $3 ORDER BY id LIMIT $4"
    )))
    .bind(pipeline)
    .bind(key)
    .bind(page.steps_after)
    .bind(page.limit() + 1)
    .fetch_all(pool)
    .await?;
    Ok(paged(rows, page.limit(), |s: &StepEntry| s.id))
}

/// The kill switch of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Control {
    pub paused: bool,
    pub reason: Option<String>,
    pub updated_at: Option<String>,
}

pub async fn control(pool: &PgPool, pipeline: &str) -> sqlx::Result<Control> {
    let row: Option<Control> = sqlx::query_as(
        "SELECT paused, reason, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at
         FROM controls WHERE pipeline = $1",
    )
    .bind(pipeline)
    .fetch_optional(pool)
    .await?;
    Ok(row.unwrap_or(Control { paused: false, reason: None, updated_at: None }))
}

pub async fn set_paused(pool: &PgPool, pipeline: &str, paused: bool, reason: Option<&str>) -> sqlx::Result<Control> {
    sqlx::query(
        "INSERT INTO controls (pipeline, paused, reason) VALUES ($1, $2, $3)
         ON CONFLICT (pipeline) DO UPDATE SET paused = $2, reason = $3, updated_at = now()",
    )
    .bind(pipeline)
    .bind(paused)
    .bind(reason)
    .execute(pool)
    .await?;
    control(pool, pipeline).await
}

/// A key's whole timeline across stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub idempotency_key: String,
    /// The state machine's state (absent when the key was never seen).
    pub state: Option<String>,
    pub attempts: Option<i32>,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    /// The traces the key's records were processed in (one, unless it was replayed
    /// from a trace of its own).
    pub trace_ids: Vec<String>,
    pub runs: Vec<RunEntry>,
    pub steps: Vec<StepEntry>,
    /// Pass as `runs_after` / `steps_after` for the next page; absent on the last.
    pub next_runs_after: Option<i64>,
    pub next_steps_after: Option<i64>,
    pub dead_letters: Vec<DeadLetter>,
    /// Over every step of the key, not only this page's.
    pub tokens: Tokens,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tokens {
    pub input: i64,
    pub output: i64,
    pub cost_usd: f64,
}

type StateRow = (String, i32, String, i32, i64);

/// A page of the history of one idempotency key; None when nothing is known of it.
pub async fn history(pool: &PgPool, pipeline: &str, key: &str, page: Page) -> anyhow::Result<Option<History>> {
    let state = sqlx::query_as::<_, StateRow>(
        "SELECT state, attempts, source_topic, source_partition, source_offset
         FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
    )
    .bind(pipeline)
    .bind(key)
    .fetch_optional(pool);
    let dead_letters = sqlx::query_as::<_, DeadLetter>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE pipeline = $1 AND idempotency_key = $2 ORDER BY id LIMIT $3"
    )))
    .bind(pipeline)
    .bind(key)
    .bind(DEAD_LETTERS_PER_KEY)
    .fetch_all(pool);
    // The key's traces over all its runs (a handful: one, plus one per replay).
    let traced = sqlx::query_as::<_, (String,)>(
        "SELECT trace_id FROM run_history
         WHERE pipeline = $1 AND idempotency_key = $2 AND trace_id IS NOT NULL AND trace_id <> ''
         GROUP BY trace_id ORDER BY min(id) LIMIT 100",
    )
    .bind(pipeline)
    .bind(key)
    .fetch_all(pool);
    let tokens = sqlx::query_as::<_, (i64, i64, f64)>(
        "SELECT coalesce(sum(input_tokens), 0)::int8, coalesce(sum(output_tokens), 0)::int8,
                coalesce(sum(cost_usd), 0)::float8
         FROM step_outcomes WHERE pipeline = $1 AND idempotency_key = $2",
    )
    .bind(pipeline)
    .bind(key)
    .fetch_one(pool);
    // Every read at once, each on its own connection: the page waits for the slowest, not the sum.
    let (state, (runs, next_runs_after), (steps, next_steps_after), dead_letters, traced, (input, output, cost_usd)) =
        tokio::try_join!(
            state,
            runs_of(pool, pipeline, key, page),
            steps_of(pool, pipeline, key, page),
            dead_letters,
            traced,
            tokens,
        )?;
    if state.is_none() && runs.is_empty() && dead_letters.is_empty() && page.runs_after == 0 {
        return Ok(None);
    }
    let mut trace_ids: Vec<String> = traced.into_iter().map(|(t,)| t).collect();
    for t in dead_letters.iter().filter_map(|d| d.trace_id.clone()) {
        if !t.is_empty() && !trace_ids.contains(&t) {
            trace_ids.push(t);
        }
    }
    let (state, attempts, topic, partition, offset) = match state {
        Some((s, a, t, p, o)) => (Some(s), Some(a), Some(t), Some(p), Some(o)),
        None => (None, None, None, None, None),
    };
    Ok(Some(History {
        idempotency_key: key.to_string(),
        state,
        attempts,
        source_topic: topic,
        source_partition: partition,
        source_offset: offset,
        trace_ids,
        runs,
        steps,
        next_runs_after,
        next_steps_after,
        dead_letters,
        tokens: Tokens { input, output, cost_usd },
    }))
}

pub struct Replayer {
    pub settings: Settings,
    pub pool: PgPool,
    pub producer: FutureProducer,
}

impl Replayer {
    /// Replays the dead letters the filter selects (dry run: says what would happen and
    /// changes nothing). A key replayed `max_replays_per_key` times already is refused.
    pub async fn replay(&self, filter: &Filter, dry_run: bool, note: Option<&str>) -> anyhow::Result<ReplayOutcome> {
        self.replay_paced(filter, dry_run, note, self.settings.dlq_replayer.replay_rate_per_sec, None).await
    }

    /// [`Self::replay`] at most `rate_per_sec` records a second (never faster than
    /// `dlq_replayer.replay_rate_per_sec`), adding one to `progress` for each dead letter
    /// replayed or refused.
    pub async fn replay_paced(
        &self,
        filter: &Filter,
        dry_run: bool,
        note: Option<&str>,
        rate_per_sec: u32,
        progress: Option<&AtomicUsize>,
    ) -> anyhow::Result<ReplayOutcome> {
        let pipeline = &self.settings.pipeline.name;
        let mut outcome = ReplayOutcome { dry_run, ..Default::default() };
        let rate = rate_per_sec.clamp(1, self.settings.dlq_replayer.replay_rate_per_sec);
        let step = || {
            if let Some(p) = progress {
                p.fetch_add(1, Ordering::Relaxed);
            }
        };
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut ticker = tokio::time::interval(interval);
        // What was in the DLQ when the run started, as its dry run counted: a dead letter
        // listed meanwhile (a replayed record failing again at once) waits for the next run.
        let (upto,): (Option<i64>,) = sqlx::query_as("SELECT max(id) FROM dead_letters WHERE pipeline = $1")
            .bind(pipeline)
            .fetch_one(&self.pool)
            .await?;
        let upto = upto.unwrap_or(0);
        let mut after = 0;
        'pages: loop {
            let page = list(&self.pool, pipeline, "dead", filter, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            // A dry run changes nothing between one dead letter and the next, so it reads
            // the whole page's replay counts and envelopes in a few statements; a replay
            // reads each dead letter's just before it (the previous one may have changed them).
            let mut checked = if dry_run { Some(self.checks(&page).await?) } else { None };
            for dead in page {
                if dead.id > upto {
                    break 'pages;
                }
                outcome.matched += 1;
                let replays = match &checked {
                    Some(c) => c.replays.get(&dead.idempotency_key).copied().unwrap_or(0),
                    None => self.replays_of(&dead.idempotency_key).await?,
                };
                let max = i64::from(self.settings.dlq_replayer.max_replays_per_key);
                if replays >= max {
                    let why = format!("replayed {replays} times already (dlq_replayer.max_replays_per_key = {max})");
                    if !dry_run {
                        self.log(dead.id, &dead.idempotency_key, "refused", Some(&why)).await?;
                    }
                    outcome.refused.push(Refused { id: dead.id, idempotency_key: dead.idempotency_key, why });
                    step();
                    continue;
                }
                let not_replayable = match &mut checked {
                    Some(c) => c.not_replayable.remove(&dead.id).unwrap_or(None),
                    None => self.not_replayable(&dead).await?,
                };
                if let Some(why) = not_replayable {
                    if !dry_run {
                        self.log(dead.id, &dead.idempotency_key, "refused", Some(&why)).await?;
                    }
                    outcome.refused.push(Refused { id: dead.id, idempotency_key: dead.idempotency_key, why });
                    step();
                    continue;
                }
                if !dry_run {
                    ticker.tick().await;
                    if let Some(status) = self.replay_one(&dead).await? {
                        // Another replay (another request, job or replica) took it first.
                        let why = format!("already {status}");
                        outcome.refused.push(Refused { id: dead.id, idempotency_key: dead.idempotency_key, why });
                        step();
                        continue;
                    }
                    self.log(dead.id, &dead.idempotency_key, "replayed", note).await?;
                }
                outcome.replayed.push(dead.id);
                step();
            }
        }
        // Ids asked for by name that are not waiting in the DLQ are refused, with why.
        if let Some(ids) = &filter.ids {
            let seen: std::collections::HashSet<i64> =
                outcome.replayed.iter().copied().chain(outcome.refused.iter().map(|r| r.id)).collect();
            let missing: Vec<i64> = ids.iter().copied().filter(|id| !seen.contains(id)).collect();
            let rows: Vec<(i64, String, String)> = sqlx::query_as(
                "SELECT id, idempotency_key, status FROM dead_letters WHERE pipeline = $1 AND id = ANY($2)",
            )
            .bind(pipeline)
            .bind(&missing)
            .fetch_all(&self.pool)
            .await?;
            for id in missing {
                let (key, why) = match rows.iter().find(|r| r.0 == id) {
                    Some((_, key, status)) => (key.clone(), format!("already {status}")),
                    None => (String::new(), "no such dead letter".to_string()),
                };
                outcome.refused.push(Refused { id, idempotency_key: key, why });
                step();
            }
        }
        Ok(outcome)
    }

    /// How many times a key was replayed.
    async fn replays_of(&self, key: &str) -> sqlx::Result<i64> {
        let (replays,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM replay_log WHERE pipeline = $1 AND idempotency_key = $2 AND outcome = 'replayed'",
        )
        .bind(&self.settings.pipeline.name)
        .bind(key)
        .fetch_one(&self.pool)
        .await?;
        Ok(replays)
    }

    /// A page's checks at once: the replay count of each key, and why each dead letter
    /// cannot be replayed, if it cannot (envelopes read 50 at a time).
    async fn checks(&self, page: &[DeadLetter]) -> anyhow::Result<Checks> {
        let keys: Vec<&str> = page.iter().map(|d| d.idempotency_key.as_str()).collect();
        let counted: Vec<(String, i64)> = sqlx::query_as(
            "SELECT idempotency_key, count(*) FROM replay_log
             WHERE pipeline = $1 AND idempotency_key = ANY($2) AND outcome = 'replayed' GROUP BY 1",
        )
        .bind(&self.settings.pipeline.name)
        .bind(&keys)
        .fetch_all(&self.pool)
        .await?;
        let mut not_replayable = std::collections::HashMap::new();
        for chunk in page.chunks(50) {
            let ids: Vec<i64> = chunk.iter().map(|d| d.id).collect();
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT id, envelope FROM dead_letters WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
            for dead in chunk {
                let Some((_, bytes)) = rows.iter().find(|(id, _)| *id == dead.id) else {
                    anyhow::bail!("dead letter {} is gone", dead.id);
                };
                not_replayable.insert(dead.id, why_not_replayable(&Envelope::decode_from(bytes)?, dead));
            }
        }
        Ok(Checks { replays: counted.into_iter().collect(), not_replayable })
    }

    /// Why a dead letter cannot be replayed from the DLQ's copy, if it cannot.
    async fn not_replayable(&self, dead: &DeadLetter) -> anyhow::Result<Option<String>> {
        let (bytes,): (Vec<u8>,) = sqlx::query_as("SELECT envelope FROM dead_letters WHERE id = $1")
            .bind(dead.id)
            .fetch_one(&self.pool)
            .await?;
        Ok(why_not_replayable(&Envelope::decode_from(&bytes)?, dead))
    }

    /// Replays one dead letter, holding its row locked from the check that it is still
    /// waiting to its mark as replayed: a replay running beside this one (another API
    /// request, a console job, another replica) waits for the lock, then finds it
    /// replayed. Returns the status that stopped it (None: replayed here). A crash between
    /// the record's produce and the mark leaves it waiting, to be replayed again.
    async fn replay_one(&self, dead: &DeadLetter) -> anyhow::Result<Option<String>> {
        let mut claim = self.pool.begin().await?;
        let (status, bytes): (String, Vec<u8>) =
            sqlx::query_as("SELECT status, envelope FROM dead_letters WHERE id = $1 FOR UPDATE")
                .bind(dead.id)
                .fetch_one(&mut *claim)
                .await?;
        if status != "dead" {
            claim.rollback().await?;
            return Ok(Some(status));
        }
        let mut envelope = Envelope::decode_from(&bytes)?;
        envelope.outcome = None;
        envelope.attempt = 0;
        // The replay continues the record's trace, from the span that dead-lettered it
        // (its parent, and a link).
        let incoming = dead.traceparent.as_deref().and_then(|t| TraceContext::parse(t, None));
        let span = RecordSpan::resume("dlq-replayer", "replay", SpanKind::Internal, incoming.as_ref());
        span.set([
            KeyValue::new(attr::IDEMPOTENCY_KEY, dead.idempotency_key.clone()),
            KeyValue::new("enrich.dead_letter.id", dead.id),
        ]);
        let src = envelope.source.clone().unwrap_or_default();
        if dead.stage == "ingest-dedup" {
            // A malformed source record goes back to its source topic, as it was, for ingest
            // to read again (its cause, such as a key strategy, fixed meanwhile).
            let send = span.producer(&src.topic);
            let mut h = OwnedHeaders::new();
            for header in &envelope.headers {
                // The record's trace continues from this replay.
                if header.key == headers::TRACEPARENT || header.key == headers::TRACESTATE {
                    continue;
                }
                h = h.insert(KafkaHeader { key: &header.key, value: header.value.as_deref() });
            }
            let h = send.ids().inject(h);
            let mut record = FutureRecord::to(&src.topic).payload(&envelope.payload).headers(h);
            if let Some(k) = &src.key {
                record = record.key(k);
            }
            self.producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        } else {
            // The key gets one fresh attempt budget and goes back to the enricher, bound to
            // no results record (the publisher binds it to the new result).
            let pipeline = &self.settings.pipeline.name;
            let reset = enrich_common::key_state::replay::reset(&self.pool, pipeline, &dead.idempotency_key).await?;
            let send = span.producer(&self.settings.topics.requests);
            let h = send.ids().inject(headers::owned(&[
                (headers::IDEMPOTENCY_KEY, &dead.idempotency_key),
                ("replay-of", &dead.id.to_string()),
            ]));
            let key = src.key.clone().unwrap_or_else(|| dead.idempotency_key.as_bytes().to_vec());
            let payload = envelope.encode_to_bytes();
            let sent = self
                .producer
                .send(
                    FutureRecord::to(&self.settings.topics.requests).key(&key).payload(&payload).headers(h),
                    Duration::from_secs(30),
                )
                .await;
            if let Err((e, _)) = sent {
                // The dead letter stays listed (the claim rolls back); the key goes back to
                // `dead_lettered` with it rather than waiting for a request never written.
                if let Some(reset) = reset {
                    let undone = enrich_common::key_state::replay::undo_reset(
                        &self.pool,
                        pipeline,
                        &dead.idempotency_key,
                        reset,
                    )
                    .await;
                    if let Err(undo) = undone {
                        tracing::error!(idempotency_key = %dead.idempotency_key, error = %undo, "cannot put a key whose replay failed back to dead_lettered; replay it again");
                    }
                }
                return Err(anyhow::anyhow!("cannot write the replayed request of dead letter {}: {e}", dead.id));
            }
        }
        sqlx::query("UPDATE dead_letters SET status = 'replayed', updated_at = now() WHERE id = $1")
            .bind(dead.id)
            .execute(&mut *claim)
            .await?;
        claim.commit().await?;
        Ok(None)
    }

    /// Marks a dead letter discarded (nothing is produced).
    pub async fn discard(&self, id: i64, note: Option<&str>) -> anyhow::Result<bool> {
        let key: Option<(String,)> = sqlx::query_as(
            "UPDATE dead_letters SET status = 'discarded', updated_at = now()
             WHERE pipeline = $1 AND id = $2 AND status = 'dead' RETURNING idempotency_key",
        )
        .bind(&self.settings.pipeline.name)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((key,)) = key else { return Ok(false) };
        self.log(id, &key, "discarded", note).await?;
        Ok(true)
    }

    async fn log(&self, id: i64, key: &str, outcome: &str, note: Option<&str>) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO replay_log (pipeline, dead_letter_id, idempotency_key, outcome, note) VALUES ($1, $2, $3, $4, $5)")
            .bind(&self.settings.pipeline.name)
            .bind(id)
            .bind(key)
            .bind(outcome)
            .bind(note)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A page's checks, read at once by a dry run.
struct Checks {
    replays: std::collections::HashMap<String, i64>,
    not_replayable: std::collections::HashMap<i64, Option<String>>,
}

/// Why a dead letter cannot be replayed from the DLQ's copy (its envelope), if it cannot.
fn why_not_replayable(envelope: &Envelope, dead: &DeadLetter) -> Option<String> {
    if dead.reason == enrich_common::error::Reason::UnreadableHeaders.as_str() {
        // The dead letter holds none of them: replayed, the record would go on without.
        return Some(format!(
            "its headers could not be read, and the DLQ holds none of them; the whole record is at {}/{}@{}",
            dead.source_topic.as_deref().unwrap_or("?"),
            dead.source_partition.unwrap_or(-1),
            dead.source_offset.unwrap_or(-1)
        ));
    }
    let truncated = envelope.failure().map_or(0, |f| f.payload_truncated_from);
    (truncated > 0).then(|| {
        format!(
            "the DLQ holds only the first {} of {truncated} bytes; the whole record is at {}/{}@{}",
            envelope.payload.len(),
            dead.source_topic.as_deref().unwrap_or("?"),
            dead.source_partition.unwrap_or(-1),
            dead.source_offset.unwrap_or(-1)
        )
    })
}
