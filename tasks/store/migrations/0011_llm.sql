-- Schema v11: an LLM behind an OpenAI-compatible endpoint ([llm]) as a pre-labeler and a
-- second opinion (alflow.tasks.llm). Its answers are cached per lineage, so nothing is asked
-- twice; what each run asked is counted; a batch item says who suggested its pre-label.

-- One row per lineage: the endpoint, its model name and the prompt (hash of the template,
-- the classes and their descriptions). A change to any of them is a new llm_version, whose
-- answers are asked afresh. `labels`: the class list (JSON) that proba follows.
CREATE TABLE llm_models (
    llm_version INTEGER PRIMARY KEY,
    base_url    VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    prompt_hash VARCHAR NOT NULL,
    labels      VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    UNIQUE (base_url, model, prompt_hash, labels)
);

-- The LLM's answer per (item, lineage), the cache. label, confidence and proba are NULL
-- unless status is 'ok': an answer outside the classes or one that does not parse is kept
-- (and counted) so that it is not asked again, but is never a label. A request that failed
-- (timeout, 429 beyond the cap, 5xx) is not stored: the next cycle asks it again.
CREATE TABLE llm_predictions (
    item_id     VARCHAR NOT NULL,
    llm_version INTEGER NOT NULL,
    label       VARCHAR,                   -- one of llm_models.labels
    confidence  DOUBLE,                    -- p(label) from token log-probabilities; NULL: none given
    proba       DOUBLE[],                  -- over llm_models.labels, from top_logprobs; NULL: none given
    status      VARCHAR NOT NULL CHECK (status IN ('ok', 'outside', 'malformed')),
    created_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (item_id, llm_version)
);

-- What a run asked the LLM, per step ('cold_start': pre-labels of the first batch's
-- candidates; 'second_opinion': the query's uncertain candidates), appended each time it asks.
CREATE TABLE llm_usage (
    flow_run_id       VARCHAR,
    step              VARCHAR NOT NULL,
    llm_version       INTEGER,
    requests          INTEGER NOT NULL,
    failed            INTEGER NOT NULL,
    retried           INTEGER NOT NULL,
    outside           INTEGER NOT NULL,
    malformed         INTEGER NOT NULL,
    prompt_tokens     BIGINT,                  -- NULL: the server reported none
    completion_tokens BIGINT,
    seconds           DOUBLE NOT NULL,
    error             VARCHAR,                 -- why the endpoint was unusable (one line, no key); NULL: it answered
    created_at        TIMESTAMP NOT NULL
);

-- Who suggested a batch item's pre-label: 'model' (the trained model) or 'llm'; NULL
-- without one. Every pre-label before this version was the model's.
ALTER TABLE batch_items ADD COLUMN prelabel_by VARCHAR;
UPDATE batch_items SET prelabel_by = 'model' WHERE prelabel IS NOT NULL;
