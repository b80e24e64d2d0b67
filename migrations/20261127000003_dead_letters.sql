-- Every dead letter, as written to the DLQ topic, for the dlq-replayer's API; and the
-- log of replays and discards.
CREATE TABLE dead_letters (
    id                BIGSERIAL   PRIMARY KEY,
    pipeline          TEXT        NOT NULL,
    idempotency_key   TEXT        NOT NULL,
    stage             TEXT        NOT NULL,
    reason_class      TEXT        NOT NULL,
    reason            TEXT        NOT NULL,
    error             TEXT        NOT NULL,
    attempts          INTEGER     NOT NULL DEFAULT 0,
    source_topic      TEXT,
    source_partition  INTEGER,
    source_offset     BIGINT,
    trace_id          TEXT,
    -- The DLQ record's value: the envelope with the original payload and the failure.
    envelope          BYTEA       NOT NULL,
    status            TEXT        NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'replayed', 'discarded')),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_listing ON dead_letters (pipeline, status, created_at);
CREATE INDEX dead_letters_by_key ON dead_letters (pipeline, idempotency_key);
-- A redelivered malformed source record is recorded once.
CREATE UNIQUE INDEX dead_letters_ingest_once
    ON dead_letters (pipeline, source_topic, source_partition, source_offset)
    WHERE stage = 'ingest-dedup';

CREATE TABLE replay_log (
    id                BIGSERIAL   PRIMARY KEY,
    pipeline          TEXT        NOT NULL,
    dead_letter_id    BIGINT      NOT NULL REFERENCES dead_letters (id),
    idempotency_key   TEXT        NOT NULL,
    -- replayed | refused | discarded
    outcome           TEXT        NOT NULL,
    note              TEXT,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX replay_log_by_key ON replay_log (pipeline, idempotency_key);
