-- A replay of a dead-lettered key whose result is stored (dead-lettered after its
-- enrichment: a result or an output too large for its topic, an output that cannot be
-- built) puts the key back to `enriched`, unbound, so its stored result is published
-- without a second paid call; a key with no result goes back to `requested` as before.
-- The trigger function of 20261203000002, with `dead_lettered -> enriched` allowed; the
-- trigger itself is unchanged.
CREATE OR REPLACE FUNCTION enrich_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = OLD.state THEN
        IF OLD.state IN ('enriched', 'published')
           AND (NEW.result_hash IS DISTINCT FROM OLD.result_hash OR NEW.result IS DISTINCT FROM OLD.result
                OR NEW.model IS DISTINCT FROM OLD.model OR NEW.prompt_version IS DISTINCT FROM OLD.prompt_version) THEN
            RAISE EXCEPTION 'the stored result of key % (%) cannot be overwritten', OLD.idempotency_key, OLD.state
                USING ERRCODE = 'check_violation', CONSTRAINT = 'enrich_state_transition';
        END IF;
        RETURN NEW;
    END IF;
    -- A key bound to a results record is settled by the publisher: only to the outcome
    -- it was bound for.
    IF OLD.state = 'enriched' AND OLD.publish_offset IS NOT NULL
       AND NEW.state IS DISTINCT FROM COALESCE(NEW.publish_outcome, 'published') THEN
        RAISE EXCEPTION 'key % is bound to be %; it cannot become %', OLD.idempotency_key,
            COALESCE(OLD.publish_outcome, 'published'), NEW.state
            USING ERRCODE = 'check_violation', CONSTRAINT = 'enrich_state_transition';
    END IF;
    IF NOT (CASE OLD.state
        WHEN 'received' THEN NEW.state IN ('requested', 'enriching', 'retry_scheduled', 'enriched', 'dead_lettered')
        WHEN 'requested' THEN NEW.state IN ('enriching', 'retry_scheduled', 'enriched', 'dead_lettered')
        WHEN 'enriching' THEN NEW.state IN ('retry_scheduled', 'enriched', 'dead_lettered')
        WHEN 'retry_scheduled' THEN NEW.state IN ('enriching', 'enriched', 'dead_lettered')
        WHEN 'enriched' THEN NEW.state IN ('published', 'dead_lettered')
        WHEN 'dead_lettered' THEN NEW.state IN ('requested', 'enriched')
        ELSE false
    END) THEN
        RAISE EXCEPTION 'key % cannot move from % to %', OLD.idempotency_key, OLD.state, NEW.state
            USING ERRCODE = 'check_violation', CONSTRAINT = 'enrich_state_transition';
    END IF;
    RETURN NEW;
END
$$;
