//! W3C Trace Context (`traceparent`, `tracestate`) carried as Kafka headers, so any
//! Kafka tool sees them and every hop of an event stays in one trace.

use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};

use crate::headers::{TRACEPARENT, TRACESTATE, find};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The span that wrote the record (the parent of whatever reads it).
    pub span_id: [u8; 8],
    pub flags: u8,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Starts a new trace (sampled), for a source record that carried none.
    pub fn new_root() -> Self {
        let mut trace_id: [u8; 16] = rand::random();
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        Self { trace_id, span_id: new_span_id(), flags: 0x01, tracestate: None }
    }

    /// The same trace with a new span: what a stage writes on the records it produces.
    pub fn child(&self) -> Self {
        Self { span_id: new_span_id(), ..self.clone() }
    }

    /// Parses a `traceparent` value (version 00, or a later version read as 00 as the
    /// specification asks). Returns None for anything invalid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim();
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        if version == "00" && parts.len() != 4 {
            return None;
        }
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !(is_lower_hex(trace) && is_lower_hex(span) && is_lower_hex(flags)) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let tracestate =
            tracestate.map(str::trim).filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_BYTES).map(str::to_string);
        Some(Self { trace_id, span_id, flags, tracestate })
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(self.span_id), self.flags)
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Reads the context from record headers.
    pub fn extract(headers: &[(String, Option<Vec<u8>>)]) -> Option<Self> {
        Self::parse(find(headers, TRACEPARENT)?, find(headers, TRACESTATE))
    }

    /// Adds `traceparent` (and `tracestate` when present) to outgoing headers.
    pub fn inject(&self, headers: OwnedHeaders) -> OwnedHeaders {
        let tp = self.traceparent();
        let headers = headers.insert(KafkaHeader { key: TRACEPARENT, value: Some(tp.as_bytes()) });
        match &self.tracestate {
            Some(ts) => headers.insert(KafkaHeader { key: TRACESTATE, value: Some(ts.as_bytes()) }),
            None => headers,
        }
    }
}

/// The longest `tracestate` carried on. The specification bounds a valid one (32 list
/// members of at most 256-character keys and values) near 16 KB and asks vendors to
/// propagate at least 512 characters; one longer than this is dropped, not copied onto
/// every record the product writes (a 600 KB one made even the DLQ record too large).
pub const MAX_TRACESTATE_BYTES: usize = 8 * 1024;

fn new_span_id() -> [u8; 8] {
    let mut id: [u8; 8] = rand::random();
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::collect;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_specification_example() {
        let ctx = TraceContext::parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.flags, 1);
        assert_eq!(ctx.traceparent(), TP);
        assert_eq!(ctx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn rejects_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
        // A future version may carry more fields; the first four are read.
        assert!(TraceContext::parse(&format!("01{}-more", &TP[2..]), None).is_some());
    }

    #[test]
    fn an_oversized_tracestate_is_dropped() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let long = format!("v={}", "s".repeat(MAX_TRACESTATE_BYTES));
        let ctx = TraceContext::parse(tp, Some(&long)).unwrap();
        assert_eq!(ctx.tracestate, None);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736", "the trace is kept");
    }

    #[test]
    fn inject_then_extract_round_trips_through_kafka_headers() {
        let ctx = TraceContext::parse(TP, Some("a=b")).unwrap().child();
        let headers = ctx.inject(OwnedHeaders::new());
        let back = TraceContext::extract(&collect(Some(&headers))).unwrap();
        assert_eq!(back, ctx);
        assert_eq!(back.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(back.span_id, TraceContext::parse(TP, None).unwrap().span_id);
    }

    #[test]
    fn new_roots_are_distinct_and_valid() {
        let a = TraceContext::new_root();
        let b = TraceContext::new_root();
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceContext::parse(&a.traceparent(), None).unwrap(), a);
    }
}
