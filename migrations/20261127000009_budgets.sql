-- LLM spend per budget window, shared by every replica: a call reserves its estimated
-- cost before it starts (refused when the window's limit would be passed) and settles
-- with the real cost after.
CREATE TABLE budget_windows (
    pipeline      TEXT             NOT NULL,
    window_secs   BIGINT           NOT NULL,
    window_start  TIMESTAMPTZ      NOT NULL,
    limit_usd     DOUBLE PRECISION NOT NULL,
    reserved_usd  DOUBLE PRECISION NOT NULL DEFAULT 0,
    spent_usd     DOUBLE PRECISION NOT NULL DEFAULT 0,
    calls         BIGINT           NOT NULL DEFAULT 0,
    PRIMARY KEY (pipeline, window_secs, window_start)
);
