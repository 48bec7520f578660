"""alflow settings: `alflow.toml` overridden by `ALFLOW_*` environment variables.

Everything is validated once, at start-up, so a typo fails before any data moves. Errors
are one line and name the key (``query.batch_size``) and where it came from (the file or
the environment variable).
"""

from __future__ import annotations

import importlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from alflow.config.sources import GoogleSource, WikipediaSource, YouTubeSource, key_block_name, key_env_name

CONFIG_FILENAME = "alflow.toml"
ENV_PREFIX = "ALFLOW_"
# Environment variables with this prefix that are not settings keys.
ENV_NOT_SETTINGS = {"ALFLOW_CONFIG", "ALFLOW_SKIP_BROWSER_TESTS", "ALFLOW_NO_PROGRESS"}
SKIP = "skip"
# Joins the tags of a multi-label answer (alflow.tasks.multilabel.tags.SEPARATOR).
TAG_SEPARATOR = ";"
# The names of query.strategy (alflow.tasks.strategies.NAMES lists the same).
STRATEGIES = ("least_confidence", "margin", "entropy", "random", "badge", "class_balanced", "committee",
              "cluster_margin")
# The names of query.strategy with task = "multi_label" (alflow.tasks.multilabel.strategies.NAMES).
TAG_STRATEGIES = ("mean_margin", "min_margin", "cardinality_inconsistency", "mmc", "committee", "random")
# evaluation.metric by task (multi-label: alflow.tasks.multilabel.metrics.METRICS).
METRICS = {"single_label": ("accuracy", "macro_f1"),
           "multi_label": ("micro_f1", "macro_f1", "hamming_loss", "subset_accuracy")}
# The defaults of query.strategy and evaluation.metric with task = "multi_label".
TAG_DEFAULTS = {("query", "strategy"): "mean_margin", ("evaluation", "metric"): "micro_f1"}


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid. The message is one line naming the key."""


class _NestedError(ValueError):
    """A validator's error about a key below the field it validates (``loc`` under it)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """The classifier: TF-IDF features into any scikit-learn classifier with predict_proba."""

    # classifier_params is declared before classifier so that the classifier check (which
    # builds it with those parameters) runs last and its errors name ``model.classifier``.
    classifier_params: dict[str, Any] = Field(
        default_factory=lambda: {"C": 10.0, "max_iter": 2000, "class_weight": "balanced"},
        description="Keyword arguments of `classifier`; checked at start-up by building it with them.",
    )
    vectorizer_params: dict[str, Any] = Field(
        default_factory=lambda: {"ngram_range": [1, 2], "sublinear_tf": True},
        description="Keyword arguments of scikit-learn's TfidfVectorizer, which turns each text into the "
                    "classifier's features.",
    )
    vectorizer_fit: Literal["labeled", "pool"] = Field(
        "labeled",
        description='Where the TF-IDF vocabulary and IDF come from: "labeled" (the labeled items, refitted with '
                    'every model) or "pool" (a seeded sample of up to vectorizer_sample pool items, no labels '
                    "used; the saved model carries it, so pre-label and query see the same features).",
    )
    vectorizer_sample: int = Field(
        100_000, ge=100,
        description='With vectorizer_fit = "pool": how many pool items (a seeded sample) the TF-IDF and the LSA '
                    "dimensions are fitted on.",
    )
    svd_components: int = Field(
        0, ge=0, le=1000,
        description="This many LSA dimensions (TruncatedSVD of the pool's TF-IDF, rows L2-normalised) appended "
                    'to the TF-IDF features; 0 = none. Needs vectorizer_fit = "pool".',
    )
    features: Literal["tfidf", "embeddings", "tfidf+embeddings"] = Field(
        "tfidf",
        description='What the classifier reads of a text: "tfidf" (its words), "embeddings" (the vector of [llm] '
                    'embedding_model, each item embedded once and stored) or "tfidf+embeddings" (both side by '
                    'side). With embeddings, [llm] base_url and embedding_model must be set.',
    )
    self_training: Union[Literal["auto"], float] = Field(
        "auto",
        description="Self-training: each new model also trains on the unlabeled pool items a first model of the "
                    "human labels is surest of, labeled as it predicts them, per class self_training times that "
                    "class's human labels. \"auto\": share 1.0, used in a retrain only where out-of-fold evidence "
                    "on the human labels says it helps by more than its noise; a number from 0 (human labels "
                    "only) to 10 forces it.",
    )
    self_training_sample: int = Field(
        10_000, ge=100,
        description="How many unlabeled pool items (a seeded sample, never a held-out one) self-training reads "
                    "to find the ones it is surest of.",
    )
    tag_thresholds: Literal["fixed", "out_of_fold"] = Field(
        "fixed",
        description='task = "multi_label" only: where a tag is predicted. "fixed": probability >= 0.5 for every '
                    'tag; "out_of_fold": per tag, the cut maximising its F1 on out-of-fold predictions of the '
                    "labeled items (measured worse on actively picked items: docs/multi-label.md).",
    )

    @field_validator("self_training", mode="before")
    @classmethod
    def _auto_or_share(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):  # an ALFLOW_MODEL__SELF_TRAINING value is text: "0", "1.5"
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f'must be "auto" or a number from 0 (off) to 10, got {value!r}') from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 10.0:
            raise ValueError(f'must be "auto" or a number from 0 (off) to 10, got {value!r}')
        return float(value)

    @field_validator("svd_components")
    @classmethod
    def _svd_needs_pool(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("vectorizer_fit") == "labeled":
            raise ValueError('needs vectorizer_fit = "pool" (LSA dimensions are fitted on the pool)')
        return value

    @field_validator("features")
    @classmethod
    def _lsa_is_tfidf_only(cls, value: str, info: ValidationInfo) -> str:
        if value != "tfidf" and info.data.get("svd_components"):
            raise ValueError(f'{value!r} with svd_components: LSA dimensions are for features = "tfidf" only')
        return value

    @model_serializer(mode="wrap")
    def _default_features_unwritten(self, handler):
        # A model's params are stored and matched as JSON: leaving the default out keeps
        # every TF-IDF model's params what they were before this key existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("features") == "tfidf":
            del data["features"]
        return data
    classifier: str = Field(
        "sklearn.linear_model.LogisticRegression", validate_default=True,
        description="Any scikit-learn classifier with predict_proba, by import path; it reads the TF-IDF "
                    "features.",
    )

    @field_validator("classifier")
    @classmethod
    def _importable_with_proba(cls, value: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get("check_model", True):
            return value  # a command that builds no model (load_config's check_model)
        klass = import_object(value)
        if not callable(klass):
            raise ValueError(f"{value} is not a class")
        if "classifier_params" not in info.data:
            return value  # classifier_params itself is invalid; that error is reported
        try:
            estimator = klass(**info.data["classifier_params"])
        except TypeError as exc:
            raise ValueError(f"classifier_params do not fit {value}: {exc}") from None
        if not hasattr(estimator, "predict_proba"):
            raise ValueError(
                f"{value} has no predict_proba with these parameters "
                "(uncertainty needs class probabilities)"
            )
        return value


class QuerySettings(_Section):
    """Which items to ask the human about."""

    strategy: Literal["least_confidence", "margin", "entropy", "random", "badge", "class_balanced",
                      "committee", "cluster_margin", "mean_margin", "min_margin", "cardinality_inconsistency",
                      "mmc"] = Field(
        "margin",
        description="How the batch is picked from the pre-labeled pool (margin: p(top1) - p(top2), smallest "
                    "first). Compare them on your data with `alflow simulate`. With task = \"multi_label\": "
                    "mean_margin (the default there), min_margin, cardinality_inconsistency, mmc, committee or "
                    "random.",
    )
    batch_size: int = Field(20, ge=1, le=500, description="Items per review batch.")
    exploration: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Share of each batch drawn at random from the pool (finds what the model is blind to).",
    )
    near_duplicate: float | None = Field(
        0.9, gt=0.0, le=1.0,
        description="A pick whose TF-IDF cosine similarity to another pick or to a labeled item is at least "
                    "this is dropped, so a reviewer never sees the same text twice; unset turns it off.",
    )
    candidates: int = Field(
        10, ge=1, le=1000,
        description="badge, committee and cluster_margin look at the batch_size x candidates smallest-margin "
                    "items (multi-label committee: the most uncertain by mean margin).",
    )
    cold_start: Literal["coverage", "random"] = Field(
        "coverage",
        description='With no model yet: "coverage" (one item per TF-IDF cluster) or "random".',
    )
    # Large enough that Prefect's per-task cost (tens of ms) is lost in the scoring, small
    # enough to stay a few tens of MB in flight.
    chunk_size: int = Field(
        20000, ge=100,
        description="Pool items per pre-label task (one streaming read from DuckDB, one score-chunk task on "
                    "the [runner]).",
    )
    coverage_sample: int = Field(
        20000, ge=100,
        description="The coverage cold start clusters this many pool items at most (a seeded sample beyond it).",
    )
    control_share: float = Field(
        0.05, ge=0.0, le=0.5,
        description="The random control slice: this share of each batch (at least one item; 0 turns it off) "
                    "is drawn uniformly from the pool and shown blind (no pre-label anywhere). Its answers are "
                    "a growing random test set on which every model is scored.",
    )
    control_trains: bool = Field(
        False,
        description="false: control answers never train a model, so every model (the newest included) has an "
                    "honest estimate. true: they train later models too, and a model is scored only on the "
                    "control answers given after it was trained.",
    )
    recheck_share: float = Field(
        0.1, ge=0.0, le=0.5,
        description="At most this share of each batch asks again the items the last label check flagged as "
                    "likely label errors (picked_by recheck: nothing preselected; the earlier answers and the "
                    "model's suggestion are shown beside the item).",
    )


class ReviewSettings(_Section):
    """The pause for human review."""

    timeout_hours: float = Field(
        168.0, gt=0,
        description="How long a run stopped for review waits before it fails; answers already stored stay "
                    "and train the next cycle.",
    )
    max_open_batches: int = Field(
        1, ge=1, le=100,
        description="A cycle that finds this many batches waiting for review asks nothing new: it ingests, "
                    "pre-labels and ends Completed naming the waiting batch (raise it to queue batches).",
    )
    poll_interval_seconds: int = Field(
        5, ge=1, le=600, description="How often a paused run (`alflow run`) checks whether it was resumed."
    )
    text_chars: int = Field(600, ge=40, description="Characters of each item's text shown in the Resume form.")
    annotator: str = Field(
        "annotator", min_length=1, max_length=64, pattern=r"^[\w.@-]+$",
        description="Who answers, unless said otherwise: the Resume form's Annotator field starts with it, and "
                    "`alflow label`, `import` and `resume` use it without --annotator.",
    )
    overlap: int = Field(
        1, ge=1, le=10,
        description="Independent answers (distinct annotators) asked for the overlap_share of each batch; the "
                    "run stops for review again until they are in (1: one answer per item).",
    )
    overlap_share: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Share of each batch (drawn at random, at least one item) that needs overlap answers.",
    )
    adjudication_threshold: float = Field(
        0.5, ge=0.0, le=1.0,
        description="An item whose answers tie, or whose share of answers disagreeing with the majority is "
                    "above this, is adjudicated at the top of the next batch.",
    )
    adjudication_distance: float = Field(
        0.6, ge=0.0, le=1.0,
        description='task = "multi_label": an item whose annotators\' tag sets tie, or of which two are farther '
                    "apart than this MASI distance, is adjudicated at the top of the next batch. 0.6 lets a "
                    "majority stand against a set that only adds or drops one tag of two or more (MASI <= 0.56) "
                    "and adjudicates a swapped tag (>= 0.78 in sets of up to five tags), a tag added to a "
                    "single tag (0.67) and disjoint sets (1).",
    )
    max_form_seconds_per_item: float = Field(
        120.0, gt=0.0,
        description="A Resume form's wall-clock wait is not labeling time (it may sit open over a weekend): it "
                    "is stored apart (labels.form_seconds), divided over its items and capped at this.",
    )


class EvaluationSettings(_Section):
    """How a model is scored. ``holdout`` needs gold labels in a source."""

    method: Literal["cv", "holdout"] = Field(
        "cv",
        description='"holdout": score on gold-labeled items kept out of the pool (needs a source with '
                    'label_column); "cv": stratified cross-validation on the labels given so far.',
    )
    metric: Literal["accuracy", "macro_f1", "micro_f1", "hamming_loss", "subset_accuracy"] = Field(
        "macro_f1",
        description="What promotion compares, and what the target stopping rule and self-training's evidence "
                    "read. With task = \"multi_label\": micro_f1 (the default there), macro_f1, hamming_loss "
                    "(lower is better) or subset_accuracy.",
    )
    cv_folds: int = Field(
        5, ge=2, le=20,
        description="Folds of the cross-validation (method = \"cv\") and of the label check's out-of-fold "
                    "probabilities.",
    )
    holdout_fraction: float = Field(
        0.2, gt=0.0, lt=0.9,
        description='Share of the gold-labeled items held out of the pool as the test set (method = "holdout").',
    )


class StoppingSettings(_Section):
    """When the loop stops asking. Every rule is reported each cycle; a rule with its
    threshold set stops the loop (and a served schedule opens no more batches)."""

    budget: int | None = Field(
        None, ge=1, description="Stop once this many items are answered (labeled, tied or skipped)."
    )
    budget_minutes: float | None = Field(
        None, gt=0.0,
        description="Stop once this many minutes of labeling time measured per item (the terminal, Label "
                    "Studio's lead_time, an import's seconds column) are spent; a Resume form's wait never "
                    "counts.",
    )
    target: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Stop once the newest model's control-slice estimate reaches this, when the slice has "
                    "target_min_control answers (evaluation.metric where the slice has every class, else "
                    "accuracy); before that, the cycle's holdout or CV evaluation.metric. The report says which.",
    )
    target_min_control: int = Field(
        30, ge=1, description="Control answers the target rule needs before it reads the control-slice estimate."
    )
    target_bound: Literal["lower", "point"] = Field(
        "lower",
        description="\"lower\": the target is reached when the 95% interval's lower bound reaches it; \"point\": "
                    "when the estimate itself does.",
    )
    stabilizing_kappa: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Stabilizing predictions: stop once Cohen's kappa between successive models' predictions "
                    "on the fixed stop set is at least this for stabilizing_cycles cycles in a row.",
    )
    stabilizing_cycles: int = Field(
        3, ge=1, le=50, description="Cycles in a row the stabilizing_kappa rule needs."
    )
    stop_set_size: int = Field(
        1000, ge=10, description="Items of the stop set (a seeded sample, chosen once) the kappa is measured on."
    )


class StoreSettings(_Section):
    """The DuckDB store: waits for other processes and cycles."""

    lock_timeout_seconds: float = Field(
        30.0, ge=0,
        description="How long a write waits for another process holding the DuckDB file before it fails "
                    "naming the holder's PID.",
    )
    cycle_lock_timeout_seconds: float = Field(
        600.0, ge=0,
        description="How long a cycle waits for another cycle working on the same database (the cycle lock) "
                    "before it gives up: at the start it then ends Completed having done nothing, after the "
                    "review it fails with the answers kept.",
    )
    lease_seconds: float = Field(
        120.0, gt=0,
        description="The cycle lock is a lease of this many seconds, renewed every third of it while its cycle "
                    "works: a holder that stops renewing (killed, its host down) is taken over once it runs "
                    "out, on whatever host it ran.",
    )


class RunnerSettings(_Section):
    """Where pre-label and holdout-evaluation chunks are scored: Prefect's task runner. The
    flow stays the one writer into DuckDB; workers only score and return arrays."""

    # TF-IDF is pure Python and holds the GIL, so only processes score a big pool in
    # parallel; a small one is not worth the cluster's few seconds of start-up.
    type: Literal["auto", "threads", "dask"] = Field(
        "auto",
        description="\"threads\": Prefect's thread pool on this machine; \"dask\": prefect-dask (a LocalCluster of "
                    'workers processes, or the scheduler at dask_address); "auto": Dask for a pre-label or a '
                    "holdout evaluation of at least dask_min_items items, or of more than one chunk when this "
                    "process's LocalCluster is already up; threads otherwise.",
    )
    workers: int = Field(
        2, ge=1, le=256,
        description="Threads, or the local Dask cluster's worker processes (ignored with dask_address).",
    )
    dask_min_items: int = Field(
        200_000, ge=0,
        description='With type = "auto": pre-labels and holdout evaluations of at least this many items run on '
                    "Dask.",
    )
    dask_address: str = Field(
        "",
        description='A running Dask scheduler ("tcp://10.0.0.5:8786") whose workers have alflow installed; '
                    '"" starts a LocalCluster of workers processes when a step first needs it.',
    )
    # A cycle's pre-label and its holdout evaluation, and the cycles of one `alflow run`,
    # are seconds apart: the workers' start-up and imports are paid once, not per step.
    dask_idle_seconds: float = Field(
        60.0, ge=0,
        description="How long the LocalCluster stays up after the last step that used it, for the next one (a "
                    "cycle's holdout evaluation, the next cycle) to find its workers started; 0 stops it after "
                    "each step. Ignored with dask_address.",
    )

    @field_validator("dask_address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value and "://" not in value:
            raise ValueError(f"{value!r} is not a scheduler address like \"tcp://10.0.0.5:8786\"")
        return value


class ScheduleSettings(_Section):
    """When `alflow serve` runs the flows: cron strings, "" for no schedule."""

    cycle: str = Field(
        "", description='Cron string of the cycle deployment, e.g. "0 6 * * *" (every morning); "" = no schedule.'
    )
    ingest: str = Field(
        "", description='Cron string of the ingest deployment, e.g. "0 * * * *" (every hour); "" = no schedule.'
    )
    timezone: str = Field("UTC", description='The time zone of both cron strings, e.g. "Europe/Berlin".')

    @field_validator("cycle", "ingest")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = value.strip()
        if value:
            from pydantic import ValidationError as Invalid
            from prefect.client.schemas.schedules import CronSchedule

            try:  # Prefect's own check: what it accepts, nothing else
                CronSchedule(cron=value)
            except Invalid:
                raise ValueError(f"{value!r} is not a cron string like \"0 6 * * *\"") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone name like \"Europe/Berlin\"") from None
        return value


DEFAULT_LLM_PROMPT = (
    "Classify the text into exactly one of these labels: {labels}.\n"
    "{descriptions}\n"
    'Answer with JSON only: {"label": "<one of the labels>"}.\n'
    "\n"
    "Text:\n"
    "{text}"
)
# [llm] prompt's default with task = "multi_label": a tag set, several or none.
DEFAULT_LLM_TAG_PROMPT = (
    "Tag the text with every one of these tags that applies: {labels}. Several tags may apply, or none.\n"
    "{descriptions}\n"
    'Answer with JSON only: {"tags": [<the tags that apply>]}, or {"tags": []} when none applies.\n'
    "\n"
    "Text:\n"
    "{text}"
)


class LLMSettings(_Section):
    """An OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp, LM Studio) for zero-shot
    pre-labels, a second opinion for querying and embeddings as features. The key is named
    here (an environment variable or a Prefect Secret block), never written here."""

    base_url: str | None = Field(
        None,
        description='The endpoint\'s OpenAI-compatible API root, e.g. "http://localhost:11434/v1" (Ollama) or '
                    '"http://localhost:8000/v1" (vLLM); unset turns the LLM off.',
    )
    model: str | None = Field(
        None, min_length=1,
        description='The chat model that pre-labels, as the endpoint names it (e.g. "llama3.1:8b"); unset: no '
                    "LLM pre-labels.",
    )
    embedding_model: str | None = Field(
        None, min_length=1,
        description='The embedding model for [model] features with embeddings (e.g. "nomic-embed-text").',
    )
    api_key_env: str | None = Field(
        None,
        description="The NAME of the environment variable holding the API key, sent as a Bearer token (at most "
                    "one of api_key_env, api_key_secret; neither: no key, as local servers need).",
    )
    api_key_secret: str | None = Field(
        None,
        description="The name of the Prefect Secret block holding the API key (at most one of api_key_env, "
                    "api_key_secret).",
    )
    prompt: str = Field(
        DEFAULT_LLM_PROMPT,
        description="The message sent for each item: {labels} becomes the classes, {descriptions} one line "
                    "per described class (label_descriptions), {text} the item's text; other braces are "
                    'literal. Needs {labels} and {text}. Left unset with task = "multi_label", a default '
                    "asking for every tag that applies (several or none) as a JSON array.",
    )
    label_descriptions: dict[str, str] = Field(
        default_factory=dict,
        description='One line per class telling the model what it means, e.g. { spam = "unsolicited '
                    'advertising" }; keys must be classes of labels.',
    )
    max_concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    timeout_seconds: float = Field(
        30.0, gt=0, le=600, description="A request with no answer after this many seconds is retried, then failed."
    )
    max_text_chars: int = Field(
        4000, ge=100, le=1_000_000,
        description="Characters of an item's text sent in a prompt or for an embedding (its start): a whole "
                    "article would overflow a local model's context (Ollama's default is 2,048-4,096 tokens) "
                    "and fail that item. Part of the prompt's lineage; stored vectors are not re-embedded "
                    "when it changes.",
    )
    max_items_per_cycle: int = Field(
        200, ge=1, le=100_000, description="At most this many items are sent for an LLM pre-label per cycle."
    )
    retries: int = Field(
        2, ge=0, le=10,
        description="Retries of a request that failed in a way that may pass (a timeout, 429, 5xx, a lost "
                    "connection), after the first attempt.",
    )
    retry_wait_seconds: float = Field(
        1.0, ge=0, le=60, description="Seconds before the first retry, doubled for each next one."
    )
    max_retry_after_seconds: float = Field(
        60.0, ge=0,
        description="The longest Retry-After (429) a request waits; a longer one fails that request with a line "
                    "naming the wait.",
    )
    embedding_batch_size: int = Field(
        64, ge=1, le=4096, description="Texts per /embeddings request."
    )
    second_opinion: bool = Field(
        False,
        description="Rank high the items where the trained model and the LLM disagree (a strategy composed with "
                    "query.strategy); unset: true when base_url and model are set.",
    )
    weak_label_confidence: float | None = Field(
        None, gt=0.0, le=1.0,
        description="LLM pre-labels at least this confident join self-training as weak labels (never as human "
                    'answers); unset: no weak labels. Not with task = "multi_label" (a tag set has no '
                    "confidence).",
    )

    @model_validator(mode="before")
    @classmethod
    def _second_opinion_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("second_opinion") is None:
            data = {**data, "second_opinion": bool(data.get("base_url") and data.get("model"))}
        return data

    @field_validator("base_url")
    @classmethod
    def _api_root(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # ALFLOW_LLM__BASE_URL="" turns it off too
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f'must be an http(s) URL like "http://localhost:11434/v1" (got {value!r})')
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return key_env_name(value, "OPENAI_API_KEY")

    @field_validator("api_key_secret")
    @classmethod
    def _block_name(cls, value: str | None) -> str | None:
        return key_block_name(value)

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        missing = [name for name in ("{labels}", "{text}") if name not in value]
        if missing:
            raise ValueError(f"needs the placeholders {{labels}} and {{text}}; {' and '.join(missing)} missing")
        return value

    @field_validator("label_descriptions")
    @classmethod
    def _one_line_each(cls, value: dict[str, str]) -> dict[str, str]:
        for label, line in value.items():
            if "\n" in line.strip() or not line.strip():
                raise _NestedError((label,), "must be one non-empty line")
        return {label: line.strip() for label, line in value.items()}

    @model_validator(mode="after")
    def _coherent(self) -> "LLMSettings":
        if self.api_key_env is not None and self.api_key_secret is not None:
            raise _NestedError(("api_key_secret",), "set at most one of api_key_env and api_key_secret")
        if self.base_url is None:
            return self
        if self.model is None and self.embedding_model is None:
            raise _NestedError(("model",), "base_url is set but neither model nor embedding_model is")
        for key in ("second_opinion", "weak_label_confidence"):
            if getattr(self, key) and self.model is None:
                raise _NestedError((key,), "needs [llm] model (the chat model that pre-labels)")
        return self


class FilesSource(_Section):
    """A local file or folder: CSV, JSONL, Parquet, or a folder of .txt files."""

    type: Literal["files"] = Field(..., description="The source type.")
    name: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[\w.-]+$",
        description="The source's unique name, stored with its items.",
    )
    path: Path = Field(
        ...,
        description="The file (CSV, JSONL, Parquet) or folder of .txt files, relative to the config file's folder.",
    )
    format: Literal["auto", "csv", "jsonl", "parquet", "txt"] = Field(
        "auto",
        description='"auto" tells it from the name: .csv, .jsonl or .ndjson, .parquet or .pq; a folder is txt '
                    "(each .txt file below it an item, its name the title).",
    )
    text_column: str = Field("text", description="The column (or JSON field) holding the text.")
    title_column: str | None = Field(None, description="The column holding a title, if any.")
    id_column: str | None = Field(None, description="The column holding the source's own id (external_id).")
    url_column: str | None = Field(None, description="The column holding a URL, if any.")
    label_column: str | None = Field(
        None,
        description="The column holding gold labels: used for the holdout and `alflow run --auto`, never shown "
                    "to a reviewer.",
    )
    label_from_folder: bool = Field(
        False, description="For a folder of .txt files: take the gold label from each file's parent folder name."
    )
    label_map: dict[str, str] = Field(
        default_factory=dict,
        description='Gold label values as the source spells them -> a class of labels, e.g. { 0 = "ham", 1 = '
                    '"spam" }; values not in the map are kept as they are and must be classes themselves.',
    )
    encoding: str = Field(
        "utf-8",
        description="How the file's bytes are text: any Python codec name (\"latin-1\", \"cp1252\", \"utf-16\"). A row "
                    "that does not decode is counted as undecodable; a header that does not decode stops the "
                    "source naming this key.",
    )
    delimiter: str = Field(
        ",", min_length=1, max_length=1,
        description='The CSV field separator: one character, e.g. ";" or "\\t". A header that comes out as one '
                    "column holding another separator stops the source naming this key.",
    )
    # A longer text is not an item but a file read wrong (an unclosed quote swallows the rows
    # after it).
    max_text_chars: int = Field(
        100_000, ge=1,
        description="A longer text is rejected and counted (\"text longer than max_text_chars\").",
    )

    @field_validator("encoding")
    @classmethod
    def _codec(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not a Python codec name like \"utf-8\" or \"latin-1\"") from None
        return value


SourceSettings = Annotated[
    Union[FilesSource, WikipediaSource, YouTubeSource, GoogleSource], Field(discriminator="type")
]


class Settings(_Section):
    """All of alflow's settings. Paths are resolved against the config file's folder."""

    task: Literal["single_label", "multi_label"] = Field(
        "single_label",
        description='"single_label": an item gets one of labels. "multi_label": labels is a tag set and an item '
                    "gets any subset of it, possibly empty (none of these tags apply), which is an answer, unlike "
                    "a skip.",
    )
    labels: list[str] = Field(
        ..., min_length=2,
        description='The classes a reviewer chooses from, in order ("skip" is reserved: it is always offered); '
                    'with task = "multi_label", the tags.',
    )
    database: Path = Field(
        Path(".alflow/alflow.duckdb"),
        description="The DuckDB file holding items, predictions, batches, labels, models and cycles.",
    )
    models_dir: Path = Field(Path(".alflow/models"), description="Where model files (skops format) are written.")
    seed: int = Field(
        0, description="Seeds every random choice (cold start, exploration, control slice, CV folds): the same "
                       "seed gives the same batches.",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    stopping: StoppingSettings = Field(default_factory=StoppingSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    schedules: ScheduleSettings = Field(default_factory=ScheduleSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings, validate_default=True)
    sources: list[SourceSettings] = Field(
        default_factory=list, description="The [[sources]] tables: where items come from."
    )
    # Where the file came from; not a setting a user writes.
    config_path: Path | None = Field(None, exclude=True)

    @field_validator("labels")
    @classmethod
    def _labels_distinct(cls, value: list[str]) -> list[str]:
        cleaned = [label.strip() for label in value]
        if any(not label for label in cleaned):
            raise ValueError("a class name is empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"class names repeat: {cleaned}")
        if SKIP in cleaned:
            raise ValueError(f"'{SKIP}' is reserved for skipped items; rename that class")
        if any(TAG_SEPARATOR in label for label in cleaned):
            # A multi-label answer is stored as its tags joined by the separator; a single-label
            # class with it would read back as two tags if the project ever became multi-label.
            bad = next(label for label in cleaned if TAG_SEPARATOR in label)
            raise ValueError(f"class name {bad!r} contains {TAG_SEPARATOR!r}, which separates tags")
        return cleaned

    @field_validator("sources")
    @classmethod
    def _source_names_unique(cls, value: list) -> list:
        names = [source.name for source in value]
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {names}")
        return value

    @field_validator("sources")
    @classmethod
    def _label_maps_name_classes(cls, value: list, info: ValidationInfo) -> list:
        labels = info.data.get("labels")
        if labels is None:
            return value  # labels itself is invalid; that error is reported
        for index, source in enumerate(value):
            for raw, mapped in source.label_map.items():
                if mapped not in labels:
                    raise _NestedError(
                        (index, "label_map"),
                        f"{raw!r} maps to {mapped!r}, which is not one of labels {labels}",
                    )
        return value

    @field_validator("llm")
    @classmethod
    def _llm_descriptions_name_classes(cls, value: LLMSettings, info: ValidationInfo) -> LLMSettings:
        labels = info.data.get("labels")
        if labels is None:
            return value  # labels itself is invalid; that error is reported
        for label in value.label_descriptions:
            if label not in labels:
                raise _NestedError(("label_descriptions", label), f"is not one of labels {labels}")
        return value

    @field_validator("llm")
    @classmethod
    def _llm_embeds_for_features(cls, value: LLMSettings, info: ValidationInfo) -> LLMSettings:
        model = info.data.get("model")
        if model is not None and model.features != "tfidf":
            missing = [key for key in ("base_url", "embedding_model") if getattr(value, key) is None]
            if missing:
                raise _NestedError((missing[0],), f'needs to be set: model.features = "{model.features}" '
                                                  "embeds through [llm]")
        return value

    @model_validator(mode="after")
    def _task_names(self) -> "Settings":
        """query.strategy and evaluation.metric name things of this task; left unset with
        task = "multi_label", they take that task's defaults (TAG_DEFAULTS)."""
        allowed = {("query", "strategy"): TAG_STRATEGIES if self.task == "multi_label" else STRATEGIES,
                   ("evaluation", "metric"): METRICS[self.task]}
        for (section, key), names in allowed.items():
            part = getattr(self, section)
            if self.task == "multi_label" and key not in part.model_fields_set:
                # frozen: the section is replaced by a copy with the multi-label default
                object.__setattr__(self, section, part.model_copy(update={key: TAG_DEFAULTS[(section, key)]}))
            elif getattr(part, key) not in names:
                raise _NestedError((section, key), f"{getattr(part, key)!r} is not a {self.task} choice (task = "
                                                   f"{self.task!r}); choose from {list(names)}")
        return self

    @model_validator(mode="after")
    def _llm_for_tags(self) -> "Settings":
        """With task = "multi_label" the LLM answers tag sets: its prompt, left unset, asks
        for them (DEFAULT_LLM_TAG_PROMPT); weak labels, which need a confidence, are refused."""
        if self.task != "multi_label":
            return self
        if self.llm.weak_label_confidence is not None:
            raise _NestedError(("llm", "weak_label_confidence"), 'is not used with task = "multi_label": an LLM '
                                                                 "tag set has no confidence (docs/llm.md); remove it")
        if "prompt" not in self.llm.model_fields_set:
            object.__setattr__(self, "llm", self.llm.model_copy(update={"prompt": DEFAULT_LLM_TAG_PROMPT}))
        return self

    @property
    def db_path(self) -> str:
        return str(self.database)

    @property
    def holdout_fraction(self) -> float | None:
        """The share of gold-labeled items held out of the pool for evaluation, or None
        when models are scored by cross-validation (nothing is held out)."""
        ev = self.evaluation
        return ev.holdout_fraction if ev.method == "holdout" else None


def import_object(dotted: str) -> Any:
    """`package.module.Name` -> the object, with an error that names the path."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"'{dotted}' is not an import path like package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module '{module_name}': {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module '{module_name}' has no '{attr}'") from None


def _env_overrides(environ: dict[str, str]) -> dict[tuple[str, ...], tuple[Any, str]]:
    """`ALFLOW_QUERY__BATCH_SIZE=50` -> {("query", "batch_size"): (50, "ALFLOW_QUERY__BATCH_SIZE")}.

    Settings are the names ``ALFLOW_<SECTION>__<KEY>`` and ``ALFLOW_<TOP-LEVEL KEY>``
    (``ALFLOW_DATABASE``, ``ALFLOW_LABELS``, ...); any other ``ALFLOW_*`` name is ignored,
    and an unknown section or key in a ``__`` name is an error naming the variable.
    """
    overrides = {}
    top_level = set(Settings.model_fields) - {"config_path"}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX):]
        if "__" not in key and key.lower() not in top_level:
            continue  # not a setting: deployments export names like ALFLOW_REPO for their own use
        path = tuple(part.lower() for part in key.split("__"))
        if not all(path):
            raise ConfigError(f"{name}: malformed name; nested keys use '__', e.g. ALFLOW_QUERY__BATCH_SIZE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as a path or strategy name
        if not isinstance(value, (list, dict)) and value is not None:
            # A scalar stays the string it was: validation converts "50" to 50 for an int
            # key, and a string key (an annotator named 007 or 123) keeps its text.
            value = raw
        overrides[path] = (value, name)
    return overrides


def _apply(data: dict, path: tuple[str, ...], value: Any, origin: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _format_error(exc: ValidationError, origins: dict[tuple[str, ...], str], default_origin: str) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    nested = (first.get("ctx") or {}).get("error")
    if isinstance(nested, _NestedError):
        loc += tuple(str(part) for part in nested.loc)
    key = ".".join(loc) or "(top level)"
    origin = default_origin
    for path, env_name in origins.items():
        # the error is at or below the variable's key, or it is about a section the
        # variable made up (ALFLOW_REPO__PATH: an unknown section 'repo')
        if tuple(loc[: len(path)]) == path or (loc and path[: len(loc)] == loc):
            origin = env_name
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"] != "value_error":
        message += f" (got {first['input']!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{origin}: {key}: {message}{more}"


def find_config(path: str | os.PathLike | None = None) -> Path:
    """The config file to use: the argument, else $ALFLOW_CONFIG, else ./alflow.toml."""
    chosen = path or os.environ.get("ALFLOW_CONFIG") or CONFIG_FILENAME
    resolved = Path(chosen).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(
            f"{chosen}: config file not found (create one with `alflow init` or pass --config)"
        )
    return resolved


def load_config(
    path: str | os.PathLike | None = None, environ: dict[str, str] | None = None, *, check_model: bool = True
) -> Settings:
    """Read, merge and validate the settings. Raises ConfigError with a one-line message.

    ``check_model``: import ``model.classifier`` and check it takes ``classifier_params``
    and has predict_proba. Commands that build no model (ingest) pass False: importing
    scikit-learn is about 1.4 s, a tenth of `alflow ingest` on a million rows; every
    command that trains or scores checks it."""
    config_path = find_config(path)
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not UTF-8 text: {exc}") from None
    overrides = _env_overrides(dict(os.environ if environ is None else environ))
    origins = {}
    for key_path, (value, env_name) in overrides.items():
        _apply(data, key_path, value, env_name)
        origins[key_path] = env_name
    # A missing [model] table would be built by its default factory, which validation's
    # context never reaches: the classifier would be imported whatever check_model says.
    data.setdefault("model", {})
    try:
        settings = Settings.model_validate(data, context={"check_model": check_model})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origins, str(config_path))) from None
    return _resolve_paths(settings, config_path)


def _resolve_paths(settings: Settings, config_path: Path) -> Settings:
    base = config_path.parent

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    sources = [source.model_copy(update={"path": resolve(source.path)}) if isinstance(source, FilesSource)
               else source for source in settings.sources]
    return settings.model_copy(
        update={
            "database": resolve(settings.database),
            "models_dir": resolve(settings.models_dir),
            "sources": sources,
            "config_path": config_path,
        }
    )
