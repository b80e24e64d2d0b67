//! The overview: every stage replica's health and flow (from its `/readyz` and
//! `/metrics`, sampled), the keys by state and the dead letters waiting, the budget's
//! current windows, the kill switch, and charts of the last hour. Refreshes in place.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use super::fresh::Fresh;
use super::html::{Nav, e, fmt_num, line_chart, usd};
use super::sampler::Reading;
use super::{Console, Form, act, csrf_field, internal, look, redirect, render};
use crate::replay;

/// Seconds between refreshes of the overview in the browser.
const REFRESH_SECS: u64 = 3;

/// The keys of each state.
pub type States = Vec<(String, i64)>;

/// How long a count of the keys by state is shown before it is counted again. Counting
/// them reads every key of the pipeline (nothing indexes the state: see
/// migrations/20261203000003_hot_updates.sql), so it is done at most this often, by one
/// task whoever is looking, in the background ([`Fresh`]).
pub const KEYS_TTL: Duration = Duration::from_secs(5);

/// The keys by state.
pub async fn count_keys(console: Arc<Console>) -> sqlx::Result<States> {
    sqlx::query_as("SELECT state, count(*) FROM enrich_state WHERE pipeline = $1 GROUP BY state ORDER BY state")
        .bind(console.pipeline())
        .fetch_all(console.pool())
        .await
}

pub async fn page(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match body(&console, &session).await {
        Ok(main) => render(&headers, &session, "Overview", Nav::Overview, Some(REFRESH_SECS), &main),
        Err(err) => internal(&session, format!("{err:#}")),
    }
}

/// A stage's metric as text, or a dash when the stage does not have it.
fn metric(r: &Reading, name: &str) -> String {
    if r.has(name) { fmt_num(r.sum(name, &[])) } else { "-".into() }
}

fn flag(r: &Reading, name: &str, on: &str, off: &str) -> String {
    match r.has(name) {
        true if r.sum(name, &[]) > 0.0 => format!("<span class=\"bad\">{}</span>", e(on)),
        true => format!("<span class=\"good\">{}</span>", e(off)),
        false => "-".into(),
    }
}

async fn body(console: &Arc<Console>, session: &super::Session) -> anyhow::Result<String> {
    let pool = console.pool();
    let pipeline = console.pipeline();
    let settings = &console.api.replayer.settings;
    let (taken, readings) = console.sampler.latest();
    // What the database says, read at once (each on its own connection): the kill switch,
    // the keys by state, the dead letters waiting, the budget's current windows.
    let windows: Vec<i64> = settings.llm.budgets.iter().map(|b| b.window_secs as i64).collect();
    let (control, (counted_ago, states), (waiting,), spent) = tokio::try_join!(
        replay::control(pool, pipeline),
        Fresh::get(console, |c| &c.keys, count_keys),
        sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM dead_letters WHERE pipeline = $1 AND status = 'dead'")
            .bind(pipeline)
            .fetch_one(pool),
        sqlx::query_as::<_, (i64, f64, f64, i64)>(
            "SELECT w.secs, b.spent_usd, b.reserved_usd, b.calls
             FROM unnest($2::int8[]) AS w(secs)
             JOIN budget_windows b ON b.pipeline = $1 AND b.window_secs = w.secs
              AND b.window_start = to_timestamp((floor(extract(epoch FROM now()) / w.secs) * w.secs)::float8)",
        )
        .bind(pipeline)
        .bind(&windows)
        .fetch_all(pool),
    )?;
    let mut out = String::new();
    let _ = write!(out, "<h1>Overview <span class=\"muted\">pipeline {}</span></h1>", e(pipeline));

    // The kill switch first: it is what an operator reaches for.
    out.push_str("<section aria-labelledby=\"kill\"><h2 id=\"kill\">Kill switch</h2>");
    if control.paused {
        let _ = write!(
            out,
            "<p data-paused=\"true\" data-announce><strong class=\"bad\">Enrichment is paused</strong>: {} <span class=\"muted\">since {}</span></p>",
            e(control.reason.as_deref().unwrap_or("no reason given")),
            e(control.updated_at.as_deref().unwrap_or("-"))
        );
    } else {
        out.push_str("<p data-paused=\"false\" data-announce><strong class=\"good\">Enrichment is running</strong>: enricher replicas start LLM calls.</p>");
    }
    if session.role.may_act() {
        let (action, label, confirm) = if control.paused {
            ("resume", "Resume enrichment", "Resume enrichment on every enricher replica?")
        } else {
            ("pause", "Pause enrichment", "Pause enrichment? No replica will start a new LLM call.")
        };
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/ui/kill-switch\" class=\"inline\" data-confirm=\"{}\">{}\
             <input type=\"hidden\" name=\"action\" value=\"{action}\">",
            e(confirm),
            csrf_field(session)
        );
        if !control.paused {
            out.push_str("<label for=\"pause-note\">Reason</label> <input id=\"pause-note\" name=\"note\" type=\"text\" placeholder=\"provider incident\"> ");
        }
        let _ = write!(out, "<button type=\"submit\" id=\"kill-switch\">{label}</button></form>");
    } else {
        out.push_str("<p class=\"muted\">Log in with the admin token to pause or resume.</p>");
    }
    out.push_str("</section>");

    // Stages.
    out.push_str("<section aria-labelledby=\"stages\"><h2 id=\"stages\">Stages</h2>");
    match taken {
        None => out.push_str("<p>Reading the stages…</p>"),
        Some(at) => {
            let ago = std::time::SystemTime::now().duration_since(at).map_or(0.0, |d| d.as_secs_f64());
            // What the status line announces when it changes (the console's script).
            let ready = readings.iter().filter(|r| r.ready).count();
            let mut not_ready: Vec<&str> = readings.iter().filter(|r| !r.ready).map(|r| r.target.stage).collect();
            not_ready.dedup();
            let _ = write!(out, "<p><span data-announce>{ready} of {} stage replicas ready", readings.len());
            if !not_ready.is_empty() {
                let _ = write!(out, "; not ready: {}", e(not_ready.join(", ")));
            }
            let _ = write!(out, ".</span> <span class=\"muted\">Read {ago:.1} s ago.</span></p>");
        }
    }
    out.push_str(
        "<table><caption class=\"sr\">Each stage replica</caption><thead><tr><th scope=\"col\">stage</th><th scope=\"col\">state</th>\
         <th scope=\"col\">records in</th><th scope=\"col\">records out</th><th scope=\"col\">in / s</th><th scope=\"col\">out / s</th>\
         <th scope=\"col\">dead letters</th><th scope=\"col\">DLQ limit</th><th scope=\"col\">consumer lag</th></tr></thead><tbody>",
    );
    for r in &readings {
        let state = if r.ready {
            "<span class=\"good\">ready</span>".to_string()
        } else if r.up {
            format!("<span class=\"bad\">not ready</span>: {}", e(r.why.as_deref().unwrap_or("")))
        } else {
            format!("<span class=\"bad\">down</span>: {}", e(r.why.as_deref().unwrap_or("")))
        };
        let (records_in, records_out) = r.flow();
        let mut lag: Vec<(String, i64, f64)> = r
            .series("enrich_consumer_lag")
            .map(|s| {
                let p = s.label("partition").and_then(|p| p.parse().ok()).unwrap_or(-1);
                (s.label("topic").unwrap_or("?").to_string(), p, s.value)
            })
            .collect();
        lag.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let lag_total: f64 = lag.iter().map(|l| l.2).sum();
        let mut lag_text = String::new();
        if lag.is_empty() {
            lag_text.push('-');
        } else {
            let _ = write!(lag_text, "<details><summary>{} in all</summary><ul class=\"lag\">", fmt_num(lag_total));
            for (topic, partition, value) in &lag {
                let _ = write!(lag_text, "<li>{}/{partition}: {}</li>", e(topic), fmt_num(*value));
            }
            lag_text.push_str("</ul></details>");
        }
        let rate = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = write!(
            out,
            "<tr data-stage=\"{}\" data-ready=\"{}\"><th scope=\"row\">{} <span class=\"muted\">{}</span></th><td>{state}</td>\
             <td data-count=\"in\">{}</td><td data-count=\"out\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{lag_text}</td></tr>",
            e(r.target.stage),
            r.ready,
            e(r.target.stage),
            e(&r.target.url),
            fmt_num(records_in),
            fmt_num(records_out),
            rate(r.in_per_sec),
            rate(r.out_per_sec),
            fmt_num(r.sum("enrich_dead_letters_total", &[])),
            flag(r, "enrich_dlq_limit_tripped", "holding dead letters", "clear"),
        );
    }
    out.push_str("</tbody></table>");

    // The enricher's LLM side, per replica.
    out.push_str(
        "<h3>LLM calls (enricher replicas)</h3><table><thead><tr><th scope=\"col\">replica</th><th scope=\"col\">in flight</th>\
         <th scope=\"col\">concurrency limit</th><th scope=\"col\">breaker</th><th scope=\"col\">budget</th><th scope=\"col\">kill switch</th>\
         <th scope=\"col\">calls ok</th><th scope=\"col\">cost (USD)</th></tr></thead><tbody>",
    );
    for r in readings.iter().filter(|r| r.target.stage == "enricher") {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td data-metric=\"in-flight\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&r.target.url),
            metric(r, "enrich_in_flight"),
            metric(r, "enrich_llm_concurrency_limit"),
            flag(r, "enrich_llm_breaker_open", "open", "closed"),
            flag(r, "enrich_budget_exhausted", "spent", "available"),
            flag(r, "enrich_paused", "paused", "running"),
            fmt_num(r.sum("enrich_llm_calls_total", &[("outcome", "ok")])),
            usd(r.sum("enrich_llm_cost_usd_total", &[])),
        );
    }
    out.push_str("</tbody></table></section>");

    // What the database says of the keys.
    out.push_str("<section aria-labelledby=\"keys\"><h2 id=\"keys\">Keys</h2><dl class=\"counts\">");
    for (state, n) in &states {
        let _ = write!(out, "<div><dt>{}</dt><dd data-count=\"{}\">{n}</dd></div>", e(state), e(state));
    }
    let _ = write!(
        out,
        "<div><dt><a href=\"/ui/dead-letters\">dead letters waiting</a></dt><dd data-count=\"dlq-waiting\">{waiting}</dd></div></dl>\
         <p class=\"muted\">Keys counted {:.0} s ago (at most every {} s).</p></section>",
        counted_ago.as_secs_f64(),
        console.keys.ttl().as_secs()
    );

    // The budget's current windows.
    out.push_str("<section aria-labelledby=\"budget\"><h2 id=\"budget\">Budget</h2>");
    let budgets = &settings.llm.budgets;
    if budgets.is_empty() {
        out.push_str("<p class=\"muted\">No budget is configured (<code>llm.budgets</code>).</p>");
    } else {
        out.push_str("<table><thead><tr><th scope=\"col\">window</th><th scope=\"col\">spent</th><th scope=\"col\">reserved</th><th scope=\"col\">limit</th><th scope=\"col\">calls</th><th scope=\"col\">used</th></tr></thead><tbody>");
        for b in budgets {
            let row = spent.iter().find(|w| w.0 == b.window_secs as i64);
            let (spent, reserved, calls) = row.map_or((0.0, 0.0, 0), |w| (w.1, w.2, w.3));
            let share = ((spent + reserved) / b.usd * 100.0).clamp(0.0, 100.0);
            let _ = write!(
                out,
                "<tr data-budget-window=\"{}\" data-calls=\"{calls}\"><th scope=\"row\">{} s</th><td>{}</td><td>{}</td><td>{}</td><td>{calls}</td>\
                 <td><meter min=\"0\" max=\"100\" value=\"{share:.0}\" aria-label=\"share of the window's budget used\">{share:.0}%</meter> {share:.0}%</td></tr>",
                b.window_secs,
                b.window_secs,
                usd(spent),
                usd(reserved),
                usd(b.usd)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");

    // The last hour.
    let history = console.sampler.history();
    out.push_str("<section aria-labelledby=\"hour\"><h2 id=\"hour\">The last hour</h2><div class=\"charts\">");
    out.push_str(&line_chart(
        "Throughput",
        "records/s",
        &[
            ("in (ingest)", "#1f5fa8", history.iter().map(|p| p.in_per_sec).collect()),
            ("out (published)", "#b35900", history.iter().map(|p| p.out_per_sec).collect()),
        ],
    ));
    out.push_str(&line_chart(
        "Spend",
        "USD/min",
        &[("LLM cost", "#2e7d32", history.iter().map(|p| p.usd_per_min).collect())],
    ));
    out.push_str("</div></section>");
    Ok(out)
}

/// Pause or resume, through the same function as the admin API's.
pub async fn kill_switch(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    let session = match act(&console, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let paused = match form.get("action") {
        Some("pause") => true,
        Some("resume") => false,
        _ => {
            return super::problem(
                Some(&session),
                axum::http::StatusCode::BAD_REQUEST,
                "Bad request",
                "pause or resume?",
            );
        }
    };
    let reason = paused.then(|| form.text("note").unwrap_or_else(|| "paused from the console".into()));
    match replay::set_paused(console.pool(), console.pipeline(), paused, reason.as_deref()).await {
        Ok(_) => {
            tracing::warn!(paused, reason = ?reason, "kill switch changed from the console");
            redirect("/ui")
        }
        Err(err) => internal(&session, err),
    }
}
