"""Tag sets, their text form and the tag matrix.

* a **tag set**: a ``frozenset`` of tag names; empty means "none of these tags apply" (an
  answer, unlike a skip);
* its **text form**: the names joined by ``;`` in sorted order (``"business;world"``; the
  empty set is ``""``), the ``labels`` cell of a multi-label CSV;
* the **tag matrix**: (n_items, n_tags) uint8, ``Y[i, j] = 1`` when item i carries tag
  ``tags[j]``; the shape every model, metric and strategy function reads.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from alflow.config.settings import TAG_SEPARATOR as SEPARATOR  # one separator for config and answers


def parse_tags(cell) -> frozenset[str]:
    """The tag set of one ``labels`` cell: ``"world; sports"`` -> {"sports", "world"}.

    Names are stripped; empty parts are dropped, so ``""``, ``None`` and NaN (an empty CSV
    cell) all give the empty set.
    """
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return frozenset()
    if not isinstance(cell, str):
        raise ValueError(f"a labels cell must be text with tags separated by {SEPARATOR!r}, got {cell!r}")
    return frozenset(part.strip() for part in cell.split(SEPARATOR) if part.strip())


def format_tags(tag_set: Iterable[str]) -> str:
    """The text form of a tag set: sorted names joined by ``;`` (the empty set: "")."""
    names = sorted(set(tag_set))
    bad = [name for name in names if not isinstance(name, str) or SEPARATOR in name or name != name.strip() or not name]
    if bad:
        raise ValueError(f"tag names must be non-empty text without {SEPARATOR!r} or outer spaces, got {bad[0]!r}")
    return SEPARATOR.join(names)


def check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """``tags`` as a tuple, after checking it names at least one tag, each once."""
    tags = tuple(tags)
    if not tags:
        raise ValueError("tags must name at least one tag")
    if len(set(tags)) != len(tags):
        repeated = sorted({t for t in tags if tags.count(t) > 1})
        raise ValueError(f"tags must be distinct, {repeated[0]!r} is repeated")
    format_tags(tags)  # the same naming rules as a cell's
    return tags


def tag_matrix(tag_sets: Iterable[Iterable[str]], tags: Sequence[str]) -> np.ndarray:
    """(n_items, n_tags) uint8 tag matrix of ``tag_sets`` (one set per item), columns in the
    order of ``tags``. A tag outside ``tags`` is an error naming it."""
    tags = check_tags(tags)
    index = {t: j for j, t in enumerate(tags)}
    rows = [frozenset(s) for s in tag_sets]
    y = np.zeros((len(rows), len(tags)), dtype=np.uint8)
    for i, tag_set in enumerate(rows):
        for tag in tag_set:
            if tag not in index:
                raise ValueError(f"item {i} has tag {tag!r}, which is not one of the tags {list(tags)}")
            y[i, index[tag]] = 1
    return y


def tag_sets(y, tags: Sequence[str]) -> list[frozenset[str]]:
    """The tag set of each row of the (n_items, n_tags) tag matrix ``y``."""
    tags = check_tags(tags)
    y = check_tag_matrix(y, "y", n_tags=len(tags))
    names = np.asarray(tags, dtype=object)
    return [frozenset(names[row.astype(bool)].tolist()) for row in y]


def check_tag_matrix(y, name: str, n_tags: int | None = None, n_items: int | None = None) -> np.ndarray:
    """``y`` as an (n_items, n_tags) uint8 array, after checking it is 2-D and only 0/1;
    ``n_tags``/``n_items``: the sizes it must have. Errors are one line naming ``name``."""
    array = np.asarray(y)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n_items, n_tags) tag matrix, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iuf" or (array.size and not np.isin(array, (0, 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (tag absent / present)")
    if n_tags is not None and array.shape[1] != n_tags:
        raise ValueError(f"{name} has {array.shape[1]} tag columns, expected {n_tags}")
    if n_items is not None and array.shape[0] != n_items:
        raise ValueError(f"{name} has {array.shape[0]} rows, expected {n_items} (one per item)")
    return array.astype(np.uint8)


def check_tag_proba(proba, name: str = "proba", n_tags: int | None = None, n_items: int | None = None) -> np.ndarray:
    """``proba`` as a float (n_items, n_tags) array of per-tag probabilities, after checking it
    is 2-D, finite and within [0, 1] (rows need not sum to 1). Errors name ``name``."""
    array = np.asarray(proba, dtype=float)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{name} must be (n_items, n_tags>=1) per-tag probabilities, got shape {array.shape}")
    if not np.isfinite(array).all() or (array.size and (array.min() < 0.0 or array.max() > 1.0)):
        raise ValueError(f"{name} must hold per-tag probabilities in [0, 1], without NaN")
    if n_tags is not None and array.shape[1] != n_tags:
        raise ValueError(f"{name} has {array.shape[1]} tag columns, expected {n_tags}")
    if n_items is not None and array.shape[0] != n_items:
        raise ValueError(f"{name} has {array.shape[0]} rows, expected {n_items} (one per item)")
    return array


# A record whose gold cell names a tag outside labels: rejected, counted by this reason.
UNKNOWN_TAG = "gold tag not in labels"


def gold_tags(cell: str | None, label_map: dict[str, str], tags: Sequence[str]) -> str | None:
    """The gold text form of a source's labels cell: each tag through ``label_map``, then the
    set's :func:`format_tags` ("" for an empty cell: no tag applies). None (no cell) stays
    None: no gold. Raises ValueError naming the first tag outside ``tags``."""
    if cell is None:
        return None
    mapped = {label_map.get(tag, tag) for tag in parse_tags(cell)}
    outside = sorted(mapped - set(tags))
    if outside:
        raise ValueError(f"tag {outside[0]!r} is not one of {list(tags)}")
    return format_tags(mapped)
