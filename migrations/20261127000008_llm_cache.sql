-- The response cache: one validated answer per (provider, model, prompt version, rendered
-- input), shared by every key and replica, until it expires (llm.cache_ttl_secs).
CREATE TABLE llm_cache (
    cache_key       TEXT        PRIMARY KEY,
    provider        TEXT        NOT NULL,
    model           TEXT        NOT NULL,
    prompt_version  TEXT        NOT NULL,
    result          JSONB       NOT NULL,
    response_model  TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at      TIMESTAMPTZ NOT NULL
);

CREATE INDEX llm_cache_expiry ON llm_cache (expires_at);
