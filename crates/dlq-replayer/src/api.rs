//! The admin HTTP API (under `/v1`, beside `/healthz`, `/readyz`, `/metrics`). Reads are
//! open; every mutating call needs `Authorization: Bearer <dlq_replayer.admin_token>`.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use crate::replay::{self, Filter, Replayer};

pub struct Api {
    pub replayer: Replayer,
    pub token: Option<String>,
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default = "default_status")]
    status: String,
    reason: Option<String>,
    stage: Option<String>,
    key: Option<String>,
    from: Option<String>,
    to: Option<String>,
    #[serde(default)]
    after_id: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_status() -> String {
    "dead".into()
}
fn default_limit() -> i64 {
    50
}

#[derive(Deserialize)]
struct ReplayRequest {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    dry_run: bool,
    note: Option<String>,
}

#[derive(Deserialize, Default)]
struct DiscardRequest {
    note: Option<String>,
}

pub fn routes(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/{id}", get(show))
        .route("/v1/dead-letters/{id}/discard", post(discard))
        .route("/v1/replay", post(replay))
        .route("/v1/messages/{key}", get(history))
        .route("/v1/enrichment", get(enrichment_state))
        .route("/v1/enrichment/pause", post(pause))
        .route("/v1/enrichment/resume", post(resume))
        .with_state(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    check_bearer(api.token.as_deref(), given).map_err(|why| Box::new(error(StatusCode::UNAUTHORIZED, why)))
}

/// Checks an `Authorization` value against the configured token (HTTP and gRPC alike).
pub fn check_bearer(token: Option<&str>, authorization: Option<&str>) -> Result<(), &'static str> {
    let Some(token) = token else {
        return Err("no admin token is configured (dlq_replayer.admin_token)");
    };
    match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err("missing or wrong bearer token"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list(State(api): State<Arc<Api>>, Query(q): Query<ListQuery>) -> Response {
    let filter = Filter { ids: None, reason: q.reason, stage: q.stage, key: q.key, from: q.from, to: q.to };
    let pipeline = &api.replayer.settings.pipeline.name;
    match replay::list(&api.replayer.pool, pipeline, &q.status, &filter, q.after_id, q.limit.clamp(1, 1000)).await {
        Ok(items) => {
            let next = if items.len() as i64 == q.limit { items.last().map(|d| d.id) } else { None };
            Json(json!({"items": items, "next_after_id": next})).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn show(State(api): State<Arc<Api>>, Path(id): Path<i64>) -> Response {
    match replay::show(&api.replayer.pool, &api.replayer.settings.pipeline.name, id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no dead letter {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

#[derive(Deserialize, Default)]
struct PauseRequest {
    reason: Option<String>,
}

/// The kill switch: whether enrichment is paused, why, since when.
async fn enrichment_state(State(api): State<Arc<Api>>) -> Response {
    match crate::replay::control(&api.replayer.pool, &api.replayer.settings.pipeline.name).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Pauses every enricher replica of the pipeline (within a second or two).
async fn pause(State(api): State<Arc<Api>>, headers: HeaderMap, body: Option<Json<PauseRequest>>) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let reason = body.and_then(|Json(b)| b.reason).unwrap_or_else(|| "paused through the admin API".into());
    set_paused(&api, true, Some(reason)).await
}

async fn resume(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    set_paused(&api, false, None).await
}

async fn set_paused(api: &Api, paused: bool, reason: Option<String>) -> Response {
    let pipeline = &api.replayer.settings.pipeline.name;
    match crate::replay::set_paused(&api.replayer.pool, pipeline, paused, reason.as_deref()).await {
        Ok(c) => {
            tracing::warn!(paused, reason = ?reason, "kill switch changed");
            Json(c).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// The whole timeline of one idempotency key across stages, with its trace ids.
async fn history(State(api): State<Arc<Api>>, Path(key): Path<String>) -> Response {
    match replay::history(&api.replayer.pool, &api.replayer.settings.pipeline.name, &key).await {
        Ok(Some(h)) => Json(h).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("nothing is known of key {key}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn replay(State(api): State<Arc<Api>>, headers: HeaderMap, Json(req): Json<ReplayRequest>) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let f = &req.filter;
    if f.is_empty() {
        return error(StatusCode::BAD_REQUEST, "give ids or a filter (reason, stage, key, from, to)");
    }
    match api.replayer.replay(f, req.dry_run, req.note.as_deref()).await {
        Ok(outcome) => {
            tracing::info!(dry_run = req.dry_run, matched = outcome.matched, replayed = outcome.replayed.len(), refused = outcome.refused.len(), note = ?req.note, "replay");
            Json(outcome).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn discard(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Option<Json<DiscardRequest>>,
) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let note = body.and_then(|Json(b)| b.note);
    match api.replayer.discard(id, note.as_deref()).await {
        Ok(true) => Json(json!({"discarded": id})).into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no dead letter {id} waiting")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}
