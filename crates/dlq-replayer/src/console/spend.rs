//! Spend, from the audit (`step_outcomes`): cost per hour and per day, per model and per
//! prompt version; the calls that dedup, the stored results and the response cache saved,
//! and what they would have cost at the recent price per call.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use super::fresh::Fresh;
use super::html::{Nav, bar_chart, e, usd};
use super::{Console, internal, look, render};

/// A group's calls, tokens and cost.
type Row = (String, i64, i64, i64, i64, f64);

const PAID: &str = "step IN ('llm_call', 'llm_repair')";

/// The paid calls of the last `since` by `group` (an expression over `o`, the audit, and
/// with `join` `s`, the key's state), largest group first, at most 200.
async fn grouped(console: &Console, group: &str, since: &str, join: bool) -> sqlx::Result<Vec<Row>> {
    let from = if join {
        "step_outcomes o LEFT JOIN enrich_state s ON s.pipeline = o.pipeline AND s.idempotency_key = o.idempotency_key"
    } else {
        "step_outcomes o"
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {group} AS g, count(*)::int8, count(*) FILTER (WHERE o.status <> 'ok')::int8,
                coalesce(sum(o.input_tokens), 0)::int8, coalesce(sum(o.output_tokens), 0)::int8,
                coalesce(sum(o.cost_usd), 0)::float8
         FROM {from}
         WHERE o.pipeline = $1 AND o.{PAID} AND o.recorded_at > now() - interval '{since}'
         GROUP BY 1 ORDER BY 1 DESC LIMIT 200"
    )))
    .bind(console.pipeline())
    .fetch_all(console.pool())
    .await
}

fn table(out: &mut String, title: &str, first: &str, rows: &[Row]) {
    let _ = write!(
        out,
        "<h2>{}</h2><table><thead><tr><th scope=\"col\">{}</th><th scope=\"col\">calls</th><th scope=\"col\">failed</th>\
         <th scope=\"col\">tokens in</th><th scope=\"col\">tokens out</th><th scope=\"col\">cost</th></tr></thead><tbody>",
        e(title),
        e(first)
    );
    if rows.is_empty() {
        out.push_str("<tr><td colspan=\"6\" class=\"muted\">no calls</td></tr>");
    }
    for (g, calls, failed, tin, tout, cost) in rows {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{calls}</td><td>{failed}</td><td>{tin}</td><td>{tout}</td><td>{}</td></tr>",
            e(g),
            e(usd(*cost))
        );
    }
    out.push_str("</tbody></table>");
}

pub async fn page(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let session = match look(&console, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match Fresh::get(&console, |c| &c.spend, |c| async move { body(&c).await }).await {
        Ok((age, mut main)) => {
            let _ = write!(
                main,
                "<p class=\"muted\">Computed {:.0} s ago from the audit (at most every {} s).</p>",
                age.as_secs_f64(),
                TTL.as_secs()
            );
            render(&headers, &session, "Spend", Nav::Spend, None, &main)
        }
        Err(err) => internal(&session, err),
    }
}

/// How long the page's figures are shown before they are computed again: they read every
/// paid call of 30 days (1.5 s at 100 times the demo's data), so at most this often, by one
/// task whoever is looking, in the background ([`Fresh`]).
pub const TTL: Duration = Duration::from_secs(30);

async fn body(console: &Console) -> sqlx::Result<String> {
    // What was not paid for, over the same 30 days.
    let (pool, pipeline) = (console.pool(), console.pipeline());
    let runs = sqlx::query_as::<_, (String, String, i64)>(
        "SELECT stage, status, count(*) FROM run_history
         WHERE pipeline = $1 AND recorded_at > now() - interval '30 days'
           AND ((stage = 'ingest-dedup' AND status = 'duplicate') OR (stage = 'enricher' AND status = 'reused'))
         GROUP BY 1, 2",
    )
    .bind(pipeline)
    .fetch_all(pool);
    let cached = sqlx::query_as::<_, (i64, Option<f64>)>(
        "SELECT count(*) FILTER (WHERE step = 'cache_hit')::int8,
                (avg(cost_usd) FILTER (WHERE step IN ('llm_call', 'llm_repair') AND status = 'ok'))::float8
         FROM step_outcomes WHERE pipeline = $1 AND recorded_at > now() - interval '30 days'",
    )
    .bind(pipeline)
    .fetch_one(pool);
    // Every hour of the last 48, those without calls included (their cost is the hours' table's).
    let hours = sqlx::query_as::<_, (String,)>(
        "SELECT to_char(h AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00')
         FROM generate_series(date_trunc('hour', now()) - interval '47 hours', date_trunc('hour', now()), interval '1 hour') h
         ORDER BY h",
    )
    .fetch_all(pool);
    // The reads at once, each on its own connection: the page waits for the slowest.
    let hour = "to_char(date_trunc('hour', o.recorded_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD HH24:00')";
    let day = "to_char(date_trunc('day', o.recorded_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD')";
    let (hourly, daily, models, prompts, runs, (cache_hits, per_call), hours) = tokio::try_join!(
        grouped(console, hour, "48 hours", false),
        grouped(console, day, "30 days", false),
        grouped(console, "coalesce(o.model, '(none)')", "30 days", false),
        grouped(console, "coalesce(s.prompt_version, '(no result stored)')", "30 days", true),
        runs,
        cached,
        hours,
    )?;
    let by_hour: Vec<(String, f64)> = hours
        .into_iter()
        .map(|(h,)| {
            let cost = hourly.iter().find(|r| r.0 == h).map_or(0.0, |r| r.5);
            (h, cost)
        })
        .collect();
    let count = |stage: &str, status: &str| runs.iter().find(|r| r.0 == stage && r.1 == status).map_or(0, |r| r.2);
    let (duplicates, reused) = (count("ingest-dedup", "duplicate"), count("enricher", "reused"));
    let per_call = per_call.unwrap_or(0.0);

    let total: f64 = daily.iter().map(|r| r.5).sum();
    let calls: i64 = daily.iter().map(|r| r.1).sum();
    let mut out = format!(
        "<h1>Spend</h1><p>The last 30 days: <strong data-spend-total>{}</strong> over <span data-spend-calls>{calls}</span> calls \
         (average {} per answered call).</p>",
        e(usd(total)),
        e(usd(per_call))
    );
    let _ = write!(
        out,
        "<h2>Calls saved</h2><table><thead><tr><th scope=\"col\">by</th><th scope=\"col\">calls not made</th><th scope=\"col\">would have cost</th></tr></thead><tbody>\
         <tr><th scope=\"row\">dedup at ingest (duplicate records)</th><td data-saved=\"dedup\">{duplicates}</td><td>{}</td></tr>\
         <tr><th scope=\"row\">stored results re-emitted (redeliveries, replays)</th><td data-saved=\"reused\">{reused}</td><td>{}</td></tr>\
         <tr><th scope=\"row\">response cache</th><td data-saved=\"cache\">{cache_hits}</td><td>{}</td></tr></tbody></table>\
         <p class=\"muted\">At the average cost of an answered call over the same days.</p>",
        e(usd(duplicates as f64 * per_call)),
        e(usd(reused as f64 * per_call)),
        e(usd(cache_hits as f64 * per_call)),
    );
    out.push_str(&bar_chart("Cost per hour (UTC), the last 48 hours", "USD", &by_hour));
    table(&mut out, "Per hour (UTC), the last 48 hours", "hour", &hourly);
    table(&mut out, "Per day (UTC), the last 30 days", "day", &daily);
    table(&mut out, "Per model, the last 30 days", "model", &models);
    table(&mut out, "Per prompt version, the last 30 days", "prompt version", &prompts);
    Ok(out)
}
