"""How well a score finds a known set of positives (e.g. flipped labels): AUROC and precision at k."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ..compare import average_ranks
from ..errors import ShapeMismatchError


def auroc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for the boolean ``positive``.

    Equals the Mann-Whitney U statistic / (n_pos · n_neg), ties counted as one half (average ranks). NaN
    scores are left out (with their labels). Returns NaN when either class is empty. Memory O(n).
    """
    s, pos = _pair(scores, positive)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_at_k(scores: Any, positive: Any, k: int | None = None) -> float:
    """Fraction of positives among the ``k`` highest scores (default k = number of positives).

    NaN scores are left out; ties at the k-th score are broken by position (stable). NaN when k = 0.
    """
    s, pos = _pair(scores, positive)
    k = int(pos.sum()) if k is None else int(k)
    k = min(k, s.size)
    if k <= 0:
        return float("nan")
    top = np.argsort(-s, kind="stable")[:k]
    return float(pos[top].mean())


def detection_table(scores: Mapping[str, Any], positive: Any, *, k: int | None = None) -> pa.Table:
    """One row per named score: ``score``, ``auroc``, ``precision_at_k``, ``k``, ``n`` (non-NaN samples).

    ``scores`` maps a name to (n,) values where higher means "more likely positive" (negate scores such as
    cartography confidence or AUM, where low means suspicious).
    """
    rows = []
    for name, values in scores.items():
        s, pos = _pair(values, positive)
        kk = int(pos.sum()) if k is None else int(k)
        rows.append((name, auroc(s, pos), precision_at_k(s, pos, kk), kk, s.size))
    columns: list[tuple[Any, ...]] = list(zip(*rows)) if rows else [()] * 5
    return pa.table(
        {
            "score": pa.array(columns[0], pa.string()),
            "auroc": pa.array(columns[1], pa.float64()),
            "precision_at_k": pa.array(columns[2], pa.float64()),
            "k": pa.array(columns[3], pa.int64()),
            "n": pa.array(columns[4], pa.int64()),
        }
    )


def _pair(scores: Any, positive: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ShapeMismatchError(f"scores has {s.size} values but positive has {pos.size}; pass one flag per score")
    keep = ~np.isnan(s)
    return s[keep], pos[keep]
