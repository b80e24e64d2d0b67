-- Which publisher took each partition of the results topic last, and how many times it
-- was taken (the epoch). A publisher takes the partitions it is assigned before it reads
-- from them, and binds a key only under the epoch it took: a publisher that lost a
-- partition while it was frozen (its session expired, a new owner read on and committed
-- past the records it still holds) can no longer bind one of those records, which the
-- new owner's reconciliation would otherwise take for published by a committed
-- transaction.
CREATE TABLE publish_partitions (
    pipeline    TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    epoch       BIGINT      NOT NULL,
    owner       TEXT        NOT NULL,
    taken_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, partition)
);
