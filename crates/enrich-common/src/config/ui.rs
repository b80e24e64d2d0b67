//! `[ui]`: the operator's console that the dlq-replayer serves under `/ui` on its HTTP
//! port. Where it reads the other stages' health and metrics, how often, and where a
//! trace id links to.

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UiSettings {
    /// Serve the console (`/ui`) beside the admin API.
    pub enabled: bool,
    /// A link to one trace in a trace viewer, `{trace_id}` standing for the 32 hex digits
    /// (Jaeger: `http://localhost:16686/trace/{trace_id}`). None: no links.
    pub trace_url_template: Option<String>,
    /// Base URLs of the stages' health and metrics endpoints (one per replica). Empty:
    /// `http://127.0.0.1:<the stage's http_port>`.
    pub ingest_urls: Vec<String>,
    pub enricher_urls: Vec<String>,
    pub publisher_urls: Vec<String>,
    /// How often the console reads every stage's `/readyz` and `/metrics` (the overview
    /// and its charts of the last hour come from these samples).
    pub sample_interval_ms: u64,
    /// A login lasts this long.
    pub session_ttl_secs: u64,
}

impl Default for UiSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            trace_url_template: None,
            ingest_urls: Vec::new(),
            enricher_urls: Vec::new(),
            publisher_urls: Vec::new(),
            sample_interval_ms: 2_000,
            session_ttl_secs: 12 * 3600,
        }
    }
}

/// The placeholder a trace link template must hold.
pub const TRACE_ID_PLACEHOLDER: &str = "{trace_id}";

fn is_http_url(s: &str) -> bool {
    let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.chars().any(char::is_whitespace))
}

impl UiSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.trace_url_template
            && (!is_http_url(t) || !t.contains(TRACE_ID_PLACEHOLDER))
        {
            return Err(ConfigError::new(
                "ui.trace_url_template",
                "must be an http:// or https:// URL holding {trace_id}",
            ));
        }
        for (field, urls) in [
            ("ui.ingest_urls", &self.ingest_urls),
            ("ui.enricher_urls", &self.enricher_urls),
            ("ui.publisher_urls", &self.publisher_urls),
        ] {
            if let Some(i) = urls.iter().position(|u| !is_http_url(u)) {
                return Err(ConfigError::new(format!("{field}[{i}]"), "must be an http:// or https:// base URL"));
            }
        }
        if !(200..=60_000).contains(&self.sample_interval_ms) {
            return Err(ConfigError::new("ui.sample_interval_ms", "must be from 200 to 60000"));
        }
        if self.session_ttl_secs < 60 {
            return Err(ConfigError::new("ui.session_ttl_secs", "must be at least 60"));
        }
        Ok(())
    }

    /// The link to one trace, when a template is set.
    pub fn trace_url(&self, trace_id: &str) -> Option<String> {
        self.trace_url_template.as_ref().map(|t| t.replace(TRACE_ID_PLACEHOLDER, trace_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_trace_template_or_url_is_named() {
        let mut ui = UiSettings::default();
        assert!(ui.validate().is_ok());
        ui.trace_url_template = Some("http://jaeger:16686/trace/".into());
        assert_eq!(ui.validate().unwrap_err().field, "ui.trace_url_template", "no {{trace_id}}");
        ui.trace_url_template = Some("javascript:alert({trace_id})".into());
        assert_eq!(ui.validate().unwrap_err().field, "ui.trace_url_template", "not http");
        ui.trace_url_template = Some("http://jaeger:16686/trace/{trace_id}".into());
        assert!(ui.validate().is_ok());
        assert_eq!(ui.trace_url("ab12").as_deref(), Some("http://jaeger:16686/trace/ab12"));
        ui.enricher_urls = vec!["http://a:9102".into(), "a:9102".into()];
        assert_eq!(ui.validate().unwrap_err().field, "ui.enricher_urls[1]");
        ui.enricher_urls.clear();
        ui.sample_interval_ms = 10;
        assert_eq!(ui.validate().unwrap_err().field, "ui.sample_interval_ms");
    }
}
