//! The admin HTTP API (under `/v1`, beside `/healthz`, `/readyz`, `/metrics`). Reads need
//! `Authorization: Bearer <read or admin token>` (open, without payloads, when no token is
//! configured: see `access`); every mutating call needs the admin token. A key's history
//! and a dead letter's are paged (`limit`, `runs_after`, `steps_after`).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use crate::access::{Access, Reader};
use crate::replay::{self, Filter, Page, Replayer};

pub struct Api {
    pub replayer: Arc<Replayer>,
    pub access: Access,
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
    text: Option<String>,
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

/// A replay's body is its filter's fields beside these (read twice from the one JSON
/// object: serde's `flatten` cannot read numbers that keep their literal text).
#[derive(Deserialize)]
struct ReplayOptions {
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

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok())
}

fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
    api.access.admin(authorization(headers)).map_err(|why| Box::new(error(StatusCode::UNAUTHORIZED, why)))
}

fn reader(api: &Api, headers: &HeaderMap) -> Result<Reader, Box<Response>> {
    api.access.read(authorization(headers)).map_err(|why| Box::new(error(StatusCode::UNAUTHORIZED, why)))
}

async fn list(State(api): State<Arc<Api>>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Err(r) = reader(&api, &headers) {
        return *r;
    }
    let filter =
        Filter { ids: None, reason: q.reason, stage: q.stage, key: q.key, from: q.from, to: q.to, text: q.text };
    let pipeline = &api.replayer.settings.pipeline.name;
    match replay::list(&api.replayer.pool, pipeline, &q.status, &filter, q.after_id, q.limit.clamp(1, 1000)).await {
        Ok(items) => {
            let next = if items.len() as i64 == q.limit { items.last().map(|d| d.id) } else { None };
            Json(json!({"items": items, "next_after_id": next})).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn show(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(page): Query<Page>,
) -> Response {
    let who = match reader(&api, &headers) {
        Ok(who) => who,
        Err(r) => return *r,
    };
    let with_payload = who == Reader::Authenticated;
    match replay::show(&api.replayer.pool, &api.replayer.settings.pipeline.name, id, page, with_payload).await {
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
async fn enrichment_state(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Err(r) = reader(&api, &headers) {
        return *r;
    }
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
async fn history(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    if let Err(r) = reader(&api, &headers) {
        return *r;
    }
    match replay::history(&api.replayer.pool, &api.replayer.settings.pipeline.name, &key, page).await {
        Ok(Some(h)) => Json(h).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "nothing is known of this key"),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn replay(State(api): State<Arc<Api>>, headers: HeaderMap, Json(body): Json<serde_json::Value>) -> Response {
    if let Err(r) = authorized(&api, &headers) {
        return *r;
    }
    let parsed = serde_json::from_value::<Filter>(body.clone())
        .and_then(|f| serde_json::from_value::<ReplayOptions>(body).map(|o| (f, o)));
    let (filter, req) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the replay request: {e}")),
    };
    let f = &filter;
    if f.is_empty() {
        return error(StatusCode::BAD_REQUEST, "give ids or a filter (reason, stage, key, from, to, text)");
    }
    // In a task of its own: a client that stops waiting (or the request timeout) never
    // cuts a replay between producing a record and marking it replayed.
    let (replayer, filter, note) = (api.replayer.clone(), f.clone(), req.note.clone());
    let run = tokio::spawn(async move { replayer.replay(&filter, req.dry_run, note.as_deref()).await });
    let done = match run.await {
        Ok(done) => done,
        Err(e) => Err(anyhow::anyhow!("the replay task failed: {e}")),
    };
    match done {
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
