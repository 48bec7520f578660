"""Build a multi-label text set from a single-label one: each document joins one to three
articles of different classes, and its tags are their classes.

Deterministic: the same source and seed give the same CSV, byte for byte. Each source
article is used at most once, so no text is shared between documents (a test split drawn
from the result never holds a sentence of the pool). Per document: the number of articles
is drawn from :data:`CARDINALITY_WEIGHTS` (1: 50%, 2: 35%, 3: 15%), the classes without
replacement in proportion to the articles each class has left (so the classes run out
together), one unused article of each class is taken in a shuffled order, and the
articles are joined with a space in random order. Building stops at ``rows`` documents or
when fewer classes have articles left than the draw asks for. Writes ``text`` and
``labels`` (the tags, sorted, ``;``-separated).

    python benchmarks/make_multilabel.py ../shared/datasets/ag_news_7600.csv ag_news_multilabel.csv
    python benchmarks/make_multilabel.py tests/data/ag_news_800.csv tests/data/ag_news_multilabel_480.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from alflow.tasks.multilabel.tags import format_tags

CARDINALITY_WEIGHTS = {1: 0.50, 2: 0.35, 3: 0.15}
SEED = 0


def build(articles: pd.DataFrame, seed: int = SEED, rows: int | None = None, text_col: str = "text",
          label_col: str = "label", weights: dict[int, float] | None = None) -> pd.DataFrame:
    """Multi-label documents from ``articles`` (one row per single-label article).

    Returns a frame with ``text`` and ``labels`` (sorted tags joined by ``;``), at most
    ``rows`` rows (None: until the articles run out); see the module docstring.
    """
    weights = dict(CARDINALITY_WEIGHTS if weights is None else weights)
    for column in (text_col, label_col):
        if column not in articles.columns:
            raise ValueError(f"the articles have no {column!r} column (columns: {list(articles.columns)})")
    sizes = np.array(sorted(weights), dtype=int)
    p = np.array([weights[s] for s in sizes], dtype=float)
    if sizes.min() < 1 or (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"weights must map tag counts >= 1 to probabilities summing to 1, got {weights}")
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    frame = articles[[text_col, label_col]].dropna()
    texts = frame[text_col].astype(str).str.strip().to_numpy(dtype=object)
    labels = frame[label_col].astype(str).str.strip().to_numpy(dtype=object)
    classes = sorted(set(labels.tolist()))
    format_tags(classes)  # a class name with ';' could not be told apart in the labels cell
    if sizes.max() > len(classes):
        raise ValueError(f"documents of {sizes.max()} articles need {sizes.max()} classes, the articles have "
                         f"{len(classes)}")
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    out_text, out_labels = [], []
    while rows is None or len(out_text) < rows:
        size = int(rng.choice(sizes, p=p))
        left = np.array([len(q) for q in queues], dtype=float)
        if (left > 0).sum() < size:
            break
        chosen = rng.choice(len(classes), size=size, replace=False, p=left / left.sum())
        parts = [texts[queues[c].pop()] for c in chosen]
        out_text.append(" ".join(parts[i] for i in rng.permutation(size)))
        out_labels.append(format_tags(classes[c] for c in chosen))
    return pd.DataFrame({"text": out_text, "labels": out_labels})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a CSV with one single-label article per row")
    parser.add_argument("out", help="where to write the multi-label CSV (text, labels)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--rows", type=int, default=None, help="at most this many documents (default: all)")
    parser.add_argument("--text-col", default="text")
    parser.add_argument("--label-col", default="label")
    args = parser.parse_args(argv)
    built = build(pd.read_csv(args.source), seed=args.seed, rows=args.rows, text_col=args.text_col,
                  label_col=args.label_col)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    built.to_csv(args.out, index=False)
    counts = built["labels"].str.count(";").add(1).value_counts().sort_index()
    print(f"wrote {len(built)} documents to {args.out}; tags per document: "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
