-- Schema v2: what a reviewer was shown, which classes a model was trained for, and model
-- paths relative to models_dir (so that the project folder can move).

-- The pre-label shown with the item when it was answered (NULL: none was shown, e.g. a
-- cold start, an imported file without a prelabel column, or the simulated annotator).
-- label = prelabel_shown is an answer that agreed with the model: the measure of
-- automation bias.
ALTER TABLE labels ADD COLUMN prelabel_shown VARCHAR;

-- The configured class list, in order, that the model's probabilities are aligned to
-- (NULL for a model trained before v2).
ALTER TABLE models ADD COLUMN labels JSON;

-- Model files live in models_dir; the row keeps only the file name.
UPDATE models SET path = regexp_extract(path, '[^/\\]+$');
