-- A key's row in enrich_state is rewritten five times on its way through the pipeline
-- (requested, enriching, enriched, bound, published). The index on (pipeline, state)
-- made every one of those a non-HOT update: a new entry in each index and the WAL for
-- it, and a table that bloats. Nothing reads keys by state on a hot path; the one reader
-- that must find keys by what they are, the publisher reconciling keys bound to a
-- results record but not settled, gets a partial index on the binding itself, which
-- only the binding and the settlement (it clears the binding) change. Every other
-- update leaves every indexed column alone and can stay on its page.
DROP INDEX enrich_state_by_state;
CREATE INDEX enrich_state_unsettled ON enrich_state (pipeline, publish_partition, publish_offset)
    WHERE publish_offset IS NOT NULL;

-- Room on each page for the next version of its rows (a HOT update needs it there).
ALTER TABLE enrich_state SET (fillfactor = 70);

-- Keys settled before this migration keep their binding; they are ended, so it is
-- cleared (the partial index holds only bindings waiting to be settled).
UPDATE enrich_state SET publish_partition = NULL, publish_offset = NULL
 WHERE publish_offset IS NOT NULL AND state IN ('published', 'dead_lettered');

-- The audit tables are append-only and time-ordered: the retention job's range scans
-- need only a block range index, far cheaper to maintain than a B-tree per row.
DROP INDEX run_history_by_time;
CREATE INDEX run_history_by_time ON run_history USING brin (recorded_at);
DROP INDEX step_outcomes_by_time;
CREATE INDEX step_outcomes_by_time ON step_outcomes USING brin (recorded_at);
