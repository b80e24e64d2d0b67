-- The results record a key's publication is bound to. The publisher binds the key to one
-- record of `enrich.results` (committed before its Kafka transaction begins); only that
-- record can publish the key, and it is marked `published` once the transaction that
-- carried it has committed. A copy of the result elsewhere on the topic is refused, and a
-- bound record read again (its transaction aborted) takes its own binding back.
ALTER TABLE enrich_state
    ADD COLUMN publish_topic     TEXT,
    ADD COLUMN publish_partition INTEGER,
    ADD COLUMN publish_offset    BIGINT;
