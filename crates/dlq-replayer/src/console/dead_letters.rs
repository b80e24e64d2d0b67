//! Dead letters: a filtered, paged table; one dead letter with its headers, error,
//! payload and the key's history; a dry run of a selection or of a whole filter, then a
//! replay of exactly what the dry run found, paced and with progress; discard with a note.
//! Every rule is the admin API's: the same `replay` functions decide.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::html::{Nav, e, q, usd};
use super::jobs::Job;
use super::{Console, Form, Session, act, csrf_field, internal, look, problem, redirect, render};
use crate::replay::{self, Filter, Page};

const PAGE_SIZE: i64 = 50;

#[derive(Deserialize, Default)]
pub struct ListQuery {
    status: Option<String>,
    reason: Option<String>,
    stage: Option<String>,
    from: Option<String>,
    to: Option<String>,
    text: Option<String>,
    after_id: Option<i64>,
}

fn blank(v: &Option<String>) -> Option<String> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string)
}

/// A time from the form's `datetime-local` field (taken as UTC) or RFC 3339 text.
fn instant(v: &Option<String>) -> Option<String> {
    let v = blank(v)?;
    let local = v.len() == 16 && v.as_bytes().get(10) == Some(&b'T');
    Some(if local { format!("{v}:00Z") } else { v })
}

impl ListQuery {
    fn filter(&self) -> Filter {
        Filter {
            ids: None,
            reason: blank(&self.reason),
            stage: blank(&self.stage),
            key: None,
            from: instant(&self.from),
            to: instant(&self.to),
            text: blank(&self.text),
        }
    }

    fn status(&self) -> String {
        match self.status.as_deref() {
            Some(s @ ("replayed" | "discarded")) => s.to_string(),
            _ => "dead".into(),
        }
    }

    /// The filter as query parameters (for the next page's link).
    fn params(&self) -> String {
        let mut out = format!("status={}", q(&self.status()));
        for (k, v) in [
            ("reason", &self.reason),
            ("stage", &self.stage),
            ("from", &self.from),
            ("to", &self.to),
            ("text", &self.text),
        ] {
            if let Some(v) = blank(v) {
                let _ = write!(out, "&{k}={}", q(&v));
            }
        }
        out
    }

    fn from_form(form: &Form) -> Self {
        let get = |k: &str| form.get(k).map(str::to_string);
        Self {
            status: get("status"),
            reason: get("reason"),
            stage: get("stage"),
            from: get("from"),
            to: get("to"),
            text: get("text"),
            after_id: None,
        }
    }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

fn selected(v: &Option<String>, option: &str) -> &'static str {
    if v.as_deref() == Some(option) { " selected" } else { "" }
}

pub async fn list(State(console): State<Arc<Console>>, headers: HeaderMap, Query(query): Query<ListQuery>) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let filter = query.filter();
    let status = query.status();
    let after = query.after_id.unwrap_or(0);
    let pool = console.pool();
    let rows = match replay::list(pool, console.pipeline(), &status, &filter, after, PAGE_SIZE + 1).await {
        Ok(rows) => rows,
        Err(err) => {
            return problem(Some(&session), StatusCode::BAD_REQUEST, "The filter cannot be read", &err.to_string());
        }
    };
    let reasons: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT reason FROM dead_letters WHERE pipeline = $1 ORDER BY reason LIMIT 200")
            .bind(console.pipeline())
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let more = rows.len() as i64 > PAGE_SIZE;
    let rows = &rows[..rows.len().min(PAGE_SIZE as usize)];

    let mut out = String::from("<h1>Dead letters</h1>");
    // The filter.
    let _ = write!(
        out,
        "<form method=\"get\" action=\"/ui/dead-letters\" class=\"filters\" role=\"search\" aria-label=\"Filter dead letters\">\
         <div><label for=\"f-status\">status</label><select id=\"f-status\" name=\"status\">\
         <option value=\"dead\">waiting</option><option value=\"replayed\"{}>replayed</option><option value=\"discarded\"{}>discarded</option></select></div>\
         <div><label for=\"f-reason\">reason</label><input id=\"f-reason\" name=\"reason\" list=\"reasons\" value=\"{}\"><datalist id=\"reasons\">",
        selected(&query.status, "replayed"),
        selected(&query.status, "discarded"),
        e(query.reason.as_deref().unwrap_or(""))
    );
    for (r,) in &reasons {
        let _ = write!(out, "<option value=\"{}\">", e(r));
    }
    let _ = write!(
        out,
        "</datalist></div><div><label for=\"f-stage\">stage</label><select id=\"f-stage\" name=\"stage\"><option value=\"\">any</option>\
         <option{}>ingest-dedup</option><option{}>enricher</option><option{}>publisher</option></select></div>\
         <div><label for=\"f-from\">from (UTC)</label><input id=\"f-from\" name=\"from\" type=\"datetime-local\" value=\"{}\"></div>\
         <div><label for=\"f-to\">to (UTC)</label><input id=\"f-to\" name=\"to\" type=\"datetime-local\" value=\"{}\"></div>\
         <div><label for=\"f-text\">key or error holds</label><input id=\"f-text\" name=\"text\" type=\"search\" value=\"{}\"></div>\
         <div><button type=\"submit\">Filter</button> <a href=\"/ui/dead-letters\">clear</a></div></form>",
        selected(&query.stage, "ingest-dedup"),
        selected(&query.stage, "enricher"),
        selected(&query.stage, "publisher"),
        e(query.from.as_deref().unwrap_or("")),
        e(query.to.as_deref().unwrap_or("")),
        e(query.text.as_deref().unwrap_or("")),
    );

    // The table, inside the form that sends a selection to the dry run.
    let can_act = session.role.may_act() && status == "dead";
    let _ = write!(out, "<form method=\"post\" action=\"/ui/dead-letters/preview\">{}", csrf_field(&session));
    for (k, v) in [
        ("status", Some(status.clone())),
        ("reason", blank(&query.reason)),
        ("stage", blank(&query.stage)),
        ("from", blank(&query.from)),
        ("to", blank(&query.to)),
        ("text", blank(&query.text)),
    ] {
        if let Some(v) = v {
            let _ = write!(out, "<input type=\"hidden\" name=\"{k}\" value=\"{}\">", e(&v));
        }
    }
    let _ = write!(
        out,
        "<p class=\"muted\" data-rows=\"{}\">{} shown{}</p>",
        rows.len(),
        rows.len(),
        if more { ", more on the next page" } else { "" }
    );
    out.push_str(
        "<table class=\"dead-letters\"><caption class=\"sr\">Dead letters matching the filter</caption><thead><tr>",
    );
    if can_act {
        out.push_str(
            "<th scope=\"col\"><input type=\"checkbox\" data-select-all aria-label=\"select every row shown\"></th>",
        );
    }
    out.push_str("<th scope=\"col\">id</th><th scope=\"col\">when (UTC)</th><th scope=\"col\">stage</th><th scope=\"col\">reason</th><th scope=\"col\">attempts</th><th scope=\"col\">key</th><th scope=\"col\">error</th></tr></thead><tbody>");
    for d in rows {
        out.push_str("<tr data-dead-letter>");
        if can_act {
            let _ = write!(
                out,
                "<td><input type=\"checkbox\" name=\"id\" value=\"{}\" aria-label=\"select dead letter {}\"></td>",
                d.id, d.id
            );
        }
        let _ = write!(
            out,
            "<td><a href=\"/ui/dead-letters/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><a href=\"/ui/event?key={}\">{}</a></td><td>{}</td></tr>",
            d.id,
            d.id,
            e(&d.created_at),
            e(&d.stage),
            e(&d.reason),
            d.attempts,
            q(&d.idempotency_key),
            e(shorten(&d.idempotency_key, 60)),
            e(shorten(&d.error, 160)),
        );
    }
    out.push_str("</tbody></table>");
    if can_act {
        out.push_str(
            "<p class=\"actions\"><button type=\"submit\" name=\"scope\" value=\"selected\">Dry run the selected</button> \
             <button type=\"submit\" name=\"scope\" value=\"filter\" id=\"dry-run-filter\">Dry run the whole filter</button></p>",
        );
    } else if status == "dead" {
        out.push_str("<p class=\"muted\">Log in with the admin token to replay or discard.</p>");
    }
    out.push_str("</form>");
    if after > 0 {
        let _ = write!(out, "<a href=\"/ui/dead-letters?{}\">first page</a> ", query.params());
    }
    if more && let Some(last) = rows.last() {
        let _ = write!(
            out,
            "<a href=\"/ui/dead-letters?{}&after_id={}\" rel=\"next\">next page</a>",
            query.params(),
            last.id
        );
    }
    render(&headers, &session, "Dead letters", Nav::DeadLetters, None, &out)
}

pub async fn show(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let with_payload = session.role.sees_payloads();
    let page = Page { limit: Page::MAX, ..Page::default() };
    let envelope = sqlx::query_as::<_, (Vec<u8>,)>("SELECT envelope FROM dead_letters WHERE pipeline = $1 AND id = $2")
        .bind(console.pipeline())
        .bind(id)
        .fetch_optional(console.pool());
    // The dead letter with its history, and its envelope for the headers, at once.
    let (shown, envelope) =
        tokio::join!(replay::show(console.pool(), console.pipeline(), id, page, with_payload), envelope);
    let shown = match shown {
        Ok(Some(s)) => s,
        Ok(None) => {
            return problem(
                Some(&session),
                StatusCode::NOT_FOUND,
                "Not found",
                &format!("There is no dead letter {id}."),
            );
        }
        Err(err) => return internal(&session, format!("{err:#}")),
    };
    let envelope = envelope.unwrap_or(None).and_then(|(b,)| enrich_common::envelope::Envelope::decode_from(&b).ok());
    let d = &shown.dead_letter;
    let mut out = format!("<h1>Dead letter {}</h1><dl class=\"fields\">", d.id);
    let coords = format!(
        "{}/{}@{}",
        d.source_topic.as_deref().unwrap_or("?"),
        d.source_partition.map_or("?".into(), |p| p.to_string()),
        d.source_offset.map_or("?".into(), |o| o.to_string())
    );
    for (k, v) in [
        ("status", d.status.clone()),
        ("when (UTC)", d.created_at.clone()),
        ("stage", d.stage.clone()),
        ("reason", format!("{} ({})", d.reason, d.reason_class)),
        ("attempts", d.attempts.to_string()),
        ("source record", coords),
        ("trace", d.trace_id.clone().unwrap_or_default()),
    ] {
        let _ = write!(out, "<div><dt>{}</dt><dd>{}</dd></div>", e(k), e(v));
    }
    let _ = write!(
        out,
        "<div><dt>key</dt><dd><a href=\"/ui/event?key={}\">{}</a></dd></div></dl><h2>Error</h2><pre class=\"wrap\" data-error>{}</pre>",
        q(&d.idempotency_key),
        e(&d.idempotency_key),
        e(&d.error)
    );
    if let Some(env) = &envelope {
        out.push_str("<h2>Headers of the original record</h2>");
        if env.headers.is_empty() {
            out.push_str("<p class=\"muted\">none</p>");
        } else {
            out.push_str(
                "<table><thead><tr><th scope=\"col\">name</th><th scope=\"col\">value</th></tr></thead><tbody>",
            );
            for h in &env.headers {
                let value = match (&h.value, with_payload) {
                    (_, false) => "(withheld)".to_string(),
                    (Some(v), true) => shorten(&String::from_utf8_lossy(v), 300),
                    (None, true) => "(null)".to_string(),
                };
                let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", e(&h.key), e(value));
            }
            out.push_str("</tbody></table>");
        }
    }
    out.push_str("<h2>Original payload</h2>");
    match &shown.payload {
        Some(p) => {
            let _ = write!(out, "<pre class=\"wrap\" data-payload>{}</pre>", e(shorten(p, 20_000)));
        }
        None => out.push_str("<p class=\"muted\">Withheld: no token is configured.</p>"),
    }
    out.push_str("<h2>The key's history</h2>");
    let replays = super::events::replays_of(console.pool(), console.pipeline(), &d.idempotency_key).await;
    out.push_str(&super::events::timeline(&shown.runs, &shown.steps, &replays));
    if session.role.may_act() && d.status == "dead" {
        let _ = write!(
            out,
            "<h2>Act</h2><form method=\"post\" action=\"/ui/dead-letters/preview\" class=\"inline\">{}\
             <input type=\"hidden\" name=\"scope\" value=\"selected\"><input type=\"hidden\" name=\"id\" value=\"{}\">\
             <button type=\"submit\">Dry run a replay</button></form>\
             <form method=\"post\" action=\"/ui/dead-letters/{}/discard\" class=\"inline\" data-confirm=\"Discard dead letter {}? It will not be replayed.\">{}\
             <label for=\"discard-note\">Note</label> <input id=\"discard-note\" name=\"note\" type=\"text\" required> \
             <button type=\"submit\">Discard</button></form>",
            csrf_field(&session),
            d.id,
            d.id,
            d.id,
            csrf_field(&session)
        );
    }
    render(&headers, &session, &format!("Dead letter {id}"), Nav::DeadLetters, None, &out)
}

/// The average cost of a paid call over the pipeline's latest 1,000, for estimates.
async fn cost_per_call(console: &Console) -> f64 {
    let avg: Result<(Option<f64>,), _> = sqlx::query_as(
        "SELECT avg(cost_usd)::float8 FROM (
           SELECT cost_usd FROM step_outcomes
           WHERE pipeline = $1 AND step IN ('llm_call', 'llm_repair') AND status = 'ok' AND cost_usd IS NOT NULL
           ORDER BY id DESC LIMIT 1000) recent",
    )
    .bind(console.pipeline())
    .fetch_one(console.pool())
    .await;
    avg.ok().and_then(|(a,)| a).unwrap_or(0.0)
}

/// The dry run: the admin API's replay with `dry_run`, on the selected ids or the filter.
pub async fn preview(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let session = match act(&console, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let filter = if form.get("scope") == Some("filter") {
        ListQuery::from_form(&form).filter()
    } else {
        let ids: Vec<i64> = form.all("id").filter_map(|v| v.parse().ok()).collect();
        if ids.is_empty() {
            return problem(
                Some(&session),
                StatusCode::BAD_REQUEST,
                "Nothing selected",
                "Select dead letters first, or dry run the whole filter.",
            );
        }
        Filter { ids: Some(ids), ..Filter::default() }
    };
    if filter.is_empty() {
        return problem(
            Some(&session),
            StatusCode::BAD_REQUEST,
            "The filter selects everything",
            "Narrow it (reason, stage, time or text) or select rows: a replay of the whole DLQ is refused, as in the API.",
        );
    }
    // The dry run and the recent price per call at once.
    let (outcome, per_call) = tokio::join!(console.api.replayer.replay(&filter, true, None), cost_per_call(&console));
    let outcome = match outcome {
        Ok(o) => o,
        Err(err) => return internal(&session, format!("{err:#}")),
    };
    let n = outcome.replayed.len();
    let max_attempts = console.api.replayer.settings.llm.max_attempts;
    let rate = console.api.replayer.settings.dlq_replayer.replay_rate_per_sec;
    let mut out = format!(
        "<h1>Dry run</h1><p data-dry-run-matched=\"{}\" data-dry-run-replayable=\"{n}\"><strong>{} matched: {n} to replay, {} refused.</strong> Nothing has changed yet.</p>\
         <p>Estimated cost: <strong data-estimate>{}</strong> ({n} × {} per call, the average of recent paid calls; \
         at most {} if every record needs all {max_attempts} attempts).</p>",
        outcome.matched,
        outcome.matched,
        outcome.refused.len(),
        e(usd(per_call * n as f64)),
        e(usd(per_call)),
        e(usd(per_call * n as f64 * f64::from(max_attempts))),
    );
    if !outcome.refused.is_empty() {
        out.push_str("<h2>Refused</h2><ul>");
        for r in &outcome.refused {
            let _ = write!(
                out,
                "<li><a href=\"/ui/dead-letters/{}\">{}</a> {}: {}</li>",
                r.id,
                r.id,
                e(&r.idempotency_key),
                e(&r.why)
            );
        }
        out.push_str("</ul>");
    }
    if n > 0 {
        let preview = console.jobs.keep_preview(outcome.replayed.clone());
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/ui/dead-letters/replay\" class=\"replay\" data-confirm=\"Replay {n} dead letter(s)?\">{}\
             <input type=\"hidden\" name=\"preview\" value=\"{preview}\">\
             <div><label for=\"rate\">records per second (at most {rate})</label>\
             <input id=\"rate\" name=\"rate\" type=\"number\" min=\"1\" max=\"{rate}\" value=\"{}\"></div>\
             <div><label for=\"note\">note (kept in the replay log)</label><input id=\"note\" name=\"note\" type=\"text\" required></div>\
             <button type=\"submit\" id=\"replay\">Replay {n} dead letter(s)</button></form>",
            csrf_field(&session),
            rate.min(50),
        );
    }
    render(&headers, &session, "Dry run", Nav::DeadLetters, None, &out)
}

/// Replays what a dry run found, in the background, and shows its progress.
pub async fn replay(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let session = match act(&console, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(ids) = form.get("preview").and_then(|p| p.parse().ok()).and_then(|p| console.jobs.take_preview(p)) else {
        return problem(
            Some(&session),
            StatusCode::BAD_REQUEST,
            "No dry run",
            "This dry run was used or has expired: run it again.",
        );
    };
    let rate = form.get("rate").and_then(|r| r.trim().parse::<u32>().ok()).unwrap_or(1).max(1);
    let note = form.text("note");
    let job = Arc::new(Job {
        total: ids.len(),
        waiting: AtomicBool::new(true),
        progress: Arc::new(AtomicUsize::new(0)),
        outcome: Mutex::new(None),
        note: note.clone(),
        rate: rate.min(console.api.replayer.settings.dlq_replayer.replay_rate_per_sec),
        started: Instant::now(),
        finished: Mutex::new(None),
    });
    let id = console.jobs.add(job.clone());
    let replayer = console.api.replayer.clone();
    tracing::info!(records = ids.len(), rate, note = ?note, "replay started from the console");
    let turn = console.jobs.turn.clone();
    tokio::spawn(async move {
        let _turn = turn.lock().await;
        job.waiting.store(false, Ordering::Relaxed);
        let filter = Filter { ids: Some(ids), ..Filter::default() };
        let done = replayer.replay_paced(&filter, false, note.as_deref(), rate, Some(&job.progress)).await;
        match &done {
            Ok(o) => {
                tracing::info!(replayed = o.replayed.len(), refused = o.refused.len(), "replay from the console done")
            }
            Err(err) => tracing::warn!(error = %format!("{err:#}"), "replay from the console failed"),
        }
        if let Ok(mut slot) = job.outcome.lock() {
            *slot = Some(done.map_err(|e| format!("{e:#}")));
        }
        if let Ok(mut f) = job.finished.lock() {
            *f = Some(Instant::now());
        }
    });
    redirect(&format!("/ui/jobs/{id}"))
}

pub async fn job(State(console): State<Arc<Console>>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(job) = console.jobs.get(id) else {
        return problem(
            Some(&session),
            StatusCode::NOT_FOUND,
            "Not found",
            "No such replay (the console remembers the latest 100).",
        );
    };
    let done = job.progress.load(Ordering::Relaxed).min(job.total);
    let outcome = job.outcome.lock().ok().and_then(|o| o.clone());
    let finished = job.finished.lock().ok().and_then(|f| *f);
    let took = finished.unwrap_or_else(Instant::now).duration_since(job.started).as_secs_f64();
    let mut out = format!(
        "<h1>Replay {id}</h1><p><progress max=\"{}\" value=\"{done}\" aria-label=\"dead letters handled\">{done}</progress> \
         <span data-progress=\"{done}/{}\">{done} of {} handled</span> in {took:.1} s, at most {} a second. Note: {}</p>",
        job.total.max(1),
        job.total,
        job.total,
        job.rate,
        e(job.note.as_deref().unwrap_or("(none)"))
    );
    match outcome {
        None if job.waiting.load(Ordering::Relaxed) => {
            out.push_str("<p data-announce data-job=\"waiting\">Waiting for the replay under way to end…</p>")
        }
        None => out.push_str("<p data-announce data-job=\"running\">Running…</p>"),
        Some(Ok(o)) => {
            let _ = write!(
                out,
                "<p data-announce data-job=\"done\" data-replayed=\"{}\" data-refused=\"{}\"><strong>Done: {} replayed, {} refused.</strong></p>",
                o.replayed.len(),
                o.refused.len(),
                o.replayed.len(),
                o.refused.len()
            );
            if !o.refused.is_empty() {
                out.push_str("<ul>");
                for r in &o.refused {
                    let _ = write!(out, "<li>{} {}: {}</li>", r.id, e(&r.idempotency_key), e(&r.why));
                }
                out.push_str("</ul>");
            }
        }
        Some(Err(err)) => {
            let _ = write!(
                out,
                "<p data-announce data-job=\"failed\" class=\"error\" role=\"alert\">Failed: {}</p>",
                e(err)
            );
        }
    }
    out.push_str("<p><a href=\"/ui/dead-letters\">back to the dead letters</a></p>");
    let refresh = finished.is_none().then_some(1);
    render(&headers, &session, &format!("Replay {id}"), Nav::DeadLetters, refresh, &out)
}

pub async fn discard(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let session: Session = match act(&console, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let note = form.text("note");
    match console.api.replayer.discard(id, note.as_deref()).await {
        Ok(true) => {
            tracing::info!(id, note = ?note, "dead letter discarded from the console");
            redirect(&format!("/ui/dead-letters/{id}"))
        }
        Ok(false) => problem(
            Some(&session),
            StatusCode::NOT_FOUND,
            "Not waiting",
            &format!("Dead letter {id} is not waiting in the DLQ."),
        ),
        Err(err) => internal(&session, format!("{err:#}")),
    }
}
