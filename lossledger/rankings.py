"""Rankings of samples by a score: the hardest and easiest examples, overall or per class, in one streaming pass."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ._commit import read_run_attrs, stream_meta
from ._scoring import score_batches
from .errors import ShapeMismatchError
from .scores import null_to_nan

if TYPE_CHECKING:
    from .ledger import Ledger


def top_k(
    ledger: Ledger,
    k: int,
    run: str,
    stream: str,
    *,
    by: str,
    dt: str,
    hardest: bool,
    per_class: bool,
    ticks: Any,
) -> pa.Table:
    """:meth:`Ledger.top`: :func:`rank` over the scores of ``stream`` in ``run``, read batch by batch from the
    score cache (computed into it first when stale), or computed batch by batch for a window.

    Memory: one batch of scores (~20 MB) and the ``k`` rows kept (``k`` per label), plus the score engine's
    while computing (the scan's slabs and a block's state); never a column of all samples.
    """
    stream_meta(ledger._io, run, stream, read_run_attrs(ledger._io, run)["commit"], ledger.n_samples)
    schema, batches = score_batches(ledger._io, ledger._samples, run, stream, dt, ticks)
    return rank(schema, batches, k, by=by, hardest=hardest, per_class=per_class, classes=ledger.classes)


def rank(
    schema: pa.Schema,
    batches: Iterable[pa.RecordBatch],
    k: int,
    *,
    by: str,
    hardest: bool,
    per_class: bool,
    classes: Sequence[str] | None = None,
) -> pa.Table:
    """The ``k`` samples with the highest (``hardest``) or lowest ``by`` score, or ``k`` per label.

    ``schema`` and ``batches``: scores as :meth:`Ledger.scores` has them (a table's ``schema`` and
    ``to_batches()``), missing as NaN or null; samples never observed are never ranked. ``classes``: the
    label names, added as a ``class`` column. Returns ``rank`` (1-based, within the class when ``per_class``),
    ``sample_id``, ``label``/``class`` when known, and every score column (missing as NaN), ordered by (label
    and) rank; ties are broken by ``sample_id``, so a ranking is reproducible. Arguments are checked before
    the first batch is asked for. Memory: one batch and the rows kept so far (``k``, or ``k`` per label):
    O(k), whatever the number of samples.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ShapeMismatchError(f"k must be a positive integer, got {k!r}")
    numeric = [f.name for f in schema if pa.types.is_floating(f.type) or f.name == "n_obs"]
    if by not in numeric:
        raise ShapeMismatchError(f"cannot rank by {by!r}; choose one of {numeric}")
    if per_class and "label" not in schema.names:
        raise ShapeMismatchError("per_class=True needs labels; create the ledger with labels=...")
    kept = schema.empty_table()
    ranks = np.zeros(0, np.int64)
    for batch in batches:
        key, ids, labels = _keys(batch, by, hardest, per_class)
        observed = np.flatnonzero(~np.isnan(key))
        if observed.size == 0:
            continue
        chosen, _ = _best(key[observed], ids[observed], None if labels is None else labels[observed], k)
        # The best of this batch join the best so far; only the best of those are kept.
        kept = pa.concat_tables([kept, pa.Table.from_batches([batch.take(pa.array(observed[chosen]))])])
        key, ids, labels = _keys(kept, by, hardest, per_class)
        chosen, ranks = _best(key, ids, labels, k)
        kept = kept.take(pa.array(chosen, pa.int64()))
    table = null_to_nan(kept.combine_chunks()).add_column(0, "rank", pa.array(ranks, pa.int64()))
    if classes is not None and "label" in table.column_names:
        names = np.asarray(classes, dtype=object)[table["label"].to_numpy()]
        table = table.add_column(table.column_names.index("label") + 1, "class", pa.array(names, pa.string()))
    return table


def _keys(rows: pa.RecordBatch | pa.Table, by: str, hardest: bool, per_class: bool) -> tuple:
    """(sort key, sample ids, labels or None) of ``rows``: the key is ascending, NaN where not observed."""
    values = rows.column(by).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)  # null -> NaN
    ids = rows.column("sample_id").to_numpy(zero_copy_only=False)
    labels = rows.column("label").to_numpy(zero_copy_only=False) if per_class else None
    return (-values if hardest else values), ids, labels


def _best(key: np.ndarray, ids: np.ndarray, labels: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` smallest (key, id), or ``k`` per label, in (label and) rank order, with their ranks."""
    if labels is None:
        near = np.arange(key.size)
        if key.size > k:  # only the k best and everything tied with the k-th can be in the ranking
            near = np.flatnonzero(key <= np.partition(key, k - 1)[k - 1])
        order = near[np.lexsort((ids[near], key[near]))][:k]
        return order, np.arange(1, order.size + 1)
    order = np.lexsort((ids, key, labels))
    sorted_labels = labels[order]
    group_start = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[group_start, order.size])
    rank = np.arange(order.size) - np.repeat(group_start, sizes) + 1
    keep = rank <= k
    return order[keep], rank[keep]
