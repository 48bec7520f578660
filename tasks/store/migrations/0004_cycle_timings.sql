-- Schema v4: where a cycle's time goes.

-- One row per cycle that asked a batch, keyed by that batch: written when the batch is
-- queried if the run then stops for a human (a suspended run is resumed in another
-- process, which completes the row), and completed when the cycle is recorded.
-- `seconds` holds the steps (ingest, prelabel, query, review_wait, train, evaluate), `wall`
-- (from the cycle's start to its record) and `overhead` = wall - the steps' sum: Prefect's
-- orchestration, DuckDB's opens and commits, and the flow's own bookkeeping.
CREATE TABLE cycle_timings (
    batch_id    VARCHAR PRIMARY KEY,       -- batches.batch_id
    flow_run_id VARCHAR,
    cycle       INTEGER,                   -- cycles.cycle; NULL until the cycle is recorded
    started_at  TIMESTAMP NOT NULL,        -- the cycle's start (UTC)
    asked_at    TIMESTAMP NOT NULL,        -- the batch queried: the wait for review starts here
    seconds     JSON NOT NULL
);
