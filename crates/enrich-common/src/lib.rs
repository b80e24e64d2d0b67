//! The shared contract of the enrichment pipeline. Every stage uses this crate for what
//! must agree between stages: the envelope on the wire, the Kafka headers, how an
//! idempotency key is derived, the configuration, the error classes, and the service
//! plumbing (telemetry, health endpoints, shutdown).

pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letter;
pub mod dead_letter_sink;
pub mod dead_letter_store;
pub mod dlq_limit;
pub mod envelope;
pub mod error;
pub mod failpoints;
pub mod headers;
pub mod http;
pub mod idempotency;
pub mod kafka;
pub mod key_state;
pub mod service;
pub mod shutdown;
pub mod spans;
pub mod telemetry;
pub mod trace_context;

pub use config::Settings;
pub use envelope::Envelope;
pub use error::ErrorClass;
pub use idempotency::{IdempotencyKey, KeyStrategy};
pub use trace_context::TraceContext;
