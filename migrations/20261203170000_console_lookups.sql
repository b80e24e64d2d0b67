-- The console's event search by source record (topic/partition@offset) and by trace id,
-- which read every row of enrich_state, run_history and dead_letters without these (at
-- 100 times the demo's data, 180,000 keys: 335 ms and 211 ms a search). run_history's
-- search by source record uses the ingest's partial index (run_history_ingest_once): the
-- ingest records every source record it reads, the owner of a key and each duplicate.
--
-- enrich_state keeps its HOT updates: a key's source record is written once, when the key
-- is first seen, and no later update changes it. Plain, not CONCURRENTLY (see
-- 20261203000003_hot_updates.sql): the build holds off writes to each table while it
-- scans it once.
CREATE INDEX IF NOT EXISTS enrich_state_by_source
    ON enrich_state (pipeline, source_topic, source_partition, source_offset);
CREATE INDEX IF NOT EXISTS run_history_by_trace
    ON run_history (pipeline, trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_by_trace
    ON dead_letters (pipeline, trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_by_source
    ON dead_letters (pipeline, source_topic, source_partition, source_offset);
