//! OpenTelemetry spans for records, with the semantic conventions' attributes: one
//! CONSUMER `process` span per record and stage, whose parent is the context in the
//! record's `traceparent` (also recorded as a link), and child spans for the steps (the
//! dedup claim, the LLM call, each produce). A PRODUCER span's context is what goes into
//! the outgoing record's headers, so the next stage's span is its child.
//!
//! The spans go to the global tracer provider (see `telemetry`); without one they are
//! no-ops, and the ids written to records and the audit still chain (a child of the
//! incoming context, or a new trace).

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};
use rdkafka::Message;
use std::borrow::Cow;

use crate::TraceContext;

/// Attribute names used across stages.
pub mod attr {
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    pub const MESSAGING_OPERATION_NAME: &str = "messaging.operation.name";
    pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";
    pub const MESSAGING_DESTINATION: &str = "messaging.destination.name";
    pub const MESSAGING_PARTITION: &str = "messaging.destination.partition.id";
    pub const MESSAGING_OFFSET: &str = "messaging.kafka.offset";
    pub const MESSAGING_GROUP: &str = "messaging.consumer.group.name";
    pub const MESSAGING_KEY: &str = "messaging.kafka.message.key";
    pub const GEN_AI_OPERATION: &str = "gen_ai.operation.name";
    pub const GEN_AI_PROVIDER: &str = "gen_ai.provider.name";
    pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const GEN_AI_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const GEN_AI_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const GEN_AI_INPUT_MESSAGES: &str = "gen_ai.input.messages";
    pub const GEN_AI_OUTPUT_MESSAGES: &str = "gen_ai.output.messages";
    pub const IDEMPOTENCY_KEY: &str = "enrich.idempotency_key";
    pub const ATTEMPT: &str = "enrich.attempt";
    pub const COST_USD: &str = "enrich.cost_usd";
    pub const OUTCOME: &str = "enrich.outcome";
}

/// The span of one record in one stage.
pub struct RecordSpan {
    tracer: &'static str,
    cx: Context,
    ids: TraceContext,
}

impl RecordSpan {
    /// A CONSUMER `process` span for a record read from Kafka by `stage` in `group`.
    pub fn consume<M: Message>(stage: &'static str, group: &str, message: &M, incoming: Option<&TraceContext>) -> Self {
        let mut attrs = vec![
            KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
            KeyValue::new(attr::MESSAGING_OPERATION_NAME, "process"),
            KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "process"),
            KeyValue::new(attr::MESSAGING_DESTINATION, message.topic().to_string()),
            KeyValue::new(attr::MESSAGING_PARTITION, message.partition().to_string()),
            KeyValue::new(attr::MESSAGING_OFFSET, message.offset()),
            KeyValue::new(attr::MESSAGING_GROUP, group.to_string()),
        ];
        if let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
            attrs.push(KeyValue::new(attr::MESSAGING_KEY, key.to_string()));
        }
        Self::start(stage, format!("process {}", message.topic()), SpanKind::Consumer, incoming, attrs)
    }

    /// A span for work that continues a record's trace outside a consumer (a parked
    /// record released, a replay).
    pub fn resume(
        stage: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        incoming: Option<&TraceContext>,
    ) -> Self {
        Self::start(stage, name, kind, incoming, Vec::new())
    }

    fn start(
        stage: &'static str,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        incoming: Option<&TraceContext>,
        attrs: Vec<KeyValue>,
    ) -> Self {
        let tracer = global::tracer(stage);
        let parent = match incoming {
            Some(t) => Context::new().with_remote_span_context(to_otel(t, true)),
            None => Context::new(),
        };
        let mut builder = tracer.span_builder(name).with_kind(kind).with_attributes(attrs);
        if let Some(t) = incoming {
            builder = builder.with_links(vec![Link::with_context(to_otel(t, true))]);
        }
        let span = tracer.build_with_context(builder, &parent);
        let ids = ids_of(span.span_context(), incoming);
        Self { tracer: stage, cx: parent.with_span(span), ids }
    }

    /// This span's context: its trace id goes to the audit and the logs.
    pub fn ids(&self) -> &TraceContext {
        &self.ids
    }

    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes);
    }

    pub fn fail(&self, message: impl Into<Cow<'static, str>>) {
        self.cx.span().set_status(Status::error(message));
    }

    /// A child span (INTERNAL for a step, CLIENT for a call).
    pub fn child(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind, attrs: Vec<KeyValue>) -> ChildSpan {
        let tracer = global::tracer(self.tracer);
        let span =
            tracer.build_with_context(tracer.span_builder(name).with_kind(kind).with_attributes(attrs), &self.cx);
        let ids = ids_of(span.span_context(), Some(&self.ids));
        ChildSpan { span, ids }
    }

    /// A PRODUCER span for writing to `topic`: inject its `ids()` into the record.
    pub fn producer(&self, topic: &str) -> ChildSpan {
        self.child(
            format!("send {topic}"),
            SpanKind::Producer,
            vec![
                KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
                KeyValue::new(attr::MESSAGING_OPERATION_NAME, "send"),
                KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "send"),
                KeyValue::new(attr::MESSAGING_DESTINATION, topic.to_string()),
            ],
        )
    }

    /// A `tracing` span carrying this span's ids, so every log line written inside it
    /// has `trace_id` and `span_id`.
    pub fn log_span(&self) -> tracing::Span {
        tracing::info_span!("record", trace_id = %self.ids.trace_id_hex(), span_id = %hex::encode(self.ids.span_id))
    }
}

impl Drop for RecordSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// A step's span; ends when dropped.
pub struct ChildSpan {
    span: global::BoxedSpan,
    ids: TraceContext,
}

impl ChildSpan {
    pub fn ids(&self) -> &TraceContext {
        &self.ids
    }

    pub fn set(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.span.set_attributes(attributes);
    }

    pub fn fail(&mut self, message: impl Into<Cow<'static, str>>) {
        self.span.set_status(Status::error(message));
    }

    pub fn log_span(&self) -> tracing::Span {
        tracing::info_span!("step", trace_id = %self.ids.trace_id_hex(), span_id = %hex::encode(self.ids.span_id))
    }
}

impl Drop for ChildSpan {
    fn drop(&mut self) {
        self.span.end();
    }
}

fn to_otel(t: &TraceContext, remote: bool) -> SpanContext {
    let state = t.tracestate.as_deref().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.span_id),
        TraceFlags::new(t.flags),
        remote,
        state,
    )
}

/// The span's ids as a W3C context; when there is no real span (no tracer provider),
/// a child of the parent, or a new trace.
fn ids_of(sc: &SpanContext, parent: Option<&TraceContext>) -> TraceContext {
    let tracestate = parent.and_then(|p| p.tracestate.clone());
    let own_span = sc.is_valid() && parent.is_none_or(|p| sc.span_id().to_bytes() != p.span_id);
    if own_span {
        TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
            tracestate,
        }
    } else {
        parent.map(TraceContext::child).unwrap_or_else(TraceContext::new_root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;

    #[test]
    fn without_a_provider_ids_still_chain() {
        let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None).unwrap();
        let m = OwnedMessage::new(None, None, "t".into(), rdkafka::Timestamp::NotAvailable, 0, 5, None);
        let span = RecordSpan::consume("test", "g", &m, Some(&incoming));
        assert_eq!(span.ids().trace_id, incoming.trace_id, "same trace");
        assert_ne!(span.ids().span_id, incoming.span_id, "a span of its own");
        let send = span.producer("out");
        assert_eq!(send.ids().trace_id, incoming.trace_id);
        assert_ne!(send.ids().span_id, span.ids().span_id);
        let root = RecordSpan::consume("test", "g", &m, None);
        assert_ne!(root.ids().trace_id, incoming.trace_id, "no context: a new trace");
    }
}
