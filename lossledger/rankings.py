"""Rankings of samples by a score: the hardest and easiest examples, overall or per class."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import ShapeMismatchError


def top_k(scores: pa.Table, samples: pa.Table, k: int, *, by: str, hardest: bool, per_class: bool) -> pa.Table:
    """The ``k`` samples with the highest (``hardest``) or lowest ``by`` score, or ``k`` per label.

    ``scores``: a table from :meth:`Ledger.scores`; samples never observed (NaN) are never ranked. Returns
    ``rank`` (1-based, within the class when ``per_class``), ``sample_id``, ``label``/``class`` when known, and
    every score column, ordered by (label and) rank; ties are broken by ``sample_id``, so a ranking is
    reproducible. Memory: a few copies of the ``by`` column (8 bytes per sample each), and for ``per_class``
    a sort of the observed samples.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ShapeMismatchError(f"k must be a positive integer, got {k!r}")
    numeric = [f.name for f in scores.schema if pa.types.is_floating(f.type) or f.name == "n_obs"]
    if by not in numeric:
        raise ShapeMismatchError(f"cannot rank by {by!r}; choose one of {numeric}")
    if per_class and "label" not in scores.column_names:
        raise ShapeMismatchError("per_class=True needs labels; create the ledger with labels=...")
    values = scores[by].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # null -> NaN
    ids = scores["sample_id"].to_numpy()
    observed = np.flatnonzero(~np.isnan(values))
    key = -values[observed] if hardest else values[observed]
    if per_class:
        labels = scores["label"].to_numpy(zero_copy_only=False)[observed]
        order = np.lexsort((ids[observed], key, labels))
        sorted_labels = labels[order]
        group_start = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        sizes = np.diff(np.r_[group_start, order.size])
        rank = np.arange(order.size) - np.repeat(group_start, sizes) + 1
        keep = rank <= k
        rows, rank = observed[order[keep]], rank[keep]
    else:
        if key.size > k:  # only the k best and everything tied with the k-th can be in the ranking
            cut = np.partition(key, k - 1)[k - 1]
            near = key <= cut
            observed, key = observed[near], key[near]
        order = np.lexsort((ids[observed], key))[:k]
        rows, rank = observed[order], np.arange(1, order.size + 1)
    table = scores.take(pa.array(rows, pa.int64()))
    table = table.add_column(0, "rank", pa.array(rank, pa.int64()))
    if "class" in samples.column_names:
        classes = _aligned(samples, ids)["class"].take(pa.array(rows, pa.int64()))
        if pa.types.is_dictionary(classes.type):
            classes = classes.cast(classes.type.value_type)
        at = table.column_names.index("label") + 1 if "label" in table.column_names else 2
        table = table.add_column(at, "class", classes)
    return table


def _aligned(samples: pa.Table, ids: np.ndarray) -> pa.Table:
    """``samples`` in the row order of ``ids`` (it already is when both come from one ledger)."""
    sample_ids = samples["sample_id"].to_numpy()
    if sample_ids.size == ids.size and np.array_equal(sample_ids, ids):
        return samples
    order = np.argsort(sample_ids, kind="stable")
    at = np.searchsorted(sample_ids, ids, sorter=order)
    found = at < sample_ids.size
    found[found] = sample_ids[order[at[found]]] == ids[found]
    if not found.all():
        raise ShapeMismatchError(
            f"{int((~found).sum())} sample id(s) of the scores are not in the samples table, e.g. "
            f"{ids[~found][:3].tolist()}; rank scores of this ledger with its own samples table"
        )
    return samples.take(pa.array(order[at], pa.int64()))
