"""The review step: the Resume form for a batch, and the other ways answers arrive.

All three ways end in the same ``labels`` rows:

* the Prefect UI's Resume form (:func:`build_review_form`), one dropdown per item with the
  pre-label preselected, so agreeing costs nothing and correcting costs one choice (in a
  multi-label project one multi-select per item, the pre-label's tags chosen);
* the terminal (`alflow label`, see :func:`record_answer`);
* files (:func:`export_batch` / :func:`import_answers`), then `alflow resume`
  (:func:`resume_batch`), which resumes the paused run with the answers already stored.

One module per job:

* :mod:`~alflow.tasks.review.items`: what a review asks (the planned batch, each round's
  items, headings) and its one-line errors;
* :mod:`~alflow.tasks.review.forms`: the Resume form of a round, and reading it back;
* :mod:`~alflow.tasks.review.record`: recording a form round, a terminal answer, the
  simulated annotator;
* :mod:`~alflow.tasks.review.files`: export and import (CSV, JSONL, Label Studio);
* :mod:`~alflow.tasks.review.resume`: resuming a paused run through the Prefect API;
* :mod:`~alflow.tasks.review.liveness`: whether anybody still waits on a batch, and expiry.
"""

from alflow.tasks.review.files import (
    EXPORT_COLUMNS,
    FORMATS,
    export_batch,
    file_format,
    import_answers,
    label_studio_config,
    label_studio_tasks,
)
from alflow.tasks.review.forms import (
    REVIEW_PAUSE_KEY,
    STORED_ANSWERS,
    answers_from_form,
    build_review_form,
    form_defaults,
    form_description,
    review_key,
    shown_form_defaults,
)
from alflow.tasks.review.items import (
    ADJUDICATION,
    ReviewError,
    batch_count_text,
    closed_batch_check,
    field_name,
    field_rank,
    find_batch,
    given_text,
    item_heading,
    legacy_field_name,
    pick_batch,
    plan_review,
    plural,
    prelabel_seen,
    reasked_note,
    review_round_items,
    reviewer_reason,
    shown_prelabel,
    trim,
)
from alflow.tasks.review.liveness import expire_stale_batches
from alflow.tasks.review.record import (
    form_seconds_per_item,
    record_answer,
    record_review_form,
    review_wait_seconds,
    simulated_answers,
)
from alflow.tasks.review.resume import resume_batch, skip_unanswered

__all__ = [
    "ADJUDICATION", "EXPORT_COLUMNS", "batch_count_text", "closed_batch_check", "field_rank", "find_batch",
    "form_description", "legacy_field_name", "plural", "form_seconds_per_item", "prelabel_seen",
    "reasked_note", "reviewer_reason", "shown_prelabel", "skip_unanswered", "FORMATS", "REVIEW_PAUSE_KEY", "STORED_ANSWERS", "ReviewError",
    "answers_from_form", "build_review_form", "expire_stale_batches", "export_batch", "field_name",
    "file_format", "form_defaults", "given_text", "import_answers", "item_heading", "label_studio_config",
    "label_studio_tasks", "pick_batch", "plan_review", "record_answer", "record_review_form", "resume_batch",
    "review_key", "review_round_items", "review_wait_seconds", "shown_form_defaults", "simulated_answers", "trim",
]
