-- Operator controls per pipeline: the kill switch that pauses every enricher replica.
CREATE TABLE controls (
    pipeline     TEXT        PRIMARY KEY,
    paused       BOOLEAN     NOT NULL DEFAULT false,
    reason       TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
