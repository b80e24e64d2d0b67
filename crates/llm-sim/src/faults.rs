//! Fault injection: rates of 429s and 500s, and per-record markers in the ticket text
//! that tests use to choose which records fail and how:
//!
//! | marker | effect |
//! |---|---|
//! | `[[sim:always-500]]` | every call answers 500 |
//! | `[[sim:500-once]]` | the first call for this text answers 500, later ones succeed |
//! | `[[sim:always-429]]` | every call answers 429 with `Retry-After: 1` (`retry-after-ms: 1000`) |
//! | `[[sim:429-once:MS]]` | the first call for this text answers 429 with `retry-after-ms: MS`, later ones succeed |
//! | `[[sim:hang]]` | no answer until the client gives up |
//! | `[[sim:invalid-json]]` | the answer is not JSON, also on a repair request |
//! | `[[sim:invalid-json-once]]` | the answer is not JSON; a repair request gets a valid one |
//! | `[[sim:schema-violation]]` | valid JSON that breaks the schema, also on repair |
//! | `[[sim:429-on-repair]]` | the answer is not JSON; every repair request answers 429 |
//! | `[[sim:answer-bytes:N]]` | a valid answer of at least N bytes (its `tags` padded) |
//! | `[[sim:400-echo]]` | every call answers 400 with an error message that quotes the user text (as some providers do) |
//! | `[[sim:refuse]]` | the model refuses, its refusal quoting the user text |
//!
//! Markers and rates can be switched off at runtime (`POST /admin/faults`), so a test
//! can fix the cause and then replay.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Whether `[[sim:...]]` markers take effect.
    pub markers: bool,
    /// Share of calls answered 429 (a transient overload: `retry-after-ms: 200`).
    pub rate_429: f64,
    /// Share of calls answered 500.
    pub rate_500: f64,
    /// Share of calls that never answer (the client times out).
    pub rate_hang: f64,
    /// Models answered 503 (529 on the Messages API): overloaded, as when a provider
    /// sheds load for one model (what fallback models are for).
    pub unavailable_models: Vec<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Self { markers: true, rate_429: 0.0, rate_500: 0.0, rate_hang: 0.0, unavailable_models: Vec::new() }
    }
}

/// The wait a random 429 asks for.
pub const RATE_429_WAIT_MS: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Answer,
    Status {
        code: u16,
        retry_after_ms: Option<u64>,
    },
    Hang,
    InvalidJson,
    SchemaViolation,
    /// 400, the error's message quoting the request's text.
    EchoBadRequest,
    /// A refusal that quotes the request's text.
    Refuse,
}

/// What to do with one request. `first_time`: no earlier request had this text.
/// `repair`: the conversation already holds an assistant answer (a repair request).
/// `roll`: a uniform random number in [0, 1) for the rates.
pub fn decide(faults: &Faults, text: &str, first_time: bool, repair: bool, roll: f64) -> Decision {
    if faults.markers && text.contains("[[sim:") {
        let has = |m: &str| text.contains(&format!("[[sim:{m}]]"));
        if has("always-500") || (has("500-once") && first_time) {
            return Decision::Status { code: 500, retry_after_ms: None };
        }
        if has("429-on-repair") {
            return if repair {
                Decision::Status { code: 429, retry_after_ms: Some(1000) }
            } else {
                Decision::InvalidJson
            };
        }
        if has("400-echo") {
            return Decision::EchoBadRequest;
        }
        if has("refuse") {
            return Decision::Refuse;
        }
        if first_time && let Some(ms) = marker_number(text, "429-once:") {
            return Decision::Status { code: 429, retry_after_ms: Some(ms) };
        }
        if has("always-429") {
            return Decision::Status { code: 429, retry_after_ms: Some(1000) };
        }
        if has("hang") {
            return Decision::Hang;
        }
        if has("invalid-json") || (has("invalid-json-once") && !repair) {
            return Decision::InvalidJson;
        }
        if has("schema-violation") {
            return Decision::SchemaViolation;
        }
    }
    if roll < faults.rate_429 {
        return Decision::Status { code: 429, retry_after_ms: Some(RATE_429_WAIT_MS) };
    }
    if roll < faults.rate_429 + faults.rate_500 {
        return Decision::Status { code: 500, retry_after_ms: None };
    }
    if roll < faults.rate_429 + faults.rate_500 + faults.rate_hang {
        return Decision::Hang;
    }
    Decision::Answer
}

/// The size `[[sim:answer-bytes:N]]` asks the answer to reach, if any.
pub fn answer_bytes(faults: &Faults, text: &str) -> Option<usize> {
    if !faults.markers {
        return None;
    }
    marker_number(text, "answer-bytes:").and_then(|n| usize::try_from(n).ok())
}

/// The number N of a `[[sim:NAME:N]]` marker in `text` (`name` ends with its colon).
fn marker_number(text: &str, name: &str) -> Option<u64> {
    let marker = format!("[[sim:{name}");
    let rest = &text[text.find(&marker)? + marker.len()..];
    rest[..rest.find("]]")?].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_choose_the_failure() {
        let f = Faults::default();
        assert_eq!(
            decide(&f, "x [[sim:always-500]]", false, false, 0.9),
            Decision::Status { code: 500, retry_after_ms: None }
        );
        assert_eq!(
            decide(&f, "x [[sim:500-once]]", true, false, 0.9),
            Decision::Status { code: 500, retry_after_ms: None }
        );
        assert_eq!(decide(&f, "x [[sim:500-once]]", false, false, 0.9), Decision::Answer);
        assert_eq!(decide(&f, "[[sim:invalid-json-once]]", true, false, 0.9), Decision::InvalidJson);
        assert_eq!(decide(&f, "[[sim:invalid-json-once]]", false, true, 0.9), Decision::Answer);
        assert_eq!(decide(&f, "[[sim:invalid-json]]", false, true, 0.9), Decision::InvalidJson);
        assert_eq!(decide(&f, "[[sim:hang]]", true, false, 0.9), Decision::Hang);
        assert_eq!(decide(&f, "x [[sim:400-echo]]", false, true, 0.9), Decision::EchoBadRequest);
        assert_eq!(decide(&f, "x [[sim:refuse]]", false, false, 0.9), Decision::Refuse);
        assert_eq!(
            decide(&f, "x [[sim:429-once:8000]]", true, false, 0.9),
            Decision::Status { code: 429, retry_after_ms: Some(8000) }
        );
        assert_eq!(decide(&f, "x [[sim:429-once:8000]]", false, false, 0.9), Decision::Answer);
        assert_eq!(decide(&f, "plain", true, false, 0.9), Decision::Answer);
    }

    #[test]
    fn rates_apply_and_switching_off_disables_markers() {
        let f = Faults { markers: false, rate_429: 0.2, rate_500: 0.1, rate_hang: 0.05, ..Faults::default() };
        assert_eq!(decide(&f, "[[sim:always-500]]", true, false, 0.95), Decision::Answer);
        assert_eq!(
            decide(&f, "x", true, false, 0.1),
            Decision::Status { code: 429, retry_after_ms: Some(RATE_429_WAIT_MS) }
        );
        assert_eq!(decide(&f, "x", true, false, 0.25), Decision::Status { code: 500, retry_after_ms: None });
        assert_eq!(decide(&f, "x", true, false, 0.31), Decision::Hang);
        assert_eq!(decide(&f, "x", true, false, 0.36), Decision::Answer);
    }

    #[test]
    fn an_answer_size_marker_is_read() {
        let f = Faults::default();
        assert_eq!(answer_bytes(&f, "x [[sim:answer-bytes:5000]] y"), Some(5000));
        assert_eq!(answer_bytes(&f, "x [[sim:answer-bytes:]]"), None);
        assert_eq!(answer_bytes(&f, "no marker"), None);
        assert_eq!(answer_bytes(&Faults { markers: false, ..f }, "[[sim:answer-bytes:5]]"), None);
    }
}
