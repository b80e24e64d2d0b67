-- The key state machine, enforced where the state lives: an UPDATE that moves a key
-- along a transition the pipeline does not have (a late writer overwriting an ended key,
-- an `enriched` key sent back to `enriching`, anything out of `published`) fails with
-- check_violation, constraint `enrich_state_transition`. The same table is
-- `enrich_common::key_state::State::may_become`; tests/key_state.rs checks they agree.
CREATE FUNCTION enrich_state_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = OLD.state THEN
        IF OLD.state IN ('enriched', 'published') AND NEW.result_hash IS DISTINCT FROM OLD.result_hash THEN
            RAISE EXCEPTION 'the stored result of key % (%) cannot be overwritten', OLD.idempotency_key, OLD.state
                USING ERRCODE = 'check_violation', CONSTRAINT = 'enrich_state_transition';
        END IF;
        RETURN NEW;
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

CREATE TRIGGER enrich_state_transition
    BEFORE UPDATE OF state, result_hash ON enrich_state
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.result_hash IS DISTINCT FROM NEW.result_hash)
    EXECUTE FUNCTION enrich_state_transition();
