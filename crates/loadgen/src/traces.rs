//! A small OTLP trace receiver and viewer, for looking at one event's trace on a machine
//! without Docker or Jaeger (`loadgen traces`), and for the tests that check the spans.
//!
//! It implements the collector's gRPC `TraceService`, keeps the most recent spans in
//! memory, and serves them as text over HTTP: `/traces` lists recent traces, and
//! `/traces/{trace_id}` draws one as a tree (stage, span, kind, duration, attributes).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// A span as received, with the instrumentation scope (the stage) that made it.
#[derive(Debug, Clone)]
pub struct Received {
    pub scope: String,
    pub span: Span,
}

/// The spans received so far (the oldest dropped past `capacity`).
#[derive(Clone)]
pub struct Store {
    spans: Arc<Mutex<VecDeque<Received>>>,
    capacity: usize,
}

impl Store {
    pub fn new(capacity: usize) -> Self {
        Self { spans: Arc::new(Mutex::new(VecDeque::new())), capacity }
    }

    pub fn all(&self) -> Vec<Received> {
        self.spans.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn trace(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans
            .lock()
            .map(|s| s.iter().filter(|r| r.span.trace_id == trace_id).cloned().collect())
            .unwrap_or_default()
    }

    /// Keeps the spans of one OTLP export request (gRPC or HTTP/protobuf alike).
    pub fn ingest(&self, request: ExportTraceServiceRequest) {
        for resource in request.resource_spans {
            for scoped in resource.scope_spans {
                let scope = scoped.scope.map(|s| s.name).unwrap_or_default();
                self.push(scoped.spans.into_iter().map(|span| Received { scope: scope.clone(), span }));
            }
        }
    }

    fn push(&self, received: impl IntoIterator<Item = Received>) {
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
            while spans.len() > self.capacity {
                spans.pop_front();
            }
        }
    }
}

struct Receiver {
    store: Store,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.store.ingest(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Serves the OTLP gRPC receiver on `listener` until the task is dropped.
pub fn serve_otlp(listener: tokio::net::TcpListener, store: Store) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { store }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
        if let Err(e) = served {
            eprintln!("[traces] OTLP receiver stopped: {e}");
        }
    })
}

/// An attribute's value as text.
pub fn attr(span: &Span, key: &str) -> Option<String> {
    let v = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match v {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        _ => return None,
    })
}

fn kind(k: i32) -> &'static str {
    match k {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

/// One trace as an indented tree, children in start order.
pub fn render(spans: &[Received]) -> String {
    let Some(start) = spans.iter().map(|r| r.span.start_time_unix_nano).min() else {
        return "no spans for this trace (yet)\n".into();
    };
    let ids: std::collections::HashSet<&[u8]> = spans.iter().map(|r| r.span.span_id.as_slice()).collect();
    let mut children: BTreeMap<Vec<u8>, Vec<&Received>> = BTreeMap::new();
    let mut roots = Vec::new();
    for r in spans {
        if r.span.parent_span_id.is_empty() || !ids.contains(r.span.parent_span_id.as_slice()) {
            roots.push(r);
        } else {
            children.entry(r.span.parent_span_id.clone()).or_default().push(r);
        }
    }
    roots.sort_by_key(|r| r.span.start_time_unix_nano);
    for list in children.values_mut() {
        list.sort_by_key(|r| r.span.start_time_unix_nano);
    }
    let mut out = format!("trace {}  ({} spans)\n", hex(&spans[0].span.trace_id), spans.len());
    fn walk(out: &mut String, r: &Received, depth: usize, start: u64, children: &BTreeMap<Vec<u8>, Vec<&Received>>) {
        let s = &r.span;
        let at_ms = s.start_time_unix_nano.saturating_sub(start) as f64 / 1e6;
        let took_ms = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) as f64 / 1e6;
        let mut notes = Vec::new();
        for (key, label) in [
            ("enrich.idempotency_key", "key"),
            ("messaging.destination.partition.id", "partition"),
            ("messaging.kafka.offset", "offset"),
            ("enrich.attempt", "attempt"),
            ("gen_ai.usage.input_tokens", "tokens_in"),
            ("gen_ai.usage.output_tokens", "tokens_out"),
            ("enrich.cost_usd", "cost_usd"),
            ("enrich.outcome", "outcome"),
        ] {
            if let Some(v) = attr(s, key) {
                notes.push(format!("{label}={v}"));
            }
        }
        if let Some(status) = &s.status
            && status.code == 2
        {
            notes.push(format!("ERROR {}", status.message));
        }
        out.push_str(&format!(
            "{:>9.1} ms {:>8.1} ms  {}{} [{}] {}  {}\n",
            at_ms,
            took_ms,
            "  ".repeat(depth),
            s.name,
            kind(s.kind),
            r.scope,
            notes.join(" ")
        ));
        for child in children.get(&s.span_id).into_iter().flatten() {
            walk(out, child, depth + 1, start, children);
        }
    }
    out.push_str("    start   duration  span\n");
    for r in roots {
        walk(&mut out, r, 0, start, &children);
    }
    out
}

/// The most recent traces, newest first: id, spans, first span's name.
pub fn list(spans: &[Received], limit: usize) -> String {
    let mut traces: BTreeMap<Vec<u8>, (u64, usize, String)> = BTreeMap::new();
    for r in spans {
        let e = traces.entry(r.span.trace_id.clone()).or_insert((u64::MAX, 0, String::new()));
        e.1 += 1;
        if r.span.start_time_unix_nano < e.0 {
            e.0 = r.span.start_time_unix_nano;
            e.2 = format!("{} {}", r.scope, r.span.name);
        }
    }
    let mut rows: Vec<_> = traces.into_iter().collect();
    rows.sort_by_key(|(_, (start, _, _))| std::cmp::Reverse(*start));
    let mut out = format!("{:<32}  {:>5}  FIRST SPAN\n", "TRACE", "SPANS");
    for (id, (_, n, first)) in rows.into_iter().take(limit) {
        out.push_str(&format!("{}  {n:>5}  {first}\n", hex(&id)));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// `loadgen traces`: the receiver on `otlp`, the text views on `http`, until Ctrl-C.
pub async fn run(otlp: SocketAddr, http: SocketAddr) -> anyhow::Result<()> {
    use axum::extract::{Path, State};
    use axum::routing::get;
    let store = Store::new(200_000);
    let listener =
        tokio::net::TcpListener::bind(otlp).await.map_err(|e| anyhow::anyhow!("cannot listen on {otlp}: {e}"))?;
    let receiver = serve_otlp(listener, store.clone());
    let app = axum::Router::new()
        .route("/traces", get(|State(s): State<Store>| async move { list(&s.all(), 100) }))
        .route(
            "/traces/{id}",
            get(|State(s): State<Store>, Path(id): Path<String>| async move {
                match unhex(&id) {
                    Some(bytes) if bytes.len() == 16 => render(&s.trace(&bytes)),
                    _ => format!("{id:?} is not a trace id (32 hex digits)\n"),
                }
            }),
        )
        .with_state(store);
    let web = tokio::net::TcpListener::bind(http).await.map_err(|e| anyhow::anyhow!("cannot listen on {http}: {e}"))?;
    println!("[traces] OTLP gRPC on {otlp}: set OTEL_EXPORTER_OTLP_ENDPOINT=http://{otlp} on the stages");
    println!("[traces] views on http://{http}/traces and http://{http}/traces/<trace id>");
    axum::serve(web, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    receiver.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u8, parent: Option<u8>, name: &str, start: u64) -> Received {
        Received {
            scope: "s".into(),
            span: Span {
                trace_id: vec![7; 16],
                span_id: vec![id; 8],
                parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                name: name.into(),
                kind: 5,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 2_000_000,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_trace_is_drawn_as_a_tree_in_start_order() {
        let spans = vec![span(3, Some(1), "b", 30), span(1, None, "root", 10), span(2, Some(1), "a", 20)];
        let text = render(&spans);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("trace 07070707"));
        assert!(lines[2].contains("root [consumer] s"));
        assert!(lines[3].contains("  a [consumer]"));
        assert!(lines[4].contains("  b [consumer]"));
        assert_eq!(unhex(&hex(&[1, 171, 255])), Some(vec![1, 171, 255]));
    }
}
