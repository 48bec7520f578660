-- Schema v12: embeddings as features ([model] features = "embeddings" | "tfidf+embeddings").
-- Each item's text (title and text as the model reads it, DOC_SQL) embedded by one embedding
-- model of the [llm] endpoint, stored once: a later cycle, or a model trained anew, reads it
-- here instead of asking the endpoint again. Rows are L2-normalised as the client returns them.
CREATE TABLE embeddings (
    item_id         VARCHAR NOT NULL,
    embedding_model VARCHAR NOT NULL,      -- [llm] embedding_model, as the endpoint names it
    vector          FLOAT[] NOT NULL,      -- (d,) float32
    created_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (item_id, embedding_model)
);
