-- The publisher binds a key to one record of the results topic before its Kafka
-- transaction begins (committed on its own): only that record can publish the key, and
-- the key takes its `publish_outcome` ('published', or 'dead_lettered' when its output
-- cannot be built) once the transaction that carried the record has committed. Any
-- other copy of the result is refused; the bound record read again (its transaction
-- aborted) takes its own binding back. `publish_trace` is the trace the publication
-- belongs to, for the audit row written when the outcome is settled.
ALTER TABLE enrich_state
    ADD COLUMN publish_partition INTEGER,
    ADD COLUMN publish_offset    BIGINT,
    ADD COLUMN publish_outcome   TEXT CHECK (publish_outcome IN ('published', 'dead_lettered')),
    ADD COLUMN publish_trace     TEXT;

-- A publisher dead letter is written to `dead_letters` as 'pending' before its Kafka
-- transaction, with the coordinates of the results record that produced it, and turns
-- 'dead' (listed, replayable) once that transaction has committed.
ALTER TABLE dead_letters
    ADD COLUMN publish_partition INTEGER,
    ADD COLUMN publish_offset    BIGINT,
    DROP CONSTRAINT dead_letters_status_check,
    ADD CONSTRAINT dead_letters_status_check CHECK (status IN ('pending', 'dead', 'replayed', 'discarded'));
CREATE UNIQUE INDEX dead_letters_pending_once
    ON dead_letters (pipeline, publish_partition, publish_offset)
    WHERE status = 'pending';
