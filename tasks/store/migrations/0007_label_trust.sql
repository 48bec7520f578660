-- Schema v7: labels that mean what a person chose.
--
-- One rule for "the answer", written once as views that every reader uses:
--   answers         every label row, and whether it decides (an adjudication, or any answer to
--                   an item its batch asked again: picked_by 'adjudication' or 'recheck');
--   batch_answers   an annotator's answer to an item in one batch: their latest row there;
--   votes           an annotator's vote on an item: their latest row that does not decide
--                   (a skip is an abstention);
--   decisions       the item's latest deciding answer that is not a skip;
--   effective_labels  the latest decision, else the unique majority of the non-skip votes
--                   (a tie has none and waits for adjudication);
--   control_answers the random control slice: each control item once, by its first non-skip
--                   answer given in a batch that drew it as control and did not expire.

-- Each review round of a batch is recorded once: the row is written in the transaction of the
-- round's answers, so a replayed run (or a second process) finds it and records nothing again.
CREATE TABLE review_rounds (
    batch_id    VARCHAR NOT NULL,
    round       INTEGER NOT NULL,          -- 1, then 2, 3, ... with review.overlap
    flow_run_id VARCHAR,
    annotator   VARCHAR,
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (batch_id, round)
);

-- Labeling time is measured per item (terminal, Label Studio lead_time, an import `seconds`
-- column) and stays in `seconds`. A form's wall-clock wait (it may sit open over a weekend)
-- is kept apart, divided over its items and capped (review.max_form_seconds_per_item).
ALTER TABLE labels ADD COLUMN form_seconds DOUBLE;
UPDATE labels SET form_seconds = seconds, seconds = NULL WHERE origin = 'ui';

-- Every model is scored on the control answers it never trained on: its predictions of them.
CREATE TABLE control_predictions (
    model_version INTEGER NOT NULL,
    item_id       VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,
    PRIMARY KEY (model_version, item_id)
);

DROP VIEW effective_labels;

CREATE VIEW answers AS
SELECT l.*,
       coalesce(l.origin = 'adjudication' OR bi.picked_by IN ('adjudication', 'recheck'), false) AS decisive
FROM labels l LEFT JOIN batch_items bi ON bi.batch_id = l.batch_id AND bi.item_id = l.item_id;

CREATE VIEW batch_answers AS
SELECT * FROM answers
QUALIFY row_number() OVER (PARTITION BY batch_id, item_id, annotator ORDER BY label_id DESC) = 1;

CREATE VIEW votes AS
SELECT * FROM answers WHERE NOT decisive
QUALIFY row_number() OVER (PARTITION BY item_id, annotator ORDER BY label_id DESC) = 1;

CREATE VIEW decisions AS
SELECT * FROM answers WHERE decisive AND label <> 'skip'
QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY label_id DESC) = 1;

CREATE VIEW effective_labels AS
WITH tally AS (
    SELECT item_id, label, count(*) AS votes, max(label_id) AS label_id
    FROM votes WHERE label <> 'skip' GROUP BY item_id, label
), ranked AS (
    SELECT *, max(votes) OVER (PARTITION BY item_id) AS top,
           count(*) OVER (PARTITION BY item_id, votes) AS ties
    FROM tally
)
SELECT item_id, label, votes, label_id FROM ranked
WHERE votes = top AND ties = 1 AND item_id NOT IN (SELECT item_id FROM decisions)
UNION ALL
SELECT d.item_id, d.label, coalesce(t.votes, 0) AS votes, d.label_id
FROM decisions d LEFT JOIN tally t ON t.item_id = d.item_id AND t.label = d.label;

CREATE VIEW control_answers AS
SELECT l.item_id, l.batch_id, l.label_id, l.label, l.annotator, b.model_version AS drawn_by
FROM labels l
JOIN batch_items bi ON bi.batch_id = l.batch_id AND bi.item_id = l.item_id AND bi.picked_by = 'control'
JOIN batches b ON b.batch_id = l.batch_id AND b.status <> 'expired'
WHERE l.label <> 'skip'
QUALIFY row_number() OVER (PARTITION BY l.item_id ORDER BY l.label_id) = 1;
