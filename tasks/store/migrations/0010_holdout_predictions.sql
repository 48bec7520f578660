-- Schema v10: each promoted model's label for every gold holdout item it was evaluated on
-- (what its holdout metrics counted). The next retrain compares the new model with the
-- current one on the holdout: the current model's labels are read here and only holdout
-- items it has not predicted yet (new gold items) are predicted, so a model predicts a
-- holdout item once. A model promoted before this version has none: its stored score
-- serves while the holdout is unchanged, and the first comparison after a change predicts
-- it once and keeps its labels.
CREATE TABLE holdout_predictions (
    model_version INTEGER NOT NULL,
    item_id       VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,        -- model.predict
    PRIMARY KEY (model_version, item_id)
);
