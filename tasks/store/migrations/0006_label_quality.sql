-- Schema v6: label checking, the random control slice's estimate, and the stopping rules.

-- Likely label errors: after a retrain, confident learning on the labeled set with
-- out-of-fold probabilities flags items whose given (effective) label the model doubts.
-- Flagged items are offered for re-review (picked_by 'recheck'); nothing is changed here.
CREATE TABLE label_flags (
    model_version   INTEGER NOT NULL,      -- the retrain after which the check ran
    item_id         VARCHAR NOT NULL,
    label_id        BIGINT NOT NULL,       -- the effective label row that was doubted
    given_label     VARCHAR NOT NULL,
    suggested_label VARCHAR NOT NULL,      -- the out-of-fold model's most likely class
    score           DOUBLE NOT NULL,       -- label quality (self-confidence): low = likely wrong
    rank            INTEGER NOT NULL,      -- 1 = most likely wrong
    created_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (model_version, item_id)
);

-- The fixed stop set of the stabilizing-predictions rule: a seeded sample of items chosen
-- once, on which every model's predictions are compared with its predecessor's.
CREATE TABLE stop_set (
    item_id    VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE stop_set_predictions (
    model_version INTEGER NOT NULL,
    item_id       VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,
    PRIMARY KEY (model_version, item_id)
);

-- What each cycle measured beside its holdout / CV figure, and the stopping rules' state.
CREATE TABLE cycle_quality (
    cycle            INTEGER PRIMARY KEY,  -- cycles.cycle
    model_version    INTEGER,
    control_n        INTEGER NOT NULL,     -- control items labeled so far, with a stored prediction
    control_correct  INTEGER NOT NULL,     -- of which the model current when it was drawn was right
    control_accuracy DOUBLE,               -- control_correct / control_n (NULL when n = 0)
    control_low      DOUBLE,               -- Wilson 95% interval
    control_high     DOUBLE,
    flags            INTEGER NOT NULL,     -- label_flags of this cycle's model
    stop_kappa       DOUBLE,               -- Cohen's kappa vs the previous cycle's model on the stop set
    stop_rules       JSON NOT NULL,        -- every rule's state (alflow.tasks.stopping)
    stop             VARCHAR,              -- the rule that fired, with its numbers; NULL: none
    created_at       TIMESTAMP NOT NULL
);
