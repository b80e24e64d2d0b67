-- Which replica did the work (the enricher's lease owner), for the audit.
ALTER TABLE run_history ADD COLUMN worker TEXT;
