-- A key's row in enrich_state is rewritten five times on its way through the pipeline
-- (requested, enriching, enriched, bound, published). The index on (pipeline, state)
-- made every one of those a non-HOT update: a new entry in each index and its WAL.
-- Nothing reads keys by state on a hot path; the one reader that must find keys by
-- what they are, the publisher reconciling keys bound to a results record but not
-- settled, gets a partial index on the binding, which only the binding and the
-- settlement change (the settlement clears the binding). Every other update leaves
-- every indexed column alone and can stay on its page.
--
-- Plain, not CONCURRENTLY: every stage migrates at start under sqlx's advisory lock, and
-- a concurrent build waits for the other stages' sessions blocked on that lock (a
-- deadlock). The build holds off writes to enrich_state while it scans the table once.
-- Keys settled before this release keep their binding
-- here: rewriting every ended row in this transaction would hold the lock for minutes
-- on a large table; the publisher clears them in short batches instead, the first time
-- it reconciles (`key_state::publish::unsettled`).
DROP INDEX enrich_state_by_state;
CREATE INDEX enrich_state_unsettled ON enrich_state (pipeline, publish_partition, publish_offset)
    WHERE publish_offset IS NOT NULL;

-- Room on each page for the next version of its rows (a HOT update needs it there);
-- applies to pages written from now on.
ALTER TABLE enrich_state SET (fillfactor = 70);
