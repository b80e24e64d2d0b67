-- A key waits in the DLQ once: a stage that dies between writing a dead letter and
-- recording it writes the Kafka record again on restart, but the admin API lists it once.
DELETE FROM dead_letters d USING dead_letters e
 WHERE d.pipeline = e.pipeline AND d.idempotency_key = e.idempotency_key
   AND d.status = 'dead' AND e.status = 'dead' AND d.stage <> 'ingest-dedup' AND e.stage <> 'ingest-dedup'
   AND d.id > e.id;
CREATE UNIQUE INDEX dead_letters_once_per_key
    ON dead_letters (pipeline, idempotency_key)
    WHERE status = 'dead' AND stage <> 'ingest-dedup';
