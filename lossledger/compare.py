"""Compare runs: ensemble scores over runs and the correlation of scores between runs.

Both follow Arriaga, Palacio & Valdenegro-Toro, "Difficulty Estimation with Action Scores for Computer Vision
Tasks": :func:`ensemble` is the min-max normalized mean action over runs (their Fig. 6b/7, 20 ResNets), and
:func:`correlate` is their Table 1 (correlation of actions between two runs, overall and per class) and Fig. 14
(the same correlation restricted to the samples with the top action scores). Scores come from
:meth:`Ledger.scores`; a sample a run never observed (NaN) is skipped and counted, never taken as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from .errors import InvalidNameError, ShapeMismatchError, UnknownRunError
from .scores import SCORE_COLUMNS, Dt

if TYPE_CHECKING:
    from .ledger import Ledger

Method = Literal["pearson", "spearman"]
METHODS: tuple[str, ...] = ("pearson", "spearman")
_ENSEMBLE_COLUMNS = ("sample_id", "label", "mean", "n_runs", "normalized")


def ensemble(
    ledger: Ledger, runs: Sequence[str], stream: str = "loss", *, dt: Dt = "epoch", ticks: Any = None,
    by: str = "action",
) -> pa.Table:
    """The score ``by`` of each sample in every run of ``runs``, their mean and its min-max normalization.

    Returns one row per sample (row order): ``sample_id``, ``label`` (if the ledger has labels), one float64
    column per run named after the run (its ``by`` score from ``ledger.scores(run, stream, dt=dt,
    ticks=ticks)``, in the units of the stream times Δt for the action), ``mean`` (the mean over the runs
    that observed the sample, NaN-skipping: one observing run suffices; NaN if none did), ``n_runs`` (int64,
    how many runs observed it) and ``normalized`` = (mean − min) / (max − min) over the samples with a mean,
    in [0, 1] (the paper's normalized action; NaN where ``mean`` is NaN; 0.0 for all samples when every mean
    is equal, as each is then the minimum). Memory: O(N × R) for N samples and R runs, never N × ticks.

    >>> table = ensemble(ledger, ["resnet-s0", "resnet-s1", "resnet-s2"])
    >>> table.sort_by([("normalized", "descending")]).slice(0, 10)  # the 10 hardest over the three seeds
    """
    names = _check_runs(ledger, runs, minimum=1)
    clash = sorted(set(names) & set(_ENSEMBLE_COLUMNS))
    if clash:
        raise InvalidNameError(
            f"run name(s) {clash} clash with ensemble columns {list(_ENSEMBLE_COLUMNS)}; read such a run with "
            "ledger.scores(run) and join it on sample_id instead"
        )
    ids, labels, scores = _score_matrix(ledger, names, stream, dt=dt, ticks=ticks, by=by)
    observed = ~np.isnan(scores)
    n_runs = observed.sum(axis=0)
    total = np.where(observed, scores, 0.0).sum(axis=0)
    mean = np.divide(total, n_runs, out=np.full(n_runs.shape, np.nan), where=n_runs > 0)
    normalized = np.full(mean.shape, np.nan)
    seen = n_runs > 0
    if seen.any():
        low, high = mean[seen].min(), mean[seen].max()
        normalized[seen] = (mean[seen] - low) / (high - low) if high > low else 0.0
    columns: dict[str, pa.Array] = {"sample_id": pa.array(ids, pa.int64())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int32())
    columns.update({name: pa.array(row, pa.float64()) for name, row in zip(names, scores)})
    columns["mean"] = pa.array(mean, pa.float64())
    columns["n_runs"] = pa.array(n_runs, pa.int64())
    columns["normalized"] = pa.array(normalized, pa.float64())
    return pa.table(columns)


def correlate(
    ledger: Ledger, runs: Sequence[str], stream: str = "loss", *, by_class: bool = True, method: Method = "pearson",
    quantiles: Sequence[float] | None = None, dt: Dt = "epoch", ticks: Any = None, by: str = "action",
) -> pa.Table:
    """Correlation of the score ``by`` between every unordered pair of runs, overall and per class.

    Returns one row per (pair, group, quantile): ``run_a``, ``run_b`` (pairs of distinct runs in the order
    given), ``group`` ("all", then with ``by_class`` and labels every class: its name, or the label as a
    string when the ledger has no class names), ``quantile`` (null for the plain correlation, then each ``q``
    of ``quantiles``), ``n`` (samples used) and ``r`` (float64 coefficient). Only samples observed in both runs
    (neither score NaN) are used. ``method="pearson"``, or ``"spearman"``: Pearson of the average ranks (ties
    get the mean of their ranks) within the samples used. ``r`` is NaN when fewer than 2 samples are used or
    either run's scores are all equal among them.

    ``quantiles``: fractions q in (0, 1] for the paper's Fig. 14, which correlates only the samples with the
    top action scores, "where the threshold is a particular quantile of the data". For a pair the data is
    the pair's mean score (a + b) / 2 (symmetric in the two runs, like the ensemble mean): within the group's
    samples observed in both runs, those with (a + b) / 2 ≥ the (1 − q) quantile of it (numpy's default
    linear interpolation; ties at the threshold are kept) are correlated. q = 1 keeps them all.
    Memory: O(N × R) scores plus O(N) per pair, never N × ticks.

    >>> table = correlate(ledger, ["cnn-s0", "cnn-s1", "resnet-s0"], quantiles=[0.1, 0.5])
    >>> table.to_pandas().query("group == 'all'")  # Table 1's "overall" column and Fig. 14's curves
    """
    names = _check_runs(ledger, runs, minimum=2)
    if method not in METHODS:
        raise ShapeMismatchError(f"method must be one of {list(METHODS)}, got {method!r}")
    qs = _check_quantiles(quantiles)
    _, labels, scores = _score_matrix(ledger, names, stream, dt=dt, ticks=ticks, by=by)
    groups: list[tuple[str, np.ndarray | None]] = [("all", None)]
    if by_class and labels is not None:
        groups += _class_rows(labels, ledger.classes)
    prepare = average_ranks if method == "spearman" else np.asarray
    out: dict[str, list[Any]] = {"run_a": [], "run_b": [], "group": [], "quantile": [], "n": [], "r": []}
    for i, j in combinations(range(len(names)), 2):
        both = ~np.isnan(scores[i]) & ~np.isnan(scores[j])
        for group, rows in groups:
            keep = both if rows is None else rows[both[rows]]
            a, b = scores[i][keep], scores[j][keep]
            pair_mean = (a + b) / 2
            for q in (None, *qs):
                top = slice(None) if q is None or a.size == 0 else pair_mean >= np.quantile(pair_mean, 1 - q)
                x, y = a[top], b[top]
                out["run_a"].append(names[i])
                out["run_b"].append(names[j])
                out["group"].append(group)
                out["quantile"].append(q)
                out["n"].append(x.size)
                out["r"].append(_pearson(prepare(x), prepare(y)))
    schema = pa.schema([("run_a", pa.string()), ("run_b", pa.string()), ("group", pa.string()),
                        ("quantile", pa.float64()), ("n", pa.int64()), ("r", pa.float64())])
    return pa.table(out, schema=schema)


def _check_runs(ledger: Ledger, runs: Sequence[str], *, minimum: int) -> list[str]:
    if isinstance(runs, str) or not isinstance(runs, Sequence):
        raise ShapeMismatchError(f"runs must be a list of run names, e.g. {ledger.runs[:2]}, got {runs!r}")
    names = list(runs)
    if len(names) < minimum:
        raise ShapeMismatchError(
            f"need at least {minimum} run(s), got {len(names)}; pass run names from ledger.runs = {ledger.runs}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ShapeMismatchError(f"runs {repeated} are listed more than once; name each run once")
    existing = set(ledger.runs)
    unknown = [name for name in names if name not in existing]
    if unknown:
        raise UnknownRunError(f"no run(s) named {unknown} in {ledger.path}; choose from {sorted(existing)}")
    return names


def _check_quantiles(quantiles: Sequence[float] | None) -> list[float]:
    if quantiles is None:
        return []
    if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence):
        raise ShapeMismatchError(f"quantiles must be a list of fractions such as [0.1, 0.5, 1.0], got {quantiles!r}")
    bad = [q for q in quantiles if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1]
    if bad:
        raise ShapeMismatchError(
            f"quantiles must lie in (0, 1] (q = the top fraction of samples kept, 1 = all), got {bad}; "
            "pass e.g. quantiles=[0.1, 0.5, 1.0]"
        )
    return [float(q) for q in quantiles]


def _score_matrix(
    ledger: Ledger, runs: list[str], stream: str, *, dt: Dt, ticks: Any, by: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(N,) sample ids, (N,) labels or None, and the (R, N) float64 ``by`` scores with NaN = not observed."""
    if by not in SCORE_COLUMNS:
        raise ShapeMismatchError(f"cannot compare runs by {by!r}; choose one of {list(SCORE_COLUMNS)}")
    scores = np.empty((len(runs), ledger.n_samples), np.float64)
    for k, run in enumerate(runs):
        table = ledger.scores(run, stream, dt=dt, ticks=ticks)
        scores[k] = table[by].to_numpy()
    labels = table["label"].to_numpy() if "label" in table.column_names else None
    return table["sample_id"].to_numpy(), labels, scores


def _class_rows(labels: np.ndarray, classes: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """(group name, rows) per class: every named class (possibly empty), else every label present."""
    order = np.argsort(labels, kind="stable")
    values = np.arange(len(classes)) if classes is not None else np.unique(labels)
    bounds = np.searchsorted(labels[order], values), np.searchsorted(labels[order], values, side="right")
    names = [classes[int(v)] if classes is not None else str(v) for v in values]
    return [(name, order[lo:hi]) for name, lo, hi in zip(names, *bounds)]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks (scipy's ``rankdata``)."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r, NaN for fewer than 2 values or a constant input (as scipy, without its warning)."""
    if x.size < 2 or x.min() == x.max() or y.min() == y.max():
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    # Dividing by the norms first (as scipy does) keeps huge or tiny scores from overflowing.
    r = np.dot(dx / np.linalg.norm(dx), dy / np.linalg.norm(dy))
    return float(np.clip(r, -1.0, 1.0))
