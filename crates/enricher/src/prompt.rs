//! The prompt: a fixed system message and a minijinja template over the record's JSON
//! fields. The prompt version is a hash of everything that shapes the answer.

use enrich_common::config::{LlmSettings, OversizedInput};
use enrich_common::error::Reason;
use enrich_common::error::RecordError;
use sha2::{Digest, Sha256};

pub struct PromptTemplate {
    env: minijinja::Environment<'static>,
    system: String,
    version: String,
    /// `llm.input_fields`: the fields the template may see.
    fields: Option<Vec<String>>,
    max_chars: usize,
    oversized: OversizedInput,
}

/// The messages of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub system: String,
    pub user: String,
    /// Set for a repair call: the invalid answer and why it was refused.
    pub repair: Option<Repair>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub previous: String,
    pub error: String,
}

impl Repair {
    /// The follow-up user message of a repair call.
    pub fn instruction(&self) -> String {
        format!(
            "Your previous answer was not valid: {}. Answer again with only the JSON object, satisfying the schema.",
            self.error
        )
    }
}

impl PromptTemplate {
    /// Compiles the template; a syntax error names `llm.user_template`.
    pub fn new(llm: &LlmSettings) -> anyhow::Result<Self> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("user", llm.user_template.clone())
            .map_err(|e| anyhow::anyhow!("invalid configuration: `llm.user_template`: {e}"))?;
        let mut hasher = Sha256::new();
        // Everything that shapes what the model sees is in the version.
        let fields = llm.input_fields.as_ref().map(|f| f.join("\u{1f}")).unwrap_or_default();
        let limit = format!("{}:{:?}", llm.max_input_chars, llm.oversized_input);
        for part in [&llm.system_prompt, &llm.user_template, &llm.output_schema, &fields, &limit] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let version = hex::encode(&hasher.finalize()[..8]);
        Ok(Self {
            env,
            system: llm.system_prompt.trim().to_string(),
            version,
            fields: llm.input_fields.clone(),
            max_chars: llm.max_input_chars,
            oversized: llm.oversized_input,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Renders the user message over the record's allowed fields (and `record`, the
    /// allowed fields as one object), within `llm.max_input_chars`.
    pub fn render(&self, record: &serde_json::Value) -> Result<Prompt, RecordError> {
        let template = self
            .env
            .get_template("user")
            .map_err(|e| RecordError::new(enrich_common::ErrorClass::Fatal, Reason::TemplateError, e.to_string()))?;
        let mut visible: serde_json::Map<String, serde_json::Value> = match record {
            serde_json::Value::Object(fields) => fields
                .iter()
                .filter(|(k, _)| self.fields.as_ref().is_none_or(|allowed| allowed.iter().any(|a| a == *k)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => serde_json::Map::new(),
        };
        if !visible.contains_key("record") {
            let whole = serde_json::Value::Object(visible.clone());
            visible.insert("record".into(), whole);
        }
        let user = template.render(minijinja::value::Serde(serde_json::Value::Object(visible))).map_err(|e| {
            RecordError::new(enrich_common::ErrorClass::Permanent, Reason::TemplateError, e.to_string())
        })?;
        let mut user = user.trim().to_string();
        let chars = user.chars().count();
        if chars > self.max_chars {
            match self.oversized {
                OversizedInput::DeadLetter => {
                    return Err(RecordError::invalid(
                        Reason::InputTooLong,
                        format!("the rendered input is {chars} characters; llm.max_input_chars is {}", self.max_chars),
                    ));
                }
                OversizedInput::Truncate => {
                    let cut = user.char_indices().nth(self.max_chars).map_or(user.len(), |(i, _)| i);
                    user.truncate(cut);
                    user.push_str("\n[input truncated]");
                }
            }
        }
        Ok(Prompt { system: self.system.clone(), user, repair: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llm(template: &str) -> LlmSettings {
        LlmSettings {
            provider: Default::default(),
            response_format: Default::default(),
            extra_headers: Default::default(),
            base_url: "http://x/v1".into(),
            api_key_env: None,
            model: "m".into(),
            connect_timeout_ms: 1,
            request_timeout_ms: 1,
            temperature: 0.0,
            max_output_tokens: 1,
            max_response_bytes: 1024,
            system_prompt: " sys \n".into(),
            user_template: template.into(),
            input_fields: None,
            max_input_chars: 1000,
            oversized_input: Default::default(),
            output_schema: "{}".into(),
            max_attempts: 1,
            quick_retries: 0,
            max_rate_limited: 5,
            retry_delay_ms: 1000,
            retry_max_delay_ms: 1000,
            breaker_failures: 5,
            breaker_open_ms: 1000,
            input_usd_per_mtok: 0.0,
            cache_ttl_secs: 0,
            budgets: Vec::new(),
            output_usd_per_mtok: 0.0,
            fallback_models: Vec::new(),
            prices: Default::default(),
            requests_per_minute: 0,
            tokens_per_minute: 0,
            adaptive_concurrency: true,
            min_concurrency: 1,
            latency_tolerance: 2.0,
        }
    }

    #[test]
    fn renders_fields_and_tolerates_missing_ones() {
        let t = PromptTemplate::new(&llm("Subject: {{ subject }}\n{{ body }}{{ missing }}\n")).unwrap();
        let p = t.render(&serde_json::json!({"subject": "Hi ü", "body": "text"})).unwrap();
        assert_eq!(p.user, "Subject: Hi ü\ntext");
        assert_eq!(p.system, "sys");
    }

    #[test]
    fn version_changes_with_the_template_only() {
        let a = PromptTemplate::new(&llm("{{ a }}")).unwrap();
        let b = PromptTemplate::new(&llm("{{ a }}")).unwrap();
        let c = PromptTemplate::new(&llm("{{ b }}")).unwrap();
        assert_eq!(a.version(), b.version());
        assert_ne!(a.version(), c.version());
        assert_eq!(a.version().len(), 16);
    }

    #[test]
    fn only_allowed_fields_reach_the_template() {
        let mut settings = llm("{{ record }} {{ secret }}");
        settings.input_fields = Some(vec!["subject".into()]);
        let t = PromptTemplate::new(&settings).unwrap();
        let p = t.render(&serde_json::json!({"subject": "Hi", "secret": "s3cr3t"})).unwrap();
        assert!(p.user.contains("Hi") && !p.user.contains("s3cr3t"), "{}", p.user);
        assert_ne!(t.version(), PromptTemplate::new(&llm("{{ record }} {{ secret }}")).unwrap().version());
    }

    #[test]
    fn long_inputs_are_truncated_or_refused_as_configured() {
        let mut settings = llm("{{ body }}");
        settings.max_input_chars = 5;
        let t = PromptTemplate::new(&settings).unwrap();
        assert_eq!(t.render(&serde_json::json!({"body": "äöüßxyz"})).unwrap().user, "äöüßx\n[input truncated]");
        assert_eq!(t.render(&serde_json::json!({"body": "short"})).unwrap().user, "short");
        settings.oversized_input = OversizedInput::DeadLetter;
        let t = PromptTemplate::new(&settings).unwrap();
        assert_eq!(t.render(&serde_json::json!({"body": "too long"})).unwrap_err().reason, Reason::InputTooLong);
    }

    #[test]
    fn syntax_errors_name_the_field() {
        let err = PromptTemplate::new(&llm("{{ unclosed ")).err().unwrap();
        assert!(err.to_string().contains("llm.user_template"), "{err}");
    }
}
