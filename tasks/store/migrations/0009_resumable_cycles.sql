-- Schema v9: every step of a cycle is done once, and a run stopped anywhere is finished by
-- the next one (tasks/finish.py).

-- When the batch was first shown for review (its run published it and stopped for the
-- review). An open batch nobody was shown, whose run died before its review, is adopted by
-- the next cycle and reviewed as if nothing had happened; one a reviewer was shown is
-- expired as before (answers kept, the rest back to the pool).
ALTER TABLE batches ADD COLUMN offered_at TIMESTAMP;
-- Batches from before this version: assume they were shown (expired as before, never adopted).
UPDATE batches SET offered_at = created_at;

-- The end of each cycle, one row per cycle, its steps recorded as they are done:
-- `report` is written in the transaction of the cycle's quality row (what its summary
-- shows, so it can be published later exactly as measured); `publishing_run` before its
-- artifacts are published (where to look for one an earlier attempt created but did not
-- record); each artifact's id once created; `published_at` once both are. A cycle without
-- a published row is unfinished, and the next run finishes it.
CREATE TABLE cycle_reports (
    cycle            INTEGER PRIMARY KEY,  -- cycles.cycle
    report           JSON,                 -- NULL for a cycle recorded before this version
    publishing_run   VARCHAR,              -- the flow run that publishes (or last tried to)
    curve_artifact   VARCHAR,              -- the alflow-learning-curve version of this cycle
    summary_artifact VARCHAR,              -- its cycle-summary artifact
    published_at     TIMESTAMP
);
-- Cycles from before this version were published by the runs that recorded them.
INSERT INTO cycle_reports (cycle, published_at) SELECT cycle, created_at FROM cycles;
