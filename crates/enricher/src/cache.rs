//! The response cache (`llm.cache_ttl_secs` > 0): a validated answer is kept in
//! PostgreSQL under a hash of the provider, the model, the prompt version and the
//! rendered input, and served to any key and any replica with the same input until it
//! expires. Concurrent lookups of one input in a replica wait for the first (one call,
//! not one per record); across replicas two may call at once, and the later answer wins.

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::prompt::Prompt;

pub struct ResponseCache {
    pub pool: PgPool,
    pub ttl: Duration,
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds an input's single-flight turn until dropped.
pub struct Turn<'a> {
    cache: &'a ResponseCache,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.cache.in_flight.lock() {
            // The map's and ours: nobody else waits for this input.
            if Arc::strong_count(&self.lock) <= 3 {
                map.remove(&self.key);
            }
        }
    }
}

impl ResponseCache {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self { pool, ttl, in_flight: Mutex::new(HashMap::new()) }
    }

    /// The cache key of a call: provider, model, prompt version and the messages.
    pub fn key(provider: &str, model: &str, prompt_version: &str, prompt: &Prompt) -> String {
        let mut h = Sha256::new();
        for part in [provider, model, prompt_version, &prompt.system, &prompt.user] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Waits for this replica's other lookups of the same input to finish.
    pub async fn turn(&self, key: &str) -> Turn<'_> {
        let lock = {
            let mut map = self.in_flight.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        Turn { cache: self, key: key.to_string(), lock, _guard: guard }
    }

    /// A live answer for the key: (JSON, the model that answered).
    pub async fn get(&self, key: &str) -> sqlx::Result<Option<(String, String)>> {
        sqlx::query_as("SELECT result::text, response_model FROM llm_cache WHERE cache_key = $1 AND expires_at > now()")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn put(
        &self,
        key: &str,
        (provider, model, prompt_version): (&str, &str, &str),
        json: &str,
        response_model: &str,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO llm_cache (cache_key, provider, model, prompt_version, result, response_model, expires_at)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, now() + make_interval(secs => $7))
             ON CONFLICT (cache_key) DO UPDATE
               SET result = EXCLUDED.result, response_model = EXCLUDED.response_model,
                   created_at = now(), expires_at = EXCLUDED.expires_at",
        )
        .bind(key)
        .bind(provider)
        .bind(model)
        .bind(prompt_version)
        .bind(json)
        .bind(response_model)
        .bind(self.ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
