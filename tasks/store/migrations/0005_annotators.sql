-- Schema v5: several annotators per item (overlap), adjudication, and labeling time.

-- labels.origin gains 'adjudication' (the deciding answer on a tie or a strong
-- disagreement) and labels gain `seconds`. DuckDB cannot alter a CHECK constraint, so the
-- table is rebuilt: created anew, copied, the old one dropped, the new one renamed. The
-- label_id sequence is kept, so ids go on where they were (model watermarks stay true).
DROP VIEW effective_labels;

CREATE TABLE labels_v5 (
    label_id       BIGINT PRIMARY KEY DEFAULT nextval('label_id_seq'),
    item_id        VARCHAR NOT NULL,
    label          VARCHAR NOT NULL,       -- a class name, or 'skip'
    annotator      VARCHAR NOT NULL,
    origin         VARCHAR NOT NULL CHECK (origin IN ('ui', 'cli', 'import', 'simulated', 'adjudication')),
    batch_id       VARCHAR,                -- NULL when labeled outside a batch
    flow_run_id    VARCHAR,
    created_at     TIMESTAMP NOT NULL,
    prelabel_shown VARCHAR,
    -- Labeling time of this answer in seconds, where measurable: the terminal times each
    -- item; the Resume form's wait is divided over the answers it brought; a Label Studio
    -- import keeps the annotation's lead_time. NULL: not measured.
    seconds        DOUBLE
);

INSERT INTO labels_v5 (label_id, item_id, label, annotator, origin, batch_id, flow_run_id, created_at,
                       prelabel_shown)
SELECT label_id, item_id, label, annotator, origin, batch_id, flow_run_id, created_at, prelabel_shown
FROM labels;

DROP TABLE labels;
ALTER TABLE labels_v5 RENAME TO labels;

-- How many independent answers (distinct annotators) an item of a batch needs before the
-- batch is complete: review.overlap for the review.overlap_share of a batch, else 1.
ALTER TABLE batch_items ADD COLUMN overlap INTEGER DEFAULT 1;
UPDATE batch_items SET overlap = 1 WHERE overlap IS NULL;

-- An adjudication row (the latest, not a skip) decides the item. Otherwise: the latest
-- non-skip answer per (item, annotator), then the majority across annotators; a tie has
-- no effective label and goes to adjudication in the next batch.
CREATE VIEW effective_labels AS
WITH adjudicated AS (
    SELECT item_id, arg_max(label, label_id) AS label, max(label_id) AS label_id
    FROM labels WHERE origin = 'adjudication' AND label <> 'skip' GROUP BY item_id
), latest AS (
    SELECT item_id, annotator, arg_max(label, label_id) AS label, max(label_id) AS label_id
    FROM labels WHERE label <> 'skip' AND origin <> 'adjudication' GROUP BY item_id, annotator
), votes AS (
    SELECT item_id, label, count(*) AS votes, max(label_id) AS label_id
    FROM latest GROUP BY item_id, label
), ranked AS (
    SELECT *, max(votes) OVER (PARTITION BY item_id) AS top,
           count(*) OVER (PARTITION BY item_id, votes) AS ties
    FROM votes
)
SELECT item_id, label, votes, label_id FROM ranked
WHERE votes = top AND ties = 1 AND item_id NOT IN (SELECT item_id FROM adjudicated)
UNION ALL
SELECT a.item_id, a.label, coalesce(v.votes, 0) AS votes, a.label_id
FROM adjudicated a LEFT JOIN votes v ON v.item_id = a.item_id AND v.label = a.label;
