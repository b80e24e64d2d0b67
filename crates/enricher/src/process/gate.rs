//! The record's way to its attempt: one record per key in this process, its turn behind
//! an earlier record of its Kafka key (`strict-key`), the operator's pause, the LLM
//! breaker, then the key's lease and attempt, or what the key's state says instead.

use enrich_common::ErrorClass;
use enrich_common::envelope::Envelope;
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use enrich_common::http::Condition;
use enrich_common::spans::RecordSpan;
use std::time::Duration;

use super::{Enricher, Handled, KeyGuard, Run};
use crate::breaker::{Admission, Transition};
use crate::store::KeyState;
use crate::strict::BlockCheck;

/// What the gate decided for this round of the record.
pub(super) enum Admit {
    /// The lease is taken and attempt `attempt` counted: run it.
    Run { attempt: i32, admission: Admission },
    /// The record is handled without a call (its key ended, was reused, or waits).
    Done(Handled),
    /// Ask again (the key was adopted, is leased elsewhere, or is to run in isolation).
    Again,
}

impl Enricher {
    /// Waits until no other record of `key` runs in this process (two requests for one
    /// key can arrive under different Kafka keys, e.g. after a replay).
    pub(super) async fn enter_key(&self, key: &str) -> anyhow::Result<KeyGuard<'_>> {
        loop {
            if let Some(guard) = KeyGuard::enter(&self.keys_in_progress, key) {
                return Ok(guard);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} is in progress here"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// `strict-key`: whether the record holds its Kafka key's block (`Some(true)`), runs
    /// freely (`Some(false)`), or was parked behind an earlier record (`None`).
    pub(super) async fn take_turn(
        &self,
        record_key: &[u8],
        envelope: &Envelope,
        span: &RecordSpan,
    ) -> anyhow::Result<Option<bool>> {
        let Some(blocks) = &self.strict else { return Ok(Some(false)) };
        match blocks.check(record_key, envelope, &span.ids().traceparent()).await? {
            BlockCheck::Free => Ok(Some(false)),
            BlockCheck::Own => Ok(Some(true)),
            BlockCheck::Parked { blocker } => {
                let why = format!("parked behind {blocker} (ordering = strict-key)");
                self.store.record_run(envelope, 0, "parked", &span.ids().trace_id_hex(), Some(&why)).await?;
                self.metrics.parked.inc();
                self.metrics.outcome("parked");
                tracing::info!(idempotency_key = %envelope.idempotency_key, %blocker, "parked behind an earlier record of its key");
                Ok(None)
            }
        }
    }

    /// One round of the gate: the pause, the breaker, then the key's lease.
    pub(super) async fn admit_record<'a>(
        &'a self,
        envelope: &Envelope,
        record_key: &[u8],
        span: &RecordSpan,
        run: &mut Run<'a>,
    ) -> anyhow::Result<Admit> {
        let key = &envelope.idempotency_key;
        // No call starts while the operator has paused enrichment.
        if !self.kill_switch.wait_open(&self.shutdown).await {
            anyhow::bail!("shutting down while enrichment is paused");
        }
        // No call starts while the endpoint's breaker is open: the record waits here,
        // before its attempt is counted.
        let Some(admission) = self.breaker.admit(&self.shutdown).await else {
            anyhow::bail!("shutting down while the LLM breaker is open");
        };
        let state = match self.store.acquire(envelope, run.isolated.is_some()).await {
            Ok(state) => state,
            Err(e) => {
                self.breaker.unused(admission);
                return Err(e);
            }
        };
        if let KeyState::Acquired { attempt } = state {
            run.tries += 1;
            return Ok(Admit::Run { attempt, admission });
        }
        self.breaker.unused(admission);
        match state {
            KeyState::Suspect => {
                // The previous attempt died with its process. Run this record alone, so if
                // it is the one that crashes the process, it is the only one charged.
                if run.isolated.is_none() {
                    tracing::warn!(idempotency_key = %key, "previous attempt never finished: retrying it in isolation");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} waits to run in isolation"),
                        permit = self.isolation.acquire() => run.isolated = Some(permit.map_err(anyhow::Error::from)?),
                    }
                }
                Ok(Admit::Again)
            }
            KeyState::Published => {
                // Its output is committed: a copy on the results topic would only be
                // refused by the publisher.
                tracing::debug!(idempotency_key = %key, "already published; nothing to emit");
                self.store.record_run(envelope, 0, "already_published", &span.ids().trace_id_hex(), None).await?;
                self.metrics.outcome("already_published");
                Ok(Admit::Done(Handled::AlreadyPublished))
            }
            KeyState::Enriched(stored) => {
                if let Some(handled) = self.emit(envelope, record_key, &stored, super::Answer::default(), span).await? {
                    return Ok(Admit::Done(handled));
                }
                self.store.record_run(envelope, 0, "reused", &span.ids().trace_id_hex(), None).await?;
                self.metrics.outcome("reused");
                Ok(Admit::Done(Handled::Reused))
            }
            KeyState::DeadLettered => {
                if self.finish_pending_dead_letter(envelope, record_key).await? {
                    return Ok(Admit::Done(Handled::DeadLettered));
                }
                tracing::debug!(idempotency_key = %key, "already dead-lettered; skipping");
                Ok(Admit::Done(Handled::Skipped))
            }
            KeyState::AttemptsExhausted { attempts } => {
                let err = RecordError::new(
                    ErrorClass::Permanent,
                    Reason::MaxAttempts,
                    format!("{attempts} attempts already made (llm.max_attempts); not calling again"),
                );
                Ok(Admit::Done(self.give_up(envelope.clone(), record_key, &err, attempts, span).await?))
            }
            KeyState::Leased { remaining } => {
                // Another live replica is calling the LLM for this key: wait for it,
                // without holding the isolation permit meanwhile.
                run.isolated = None;
                let wait = remaining.min(Duration::from_secs(5));
                tokio::select! {
                    _ = self.shutdown.cancelled() => anyhow::bail!("shutting down while {key} is leased elsewhere"),
                    _ = tokio::time::sleep(wait) => Ok(Admit::Again),
                }
            }
            KeyState::Adopted | KeyState::Acquired { .. } => Ok(Admit::Again),
        }
    }

    pub(super) fn breaker_success(&self, admission: Admission) {
        if self.breaker.success(admission) == Some(Transition::Closed) {
            tracing::info!("LLM circuit breaker closed: the endpoint answers again; consumption resumes");
            self.metrics.breaker_open.set(0);
            self.state.set_condition(Condition::LlmBreaker, None);
        }
    }

    pub(super) fn breaker_failure(&self, admission: Admission, error: &RecordError) {
        if self.breaker.failure(admission) == Some(Transition::Opened) {
            tracing::error!(error = %error, "LLM circuit breaker opened: calls paused, offsets kept, nothing dead-lettered");
            self.metrics.breaker_open.set(1);
            self.state
                .set_condition(Condition::LlmBreaker, Some(format!("LLM circuit breaker open; last error: {error}")));
        }
    }
}
