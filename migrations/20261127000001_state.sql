-- Per-key state machine, run history and step outcomes (see ../shared/DESIGN.md).

-- One row per (pipeline, idempotency key).
--   received -> requested -> enriching -> enriched -> published
--   side states: retry_scheduled, dead_lettered
CREATE TABLE enrich_state (
    pipeline          TEXT        NOT NULL,
    idempotency_key   TEXT        NOT NULL,
    state             TEXT        NOT NULL CHECK (state IN (
                          'received', 'requested', 'enriching', 'enriched', 'published',
                          'retry_scheduled', 'dead_lettered')),
    attempts          INTEGER     NOT NULL DEFAULT 0,
    lease_owner       TEXT,
    lease_until       TIMESTAMPTZ,
    -- Where the key was first seen: the record that owns the key. Later records with
    -- the same key are duplicates.
    source_topic      TEXT        NOT NULL,
    source_partition  INTEGER     NOT NULL,
    source_offset     BIGINT      NOT NULL,
    kafka_key         BYTEA,
    result            JSONB,
    result_hash       TEXT,
    model             TEXT,
    prompt_version    TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, idempotency_key)
);

CREATE INDEX enrich_state_by_state ON enrich_state (pipeline, state);

-- One row per stage per attempt at a record: append-only audit.
CREATE TABLE run_history (
    id                BIGSERIAL   PRIMARY KEY,
    pipeline          TEXT        NOT NULL,
    idempotency_key   TEXT        NOT NULL,
    stage             TEXT        NOT NULL,
    attempt           INTEGER     NOT NULL DEFAULT 0,
    -- forwarded | duplicate | dead_lettered | enriched | reused | published | failed
    status            TEXT        NOT NULL,
    source_topic      TEXT,
    source_partition  INTEGER,
    source_offset     BIGINT,
    trace_id          TEXT,
    detail            TEXT,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX run_history_by_key ON run_history (pipeline, idempotency_key, recorded_at);
CREATE INDEX run_history_by_time ON run_history (recorded_at);
-- Ingest records each source record once, whatever the redeliveries.
CREATE UNIQUE INDEX run_history_ingest_once
    ON run_history (pipeline, source_topic, source_partition, source_offset)
    WHERE stage = 'ingest-dedup';

-- One row per step of a record's processing: append-only audit.
CREATE TABLE step_outcomes (
    id                BIGSERIAL   PRIMARY KEY,
    pipeline          TEXT        NOT NULL,
    idempotency_key   TEXT        NOT NULL,
    stage             TEXT        NOT NULL,
    -- dedup_check | llm_call | validation | publish
    step              TEXT        NOT NULL,
    attempt           INTEGER     NOT NULL DEFAULT 0,
    status            TEXT        NOT NULL,
    duration_ms       DOUBLE PRECISION,
    model             TEXT,
    input_tokens      INTEGER,
    output_tokens     INTEGER,
    cost_usd          NUMERIC(14, 8),
    error             TEXT,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX step_outcomes_by_key ON step_outcomes (pipeline, idempotency_key, recorded_at);
CREATE INDEX step_outcomes_by_time ON step_outcomes (recorded_at);
