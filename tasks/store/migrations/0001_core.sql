-- Schema v1: the tables of the core loop.
-- A shipped migration is never edited: a change to the schema is a new numbered file.

CREATE TABLE items (
    item_id     VARCHAR PRIMARY KEY,       -- sha256 of the normalised title and text
    source      VARCHAR NOT NULL,          -- the configured source name
    external_id VARCHAR,                   -- the id the source gave it, if any
    url         VARCHAR,
    title       VARCHAR,
    text        VARCHAR NOT NULL,
    gold_label  VARCHAR,                   -- a label shipped with the data, if any
    meta        JSON,
    fetched_at  TIMESTAMP NOT NULL,
    ingest_run  VARCHAR                    -- ingest_id in ingests
);

CREATE TABLE ingests (
    ingest_id   VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    flow_run_id VARCHAR,
    started_at  TIMESTAMP NOT NULL,
    finished_at TIMESTAMP NOT NULL,
    n_read      INTEGER NOT NULL,
    n_new       INTEGER NOT NULL,
    n_duplicate INTEGER NOT NULL,
    n_bad       INTEGER NOT NULL,
    bad_reasons JSON,
    PRIMARY KEY (ingest_id, source)
);

CREATE TABLE predictions (
    item_id          VARCHAR NOT NULL,
    model_version    INTEGER NOT NULL,
    label            VARCHAR NOT NULL,
    proba            DOUBLE[] NOT NULL,    -- in the order of the configured labels
    least_confidence DOUBLE NOT NULL,
    margin           DOUBLE NOT NULL,      -- p(top1) - p(top2): small is uncertain
    entropy          DOUBLE NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    PRIMARY KEY (item_id, model_version)
);

CREATE TABLE batches (
    batch_id      VARCHAR PRIMARY KEY,
    flow_run_id   VARCHAR,
    strategy      VARCHAR NOT NULL,
    model_version INTEGER,                 -- NULL: cold start, no model yet
    size          INTEGER NOT NULL,
    status        VARCHAR NOT NULL CHECK (status IN ('open', 'labeled', 'expired')),
    owner         VARCHAR,                 -- host:pid of the process waiting on it
    created_at    TIMESTAMP NOT NULL,
    closed_at     TIMESTAMP
);

CREATE TABLE batch_items (
    batch_id   VARCHAR NOT NULL,
    item_id    VARCHAR NOT NULL,
    rank       INTEGER NOT NULL,           -- 1 = asked first
    score      DOUBLE,
    prelabel   VARCHAR,                    -- NULL on a cold start
    confidence DOUBLE,                     -- p(prelabel)
    picked_by  VARCHAR NOT NULL,           -- uncertainty, exploration, coverage, random
    PRIMARY KEY (batch_id, item_id)
);

CREATE SEQUENCE label_id_seq START 1;

CREATE TABLE labels (
    label_id    BIGINT PRIMARY KEY DEFAULT nextval('label_id_seq'),
    item_id     VARCHAR NOT NULL,
    label       VARCHAR NOT NULL,          -- a class name, or 'skip'
    annotator   VARCHAR NOT NULL,
    origin      VARCHAR NOT NULL CHECK (origin IN ('ui', 'cli', 'import', 'simulated')),
    batch_id    VARCHAR,                   -- NULL when labeled outside a batch
    flow_run_id VARCHAR,
    created_at  TIMESTAMP NOT NULL
);

CREATE TABLE models (
    model_version   INTEGER PRIMARY KEY,
    path            VARCHAR NOT NULL,
    classifier      VARCHAR NOT NULL,
    params          JSON NOT NULL,
    n_labels        INTEGER NOT NULL,
    label_watermark BIGINT NOT NULL,       -- trained on labels with label_id <= this
    metrics         JSON,
    promoted        BOOLEAN NOT NULL,
    flow_run_id     VARCHAR,
    created_at      TIMESTAMP NOT NULL
);

CREATE TABLE cycles (
    cycle         INTEGER PRIMARY KEY,
    flow_run_id   VARCHAR,
    batch_id      VARCHAR,
    model_version INTEGER,
    strategy      VARCHAR NOT NULL,
    n_labels      INTEGER NOT NULL,
    accuracy      DOUBLE,
    macro_f1      DOUBLE,
    metrics       JSON,
    promoted      BOOLEAN NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

-- Latest non-skip answer per (item, annotator), then the majority across annotators;
-- a tie has no effective label until someone breaks it.
CREATE VIEW effective_labels AS
WITH latest AS (
    SELECT item_id, annotator, arg_max(label, label_id) AS label, max(label_id) AS label_id
    FROM labels WHERE label <> 'skip' GROUP BY item_id, annotator
), votes AS (
    SELECT item_id, label, count(*) AS votes, max(label_id) AS label_id
    FROM latest GROUP BY item_id, label
), ranked AS (
    SELECT *, max(votes) OVER (PARTITION BY item_id) AS top,
           count(*) OVER (PARTITION BY item_id, votes) AS ties
    FROM votes
)
SELECT item_id, label, votes, label_id FROM ranked WHERE votes = top AND ties = 1;
