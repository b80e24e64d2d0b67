-- The traceparent of the ingest span that first claimed the key: a source record read
-- again after a crash (its forward not finished or not recorded) continues that trace,
-- so the request, the enrichment and the output stay in one trace.
ALTER TABLE enrich_state ADD COLUMN traceparent TEXT;
