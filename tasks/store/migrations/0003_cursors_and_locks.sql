-- Schema v3: what each source has already delivered, and which process runs a cycle.

-- Incremental fetching: the cursor a connector left after its last complete fetch (its
-- `next_cursor`: newest date, page revisions, links seen), handed back on the next fetch.
CREATE TABLE source_cursors (
    source      VARCHAR PRIMARY KEY,       -- the configured source name
    cursor      JSON NOT NULL,
    ingest_id   VARCHAR,                   -- the ingest run that left it
    updated_at  TIMESTAMP NOT NULL
);

-- Named locks held across transactions (e.g. 'cycle': one cycle at a time per database).
-- A row is a held lock; its owner (host:pid) is checked for liveness before a takeover.
CREATE TABLE locks (
    name        VARCHAR PRIMARY KEY,
    owner       VARCHAR NOT NULL,          -- host:pid of the holder
    flow_run_id VARCHAR,
    acquired_at TIMESTAMP NOT NULL
);
