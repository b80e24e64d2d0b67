-- ordering = "strict-key": a Kafka key whose earlier record waits for a delayed retry or
-- sits in the DLQ is blocked by it; later records of the key are parked here, in arrival
-- order, and released one by one once the blocker is enriched or discarded.
CREATE TABLE key_blocks (
    pipeline          TEXT        NOT NULL,
    kafka_key         BYTEA       NOT NULL,
    -- The idempotency key of the record the others wait for.
    blocker_key       TEXT        NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, kafka_key)
);

CREATE TABLE parked (
    seq               BIGSERIAL   PRIMARY KEY,
    pipeline          TEXT        NOT NULL,
    kafka_key         BYTEA       NOT NULL,
    idempotency_key   TEXT        NOT NULL,
    -- The request as read from enrich.requests, to run once released.
    envelope          BYTEA       NOT NULL,
    traceparent       TEXT,
    parked_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A redelivered request is parked once.
    UNIQUE (pipeline, kafka_key, idempotency_key)
);

CREATE INDEX parked_in_order ON parked (pipeline, kafka_key, seq);
