"""Multi-label tasks: an item carries a set of tags (possibly empty), not one class.

Plain functions over arrays, no Prefect, no DuckDB, one concern per module:

* :mod:`~alflow.tasks.multilabel.tags`: tag sets <-> ``;``-separated text <-> the (n_items,
  n_tags) 0/1 tag matrix, and the checks every other module runs at its edge;
* :mod:`~alflow.tasks.multilabel.strategies`: query strategies over the (n_items, n_tags)
  per-tag probability matrix, in the shape of :mod:`alflow.tasks.strategies`;
* :mod:`~alflow.tasks.multilabel.model`: one-vs-rest with the configured classifier and
  per-tag thresholds chosen on out-of-fold predictions, self-training, and the bagged
  members of the ``committee`` strategy;
* :mod:`~alflow.tasks.multilabel.metrics`: micro and macro F1, Hamming loss, subset accuracy.

Agreement over tag sets (MASI distance, Krippendorff's alpha with it, per-tag Cohen's
kappa) is in :mod:`alflow.tasks.agreement`, next to the single-label figures.
"""
