-- Schema v13: multi-label projects (task = "multi_label", issue 25).
-- A store is one task: store_task holds it (one row, written by the first config that opens
-- the store for a cycle or an ingest), so a config of the other task is refused in one line
-- instead of mixing class answers with tag-set answers. A store from before v13 holds
-- single-label answers and models only: it is single-label.
CREATE TABLE store_task (
    task       VARCHAR PRIMARY KEY,   -- 'single_label' | 'multi_label'
    created_at TIMESTAMP NOT NULL
);
INSERT INTO store_task SELECT 'single_label', now()::TIMESTAMP
    WHERE EXISTS (SELECT 1 FROM models) OR EXISTS (SELECT 1 FROM labels);
-- The task a model was trained for (every earlier model: single_label) and, for a
-- multi-label model, its per-tag decision thresholds in the order of its labels (the tags):
-- a tag is predicted where its probability reaches its threshold. Also kept in the model file.
ALTER TABLE models ADD COLUMN task VARCHAR DEFAULT 'single_label';
ALTER TABLE models ADD COLUMN thresholds DOUBLE[];
