-- The key state machine's trigger, widened: an ended key's result, model and prompt
-- version are guarded too (not only its hash), and a key bound to a results record is
-- settled only to the outcome it was bound for (an `enriched` key bound to be published
-- cannot be dead-lettered under its binding). See 20261203000001_state_transitions.sql.
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
        WHEN 'dead_lettered' THEN NEW.state = 'requested'
        ELSE false
    END) THEN
        RAISE EXCEPTION 'key % cannot move from % to %', OLD.idempotency_key, OLD.state, NEW.state
            USING ERRCODE = 'check_violation', CONSTRAINT = 'enrich_state_transition';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER enrich_state_transition ON enrich_state;
CREATE TRIGGER enrich_state_transition
    BEFORE UPDATE OF state, result, result_hash, model, prompt_version ON enrich_state
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.result_hash IS DISTINCT FROM NEW.result_hash
          OR OLD.result IS DISTINCT FROM NEW.result OR OLD.model IS DISTINCT FROM NEW.model
          OR OLD.prompt_version IS DISTINCT FROM NEW.prompt_version)
    EXECUTE FUNCTION enrich_state_transition();
