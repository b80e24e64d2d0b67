-- The traceparent of the span that wrote the dead letter: a replay continues the
-- record's trace from there.
ALTER TABLE dead_letters ADD COLUMN traceparent TEXT;
