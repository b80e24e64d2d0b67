//! The admin API over gRPC (service `enrichment.admin.v1.DeadLetters`, defined in
//! proto/enrichment/admin/v1/dead_letters.proto): the same operations, rules and tokens
//! as the HTTP API.

use std::sync::Arc;
use tonic::{Request, Response, Status};

use crate::access::Reader;
use crate::api::Api;
use crate::replay::{self, Filter, Page};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("enrichment.admin.v1");
}

pub use pb::dead_letters_client::DeadLettersClient;
use pb::dead_letters_server::{DeadLetters, DeadLettersServer};

pub struct Service {
    api: Arc<Api>,
}

pub fn service(api: Arc<Api>) -> DeadLettersServer<Service> {
    DeadLettersServer::new(Service { api })
}

impl Service {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.api.access.admin(authorization(request)).map_err(Status::unauthenticated)
    }

    fn reader<T>(&self, request: &Request<T>) -> Result<Reader, Status> {
        self.api.access.read(authorization(request)).map_err(Status::unauthenticated)
    }

    fn pipeline(&self) -> &str {
        &self.api.replayer.settings.pipeline.name
    }
}

fn authorization<T>(request: &Request<T>) -> Option<&str> {
    request.metadata().get("authorization").and_then(|v| v.to_str().ok())
}

fn filter(f: Option<pb::Filter>) -> Filter {
    let f = f.unwrap_or_default();
    Filter {
        ids: (!f.ids.is_empty()).then_some(f.ids),
        reason: f.reason,
        stage: f.stage,
        key: f.idempotency_key,
        from: f.from,
        to: f.to,
        text: None,
    }
}

fn dead_letter(d: replay::DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: d.id,
        idempotency_key: d.idempotency_key,
        stage: d.stage,
        reason_class: d.reason_class,
        reason: d.reason,
        error: d.error,
        attempts: d.attempts,
        source_topic: d.source_topic.unwrap_or_default(),
        source_partition: d.source_partition.unwrap_or_default(),
        source_offset: d.source_offset.unwrap_or_default(),
        trace_id: d.trace_id.unwrap_or_default(),
        status: d.status,
        created_at: d.created_at,
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl DeadLetters for Service {
    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.reader(&request)?;
        let r = request.into_inner();
        let status = if r.status.is_empty() { "dead".to_string() } else { r.status };
        let limit = if r.limit <= 0 { 50 } else { i64::from(r.limit).min(1000) };
        let items =
            replay::list(&self.api.replayer.pool, self.pipeline(), &status, &filter(r.filter), r.after_id, limit)
                .await
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let next_after_id = if items.len() as i64 == limit { items.last().map(|d| d.id) } else { None };
        Ok(Response::new(pb::ListResponse { items: items.into_iter().map(dead_letter).collect(), next_after_id }))
    }

    async fn show(&self, request: Request<pb::ShowRequest>) -> Result<Response<pb::ShowResponse>, Status> {
        let with_payload = self.reader(&request)? == Reader::Authenticated;
        let r = request.into_inner();
        let id = r.id;
        let limit = if r.limit <= 0 { Page::default().limit } else { i64::from(r.limit) };
        let page = Page { limit, runs_after: r.runs_after_id, steps_after: r.steps_after_id };
        let shown = replay::show(&self.api.replayer.pool, self.pipeline(), id, page, with_payload)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no dead letter {id}")))?;
        Ok(Response::new(pb::ShowResponse {
            dead_letter: Some(dead_letter(shown.dead_letter)),
            payload: shown.payload.map(String::into_bytes).unwrap_or_default(),
            payload_withheld: shown.payload_withheld,
            next_runs_after_id: shown.next_runs_after,
            next_steps_after_id: shown.next_steps_after,
            runs: shown
                .runs
                .into_iter()
                .map(|r| pb::Run {
                    stage: r.stage,
                    attempt: r.attempt,
                    status: r.status,
                    detail: r.detail.unwrap_or_default(),
                    worker: r.worker.unwrap_or_default(),
                    at: r.at,
                })
                .collect(),
            steps: shown
                .steps
                .into_iter()
                .map(|s| pb::Step {
                    step: s.step,
                    attempt: s.attempt,
                    status: s.status,
                    duration_ms: s.duration_ms,
                    input_tokens: s.input_tokens,
                    output_tokens: s.output_tokens,
                    error: s.error.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn replay(&self, request: Request<pb::ReplayRequest>) -> Result<Response<pb::ReplayResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let f = filter(r.filter);
        if f.is_empty() {
            return Err(Status::invalid_argument("give ids or a filter (reason, stage, idempotency_key, from, to)"));
        }
        let note = (!r.note.is_empty()).then_some(r.note);
        // In a task of its own: the request timeout or a client leaving never cuts a replay
        // between producing a record and marking it replayed.
        let (replayer, filter, why) = (self.api.replayer.clone(), f.clone(), note.clone());
        let outcome = tokio::spawn(async move { replayer.replay(&filter, r.dry_run, why.as_deref()).await })
            .await
            .map_err(internal)?
            .map_err(internal)?;
        tracing::info!(dry_run = r.dry_run, matched = outcome.matched, replayed = outcome.replayed.len(), refused = outcome.refused.len(), note = ?note, "replay (gRPC)");
        Ok(Response::new(pb::ReplayResponse {
            dry_run: outcome.dry_run,
            matched: outcome.matched as u64,
            replayed: outcome.replayed,
            refused: outcome
                .refused
                .into_iter()
                .map(|x| pb::Refused { id: x.id, idempotency_key: x.idempotency_key, why: x.why })
                .collect(),
        }))
    }

    async fn discard(&self, request: Request<pb::DiscardRequest>) -> Result<Response<pb::DiscardResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let note = (!r.note.is_empty()).then_some(r.note);
        if self.api.replayer.discard(r.id, note.as_deref()).await.map_err(internal)? {
            Ok(Response::new(pb::DiscardResponse { discarded: true }))
        } else {
            Err(Status::not_found(format!("no dead letter {} waiting", r.id)))
        }
    }
}
