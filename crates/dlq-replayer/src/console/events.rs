//! One event's story: find it by idempotency key, source coordinates or trace id, then
//! its timeline across stages (each run of each stage, each step: the LLM calls with
//! model, tokens, cost and duration, cache hits, repairs, validations, retries, dead
//! letters, publishing), its prompt version and model, the stored result as published,
//! and links to its traces.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;

use super::html::{Nav, e, q, usd};
use super::{Console, internal, look, problem, redirect, render};
use crate::replay::{self, Page, RunEntry, StepEntry};

#[derive(Deserialize, Default)]
pub struct SearchQuery {
    q: Option<String>,
}

/// What a search text is.
#[derive(Debug, PartialEq, Eq)]
enum Search {
    Trace(String),
    Coordinates { topic: String, partition: i32, offset: i64 },
    Key(String),
}

fn classify(text: &str) -> Search {
    let t = text.trim();
    if t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Search::Trace(t.to_ascii_lowercase());
    }
    // topic/partition@offset, topic/partition/offset or topic:partition:offset.
    let parts: Vec<&str> = t.rsplitn(3, ['/', ':', '@']).collect();
    if let [offset, partition, topic] = parts[..]
        && !topic.is_empty()
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && let (Ok(partition), Ok(offset)) = (partition.parse(), offset.parse())
    {
        return Search::Coordinates { topic: topic.to_string(), partition, offset };
    }
    Search::Key(t.to_string())
}

async fn find(console: &Console, search: &Search) -> sqlx::Result<Vec<String>> {
    let (pool, pipeline) = (console.pool(), console.pipeline());
    let rows: Vec<(String,)> = match search {
        Search::Trace(trace) => {
            sqlx::query_as(
                "SELECT idempotency_key FROM run_history WHERE pipeline = $1 AND trace_id = $2
                 UNION SELECT idempotency_key FROM dead_letters WHERE pipeline = $1 AND trace_id = $2 LIMIT 50",
            )
            .bind(pipeline)
            .bind(trace)
            .fetch_all(pool)
            .await?
        }
        Search::Coordinates { topic, partition, offset } => {
            // run_history's rows of the ingest, which records every source record it reads
            // (its partial index run_history_ingest_once answers this).
            sqlx::query_as(
                "SELECT idempotency_key FROM enrich_state
                   WHERE pipeline = $1 AND source_topic = $2 AND source_partition = $3 AND source_offset = $4
                 UNION SELECT idempotency_key FROM run_history
                   WHERE pipeline = $1 AND source_topic = $2 AND source_partition = $3 AND source_offset = $4
                     AND stage = 'ingest-dedup'
                 UNION SELECT idempotency_key FROM dead_letters
                   WHERE pipeline = $1 AND source_topic = $2 AND source_partition = $3 AND source_offset = $4
                 LIMIT 50",
            )
            .bind(pipeline)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .fetch_all(pool)
            .await?
        }
        Search::Key(key) => {
            // The key as given, or the value without its pipeline's prefix.
            let prefixed = format!("{pipeline}:{key}");
            sqlx::query_as(
                "SELECT idempotency_key FROM enrich_state WHERE pipeline = $1 AND idempotency_key IN ($2, $3)
                 UNION SELECT idempotency_key FROM dead_letters WHERE pipeline = $1 AND idempotency_key IN ($2, $3)
                 UNION (SELECT idempotency_key FROM run_history WHERE pipeline = $1 AND idempotency_key IN ($2, $3) LIMIT 1)",
            )
            .bind(pipeline)
            .bind(key)
            .bind(prefixed)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(rows.into_iter().map(|(k,)| k).collect())
}

fn search_form(value: &str) -> String {
    format!(
        "<form method=\"get\" action=\"/ui/events\" role=\"search\" aria-label=\"Find an event\" class=\"filters\">\
         <div class=\"wide\"><label for=\"q\">idempotency key, source record (<code>topic/partition@offset</code>) or trace id</label>\
         <input id=\"q\" name=\"q\" type=\"search\" value=\"{}\" required></div><div><button type=\"submit\">Find</button></div></form>",
        e(value)
    )
}

pub async fn search(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<SearchQuery>,
) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let text = query.q.as_deref().map(str::trim).unwrap_or("");
    let mut out = format!("<h1>Find an event</h1>{}", search_form(text));
    if !text.is_empty() {
        let search = classify(text);
        let keys = match find(&console, &search).await {
            Ok(k) => k,
            Err(err) => return internal(&session, err),
        };
        if let [only] = &keys[..] {
            return redirect(&format!("/ui/event?key={}", q(only)));
        }
        if keys.is_empty() {
            let _ = write!(out, "<p role=\"status\">Nothing is known of {}.</p>", e(text));
        } else {
            let _ = write!(out, "<p role=\"status\">{} keys match:</p><ul>", keys.len());
            for k in &keys {
                let _ = write!(out, "<li><a href=\"/ui/event?key={}\">{}</a></li>", q(k), e(k));
            }
            out.push_str("</ul>");
        }
    }
    render(&headers, &session, "Events", Nav::Events, None, &out)
}

#[derive(Deserialize)]
pub struct EventQuery {
    key: String,
}

type StateRow = (String, i32, Option<String>, Option<String>, Option<String>, Option<String>);

pub async fn event(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<EventQuery>,
) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let key = query.key;
    let page = Page { limit: Page::MAX, ..Page::default() };
    let state = sqlx::query_as::<_, StateRow>(
        "SELECT state, attempts, model, prompt_version, jsonb_pretty(result), publish_outcome
         FROM enrich_state WHERE pipeline = $1 AND idempotency_key = $2",
    )
    .bind(console.pipeline())
    .bind(&key)
    .fetch_optional(console.pool());
    // The history, the stored result and the replay log at once.
    let (history, state, replays) = tokio::join!(
        replay::history(console.pool(), console.pipeline(), &key, page),
        state,
        replays_of(console.pool(), console.pipeline(), &key),
    );
    let history = match history {
        Ok(Some(h)) => h,
        Ok(None) => {
            return problem(Some(&session), StatusCode::NOT_FOUND, "Not found", "Nothing is known of this key.");
        }
        Err(err) => return internal(&session, format!("{err:#}")),
    };
    let state = state.unwrap_or(None);

    let mut out = format!("<h1>Event <code>{}</code></h1>{}<dl class=\"fields\">", e(&key), search_form(""));
    let coords = match (&history.source_topic, history.source_partition, history.source_offset) {
        (Some(t), Some(p), Some(o)) => format!("{t}/{p}@{o}"),
        _ => "-".into(),
    };
    let (model, prompt, result) = match &state {
        Some((_, _, m, p, r, _)) => (m.clone(), p.clone(), r.clone()),
        None => (None, None, None),
    };
    for (k, v) in [
        ("state", history.state.clone().unwrap_or_else(|| "unknown".into())),
        ("attempts", history.attempts.map_or("-".into(), |a| a.to_string())),
        ("source record", coords),
        ("model", model.unwrap_or_else(|| "-".into())),
        ("prompt version", prompt.unwrap_or_else(|| "-".into())),
        (
            "tokens and cost",
            format!("{} in, {} out, {}", history.tokens.input, history.tokens.output, usd(history.tokens.cost_usd)),
        ),
    ] {
        let _ = write!(out, "<div><dt>{}</dt><dd data-field=\"{}\">{}</dd></div>", e(k), e(k), e(v));
    }
    out.push_str("<div><dt>traces</dt><dd>");
    let ui = &console.api.replayer.settings.ui;
    for t in &history.trace_ids {
        match ui.trace_url(t) {
            Some(url) => {
                let _ = write!(out, "<a href=\"{}\" rel=\"noreferrer\" data-trace>{}</a> ", e(url), e(t));
            }
            None => {
                let _ = write!(out, "<code data-trace>{}</code> ", e(t));
            }
        }
    }
    out.push_str("</dd></div></dl><h2>Timeline</h2>");
    out.push_str(&timeline(&history.runs, &history.steps, &replays));
    if history.next_runs_after.is_some() || history.next_steps_after.is_some() {
        out.push_str("<p class=\"muted\">The first 1,000 runs and steps are shown; the CLI's <code>history</code> follows every page.</p>");
    }
    if !history.dead_letters.is_empty() {
        out.push_str("<h2>Dead letters</h2><ul>");
        for d in &history.dead_letters {
            let _ = write!(
                out,
                "<li><a href=\"/ui/dead-letters/{}\">{}</a> {} {} at {}: {}</li>",
                d.id,
                d.id,
                e(&d.status),
                e(&d.reason),
                e(&d.stage),
                e(&d.created_at)
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("<h2>The result as published</h2>");
    match result {
        // The result is made from the payload: withheld where the payload is (no token configured).
        Some(_) if !session.role.sees_payloads() => {
            out.push_str("<p class=\"muted\" data-result-withheld>Withheld: no token is configured.</p>");
        }
        Some(r) => {
            let _ = write!(out, "<pre class=\"wrap\" data-result>{}</pre>", e(r));
        }
        None => out.push_str("<p class=\"muted\">No result is stored for this key.</p>"),
    }
    render(&headers, &session, "Event", Nav::Events, None, &out)
}

/// A dead letter replayed, refused a replay or discarded (the replay log).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReplayEntry {
    pub id: i64,
    pub dead_letter_id: i64,
    pub outcome: String,
    pub note: Option<String>,
    pub at: String,
}

/// The replay log of a key, oldest first.
pub async fn replays_of(pool: &sqlx::PgPool, pipeline: &str, key: &str) -> Vec<ReplayEntry> {
    sqlx::query_as(
        "SELECT id, dead_letter_id, outcome, note,
                to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at
         FROM replay_log WHERE pipeline = $1 AND idempotency_key = $2 ORDER BY id LIMIT 1000",
    )
    .bind(pipeline)
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

/// One entry of a timeline: a stage's run, one of its steps, or an operator's replay.
enum Entry<'a> {
    Run(&'a RunEntry),
    Step(&'a StepEntry),
    Replay(&'a ReplayEntry),
}

impl Entry<'_> {
    /// Time order; within one instant (rows written by one statement) the steps come
    /// before the run they led to.
    fn order(&self) -> (&str, u8, i64) {
        match self {
            Entry::Step(s) => (&s.at, 0, s.id),
            Entry::Run(r) => (&r.at, 1, r.id),
            Entry::Replay(r) => (&r.at, 2, r.id),
        }
    }
}

/// Runs, steps and replays merged into one ordered list.
pub fn timeline(runs: &[RunEntry], steps: &[StepEntry], replays: &[ReplayEntry]) -> String {
    let mut entries: Vec<Entry<'_>> = runs
        .iter()
        .map(Entry::Run)
        .chain(steps.iter().map(Entry::Step))
        .chain(replays.iter().map(Entry::Replay))
        .collect();
    entries.sort_by(|a, b| a.order().cmp(&b.order()));
    if entries.is_empty() {
        return "<p class=\"muted\">No run is recorded.</p>".into();
    }
    let mut out = String::from(
        "<table class=\"timeline\"><caption class=\"sr\">Every run and step, oldest first</caption><thead><tr>\
         <th scope=\"col\">when (UTC)</th><th scope=\"col\">stage</th><th scope=\"col\">attempt</th><th scope=\"col\">what</th>\
         <th scope=\"col\">status</th><th scope=\"col\">details</th></tr></thead><tbody>",
    );
    for entry in entries {
        match entry {
            Entry::Replay(r) => {
                let _ = write!(
                    out,
                    "<tr data-entry=\"run\" data-stage=\"dlq-replayer\" data-status=\"{}\"><td>{}</td><td>dlq-replayer</td><td></td>\
                     <td>operator</td><td><strong>{}</strong></td><td>dead letter <a href=\"/ui/dead-letters/{}\">{}</a>{}{}</td></tr>",
                    e(&r.outcome),
                    e(&r.at),
                    e(&r.outcome),
                    r.dead_letter_id,
                    r.dead_letter_id,
                    if r.note.is_some() { ", note: " } else { "" },
                    e(r.note.as_deref().unwrap_or("")),
                );
            }
            Entry::Run(r) => {
                let _ = write!(
                    out,
                    "<tr data-entry=\"run\" data-stage=\"{}\" data-status=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>run</td><td><strong>{}</strong></td><td>{}</td></tr>",
                    e(&r.stage),
                    e(&r.status),
                    e(&r.at),
                    e(&r.stage),
                    r.attempt,
                    e(&r.status),
                    e(r.detail.as_deref().unwrap_or("")),
                );
            }
            Entry::Step(s) => {
                let mut details = Vec::new();
                if let Some(m) = &s.model {
                    details.push(format!("model {m}"));
                }
                if s.input_tokens.is_some() || s.output_tokens.is_some() {
                    details.push(format!(
                        "{} in / {} out tokens",
                        s.input_tokens.unwrap_or(0),
                        s.output_tokens.unwrap_or(0)
                    ));
                }
                if let Some(c) = s.cost_usd {
                    details.push(usd(c));
                }
                if let Some(d) = s.duration_ms {
                    details.push(format!("{d:.0} ms"));
                }
                if let Some(err) = &s.error {
                    details.push(err.clone());
                }
                let what = match s.step.as_str() {
                    "llm_call" => "LLM call",
                    "llm_repair" => "LLM repair call",
                    "cache_hit" => "cache hit (no call)",
                    "validation" => "validation",
                    other => other,
                };
                let _ = write!(
                    out,
                    "<tr data-entry=\"step\" data-stage=\"{}\" data-step=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    e(&s.stage),
                    e(&s.step),
                    e(&s.at),
                    e(&s.stage),
                    s.attempt,
                    e(what),
                    e(&s.status),
                    e(details.join(", ")),
                );
            }
        }
    }
    out.push_str("</tbody></table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_is_told_apart() {
        assert_eq!(
            classify("4bf92f3577b34da6a3ce929d0e0e4736"),
            Search::Trace("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
        let coords = Search::Coordinates { topic: "events.raw".into(), partition: 3, offset: 42 };
        assert_eq!(classify("events.raw/3@42"), coords);
        assert_eq!(classify("events.raw/3/42"), coords);
        assert_eq!(classify("events.raw:3:42"), coords);
        assert_eq!(classify("support-tickets:T-1042"), Search::Key("support-tickets:T-1042".into()));
        assert_eq!(classify(" T-1042 "), Search::Key("T-1042".into()));
    }
}
