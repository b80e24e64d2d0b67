//! Logs and traces.
//!
//! Logs: JSON lines on stdout, filtered by `RUST_LOG` (default `info`). A line written
//! inside a record's span carries that span's `trace_id` and `span_id` as top-level
//! fields.
//!
//! Traces: spans (see `spans`) are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: gRPC by default,
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf` for HTTP. `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` are
//! read as the specification says. `OTEL_TRACES_EXPORTER=none` turns export off. The
//! exporter's own HTTP/gRPC traffic is not traced (spans come only from the product's
//! code, never from the client libraries). Spans are flushed on shutdown.

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How spans leave the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceExport {
    pub endpoint: String,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl TraceExport {
    /// From the standard `OTEL_*` variables; None when no endpoint is set or export is off.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_TRACES_EXPORTER").is_some_and(|e| e.trim() == "none") {
            return Ok(None);
        }
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(None);
        };
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("grpc") => Protocol::Grpc,
            Some("http/protobuf") => Protocol::HttpProtobuf,
            Some(other) => {
                anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL: {other:?} is not supported (use grpc or http/protobuf)")
            }
        };
        Ok(Some(Self { endpoint, protocol }))
    }
}

/// Keeps the tracer provider; `shutdown` flushes the spans still buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans buffered so far (blocks until the exporter answered).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "spans not flushed");
        }
    }

    /// Exports what is still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "spans not flushed at shutdown");
        }
    }
}

/// Installs the JSON log subscriber (once; later calls are no-ops) and the global tracer
/// provider, exporting as the `OTEL_*` variables say. Call inside the tokio runtime.
pub fn init(service: &str) -> anyhow::Result<Telemetry> {
    init_logs(service);
    let export = TraceExport::from_env()?;
    let telemetry = install_tracer(service, export.as_slice())?;
    match &export {
        Some(e) => tracing::info!(endpoint = %e.endpoint, protocol = ?e.protocol, "exporting traces over OTLP"),
        None => {
            tracing::info!("no OTEL_EXPORTER_OTLP_ENDPOINT: spans are not exported (trace context still propagates)")
        }
    }
    Ok(telemetry)
}

/// Installs the global tracer provider (sampler from `OTEL_TRACES_SAMPLER`, resource
/// from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, `service` when unnamed), every
/// span going to each of `exports` (a service has at most one; a test may have several).
pub fn install_tracer(service: &str, exports: &[TraceExport]) -> anyhow::Result<Telemetry> {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty());
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(service.to_string());
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    for e in exports {
        builder = builder.with_batch_exporter(span_exporter(e)?);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Telemetry { provider })
}

/// The OTLP span exporter `export` describes.
///
/// The HTTP exporter sends from the batch processor's own thread with a blocking client.
/// That client owns a small runtime of its own, which tokio refuses to build or drop on a
/// runtime thread (it panicked at every stage's start), so it is built on a plain thread.
pub fn span_exporter(export: &TraceExport) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    Ok(match export.protocol {
        Protocol::Grpc => {
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(export.endpoint.clone()).build()?
        }
        Protocol::HttpProtobuf => {
            // The collector's HTTP path for traces, unless the endpoint names one.
            let base = export.endpoint.trim_end_matches('/');
            let url = if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
            // reqwest is built without a bundled crypto provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = std::thread::spawn(|| reqwest::blocking::Client::builder().build())
                .join()
                .map_err(|_| anyhow::anyhow!("the OTLP HTTP client could not be built"))??;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(url)
                .build()?
        }
    })
}

/// Installs the JSON log subscriber once; later calls (tests) are no-ops.
pub fn init_logs(service: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn,hyper=warn"));
    let installed = Registry::default()
        .with(filter)
        .with(TraceIdLayer)
        .with(tracing_subscriber::fmt::layer().event_format(JsonLines))
        .try_init()
        .is_ok();
    if installed {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}

/// The trace ids a span was created with (fields `trace_id` and `span_id`).
struct TraceIds {
    trace_id: String,
    span_id: String,
}

#[derive(Default)]
struct IdVisitor {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for IdVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "trace_id" => self.trace_id = Some(format!("{value:?}")),
            "span_id" => self.span_id = Some(format!("{value:?}")),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }
}

/// Remembers the ids of spans that carry them, for the log lines written inside.
struct TraceIdLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = IdVisitor::default();
        attrs.record(&mut ids);
        if let (Some(trace_id), Some(span_id), Some(span)) = (ids.trace_id, ids.span_id, ctx.span(id)) {
            span.extensions_mut().insert(TraceIds { trace_id, span_id });
        }
    }
}

/// The event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_string(), serde_json::Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), serde_json::Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
}

/// One JSON object per line: timestamp, level, target, the event's fields, and the
/// innermost enclosing record span's `trace_id` / `span_id`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonVisitor(&mut line));
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                if let Some(ids) = span.extensions().get::<TraceIds>() {
                    line.insert("trace_id".into(), ids.trace_id.clone().into());
                    line.insert("span_id".into(), ids.span_id.clone().into());
                    break;
                }
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_inside_a_record_span_carry_its_ids() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = Registry::default()
            .with(TraceIdLayer)
            .with(tracing_subscriber::fmt::layer().event_format(JsonLines).with_writer(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(n = 1, "outside");
            let span = tracing::info_span!(
                "record",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
                span_id = "00f067aa0ba902b7"
            );
            let _g = span.enter();
            let inner = tracing::info_span!("detail", other = 3);
            let _i = inner.enter();
            tracing::warn!(key = "k", "inside");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["message"], "inside");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["key"], "k");
        assert_eq!(lines[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(lines[1]["span_id"], "00f067aa0ba902b7");
    }
}
