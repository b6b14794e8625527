"""Action score vs ensemble uncertainty (Arriaga, Palacio & Valdenegro-Toro, Fig. 6b, 6c and 7).

The paper trains an ensemble of 20 ResNets and compares, per test sample, the normalized action (the mean
action over the models, min-max normalized) with the predictive entropy of the ensemble: the two measure
different things, and the samples with high action but low entropy (confidently wrong or atypical) and low
action but high entropy (ambiguous but easy to fit) are the regions of interest (Fig. 6b, 7). Fig. 6c plots the
accuracy of the samples kept by a threshold on the normalized action, the normalized entropy and the
normalized variance of the loss, with the mean and 95% confidence interval over the models.

- :func:`entropy_vs_action`: the joint table of Fig. 6b with the two regions.
- :func:`accuracy_vs_threshold`: the curves of Fig. 6c.

Definitions shared by both:

- Ensemble probabilities: the mean over the runs of each run's class-probability vector (stream ``probs``,
  element shape (C,), e.g. the softmax) at ``tick`` (default each run's last committed tick), over the runs in
  which the sample's vector is fully logged (a vector with a NaN is skipped, never taken as 0).
- Entropy: H = −Σ_c p̄_c ln p̄_c in nats (0 ln 0 = 0) of that mean vector, first divided by its sum (as
  ``scipy.stats.entropy`` does, so float32 rounding of the softmax does not count). NaN if no run logged it.
- Normalized score: (s − min) / (max − min) over the samples considered (every sample, or ``split``) that
  have one; NaN stays NaN; all equal gives 0. The action (and variance) of a sample is first averaged over
  the runs that observed it (:meth:`Ledger.ensemble`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from .._arrays import to_numpy
from .._scan import scan
from ..compare import _check_runs
from ..errors import ShapeMismatchError
from ..scores import Dt
from .curriculum import _in_split, _label_array
from .neighbours import stream_at_tick

if TYPE_CHECKING:
    import zarr

    from ..ledger import Ledger

By = Literal["action", "entropy", "variance"]
BY: tuple[str, ...] = ("action", "entropy", "variance")
#: Probability values read per block (rows × classes) for each run: 32 MB of float64.
BLOCK_VALUES = 1 << 22

HIGH_ACTION_LOW_ENTROPY = "high action, low entropy"
LOW_ACTION_HIGH_ENTROPY = "low action, high entropy"


def entropy_vs_action(
    ledger: Ledger,
    runs: Sequence[str],
    *,
    probs: str = "probs",
    stream: str = "loss",
    tick: int = -1,
    probabilities: Any = None,
    high: float = 0.9,
    low: float = 0.5,
    split: str | None = None,
    dt: Dt = "epoch",
    ticks: Any = None,
) -> pa.Table:
    """Normalized ensemble action vs predictive entropy of the ensemble, per sample (paper Fig. 6b and 7).

    Parameters
    ----------
    runs : the ensemble's run names (one run works too).
    probs : the runs' class-probability stream (element shape (C,)), read at ``tick``.
    stream, dt, ticks : the action is that of :meth:`Ledger.ensemble` (``by="action"``) over these.
    probabilities : instead of ``probs``, a user array (R, N, C), R = len(runs), N in ledger row order; NaN
        where a run has no prediction for a sample.
    high, low : quantiles (0 ≤ low < high ≤ 1) that define the regions over the samples that have both
        values: "high" is at or above the ``high`` quantile (default the top 10%), "low" at or below the
        ``low`` quantile (default the median), numpy's linear interpolation.
    split : only the samples of this split (normalization and quantiles among them).

    Returns
    -------
    pyarrow.Table, one row per sample considered (row order): ``sample_id``, ``label`` (int32, null without
    labels), ``normalized_action`` (float64 in [0, 1]), ``entropy`` (float64, nats), ``region`` (string:
    "high action, low entropy", "low action, high entropy", or null). The schema metadata ``lossledger``
    holds the thresholds as JSON: ``action_high``, ``action_low``, ``entropy_high``, ``entropy_low``,
    ``high``, ``low``. Memory: O(N × R) scores, one block of ``BLOCK_VALUES`` probabilities per run.

    >>> table = entropy_vs_action(ledger, [f"resnet-s{i}" for i in range(20)], split="test")
    >>> table.filter(pc.equal(table["region"], "high action, low entropy"))  # Fig. 7, top row
    """
    if not (0.0 <= low < high <= 1.0):
        raise ShapeMismatchError(f"need quantiles 0 <= low < high <= 1, got low={low}, high={high}")
    names = _check_runs(ledger, runs, minimum=1)
    rows = _rows(ledger, split)
    mean = ledger.ensemble(names, stream, dt=dt, ticks=ticks, by="action")["mean"].to_numpy()[rows]
    action = _min_max(mean)
    entropy = _ensemble_entropy(ledger, names, probs, tick, probabilities)[rows]
    both = np.isfinite(action) & np.isfinite(entropy)
    thresholds = {"high": float(high), "low": float(low)}
    region = np.full(rows.size, None, dtype=object)
    if both.any():
        a_hi, a_lo = np.quantile(action[both], [high, low])
        h_hi, h_lo = np.quantile(entropy[both], [high, low])
        thresholds.update(action_high=float(a_hi), action_low=float(a_lo),
                          entropy_high=float(h_hi), entropy_low=float(h_lo))
        region[both & (action >= a_hi) & (entropy <= h_lo)] = HIGH_ACTION_LOW_ENTROPY
        region[both & (action <= a_lo) & (entropy >= h_hi)] = LOW_ACTION_HIGH_ENTROPY
    table = pa.table(
        {
            "sample_id": pa.array(ledger._samples.sample_id[rows], pa.int64()),
            "label": _label_array(ledger, rows),
            "normalized_action": pa.array(action, pa.float64()),
            "entropy": pa.array(entropy, pa.float64()),
            "region": pa.array(region.tolist(), pa.string()),
        }
    )
    return table.replace_schema_metadata({"lossledger": json.dumps(thresholds)})


def accuracy_vs_threshold(
    ledger: Ledger,
    runs: Sequence[str],
    *,
    correct: str = "correct",
    by: Sequence[str] = BY,
    thresholds: int | Sequence[float] = 20,
    probs: str = "probs",
    tick: int = -1,
    probabilities: Any = None,
    keep: Literal["below", "above"] = "below",
    split: str | None = None,
    stream: str = "loss",
    dt: Dt = "epoch",
    ticks: Any = None,
    confidence: float = 0.95,
) -> pa.Table:
    """Accuracy of the samples kept by a threshold on a normalized score, mean and CI over runs (Fig. 6c).

    For each score in ``by`` — ``"action"`` (normalized ensemble action), ``"entropy"`` (normalized ensemble
    entropy, see the module docstring), ``"variance"`` (normalized ensemble mean of the loss variance over
    ticks, the paper's "modified action") — and each threshold θ, the samples with normalized score ≤ θ
    (``keep="below"``; ``"above"``: ≥ θ, the paper's "lower values masked out") are kept, and each run's
    accuracy over them is the mean of its ``correct`` stream (0/1) at ``tick``, NaN ticks skipped.

    Parameters
    ----------
    thresholds : a count n (θ = 1/n, 2/n, ..., 1) or a list of values in [0, 1].
    confidence : level of the interval: mean ± t_{(1+confidence)/2, m−1} · s / √m over the m runs with an
        accuracy (s: sample standard deviation, Student's t); NaN when m < 2.
    Others : as in :func:`entropy_vs_action`.

    Returns
    -------
    pyarrow.Table, one row per (score, threshold): ``by`` (string), ``threshold`` (float64),
    ``accuracy_mean``, ``ci_low``, ``ci_high`` (float64, fractions; NaN when no kept sample has a
    ``correct`` value), ``n`` (int64, samples kept). Memory: O(N × R).

    >>> curves = accuracy_vs_threshold(ledger, [f"resnet-s{i}" for i in range(20)], split="test")
    """
    names = _check_runs(ledger, runs, minimum=1)
    chosen = [by] if isinstance(by, str) else list(by)
    unknown = [b for b in chosen if b not in BY]
    if not chosen or unknown:
        raise ShapeMismatchError(f"by must name scores among {list(BY)}, got {list(chosen)}")
    if keep not in ("below", "above"):
        raise ShapeMismatchError(f"keep must be 'below' or 'above', got {keep!r}")
    if not 0.0 < confidence < 1.0:
        raise ShapeMismatchError(f"confidence must lie in (0, 1), e.g. 0.95, got {confidence}")
    grid = _thresholds(thresholds)
    rows = _rows(ledger, split)
    hits = np.stack([_scalar_at_tick(ledger, run, correct, tick)[rows] for run in names])  # (R, n)
    t_value = _t_quantile((1.0 + confidence) / 2.0, len(names) - 1) if len(names) > 1 else float("nan")
    out: dict[str, list[Any]] = {key: [] for key in ("by", "threshold", "accuracy_mean", "ci_low", "ci_high", "n")}
    for name in chosen:
        if name == "entropy":
            raw = _ensemble_entropy(ledger, names, probs, tick, probabilities)[rows]
        else:
            raw = ledger.ensemble(names, stream, dt=dt, ticks=ticks, by=name)["mean"].to_numpy()[rows]
        score = _min_max(raw)
        have = np.isfinite(score)
        order = np.argsort(score[have], kind="stable")
        ordered = score[have][order]
        values = hits[:, have][:, order]
        seen = ~np.isnan(values)
        right = np.concatenate([np.zeros((len(names), 1)), np.cumsum(np.where(seen, values, 0.0), axis=1)], axis=1)
        counted = np.concatenate([np.zeros((len(names), 1)), np.cumsum(seen, axis=1)], axis=1)
        for theta in grid:
            if keep == "below":
                lo, hi = 0, int(np.searchsorted(ordered, theta, side="right"))
            else:
                lo, hi = int(np.searchsorted(ordered, theta, side="left")), ordered.size
            n_right, n_seen = right[:, hi] - right[:, lo], counted[:, hi] - counted[:, lo]
            accuracy = n_right[n_seen > 0] / n_seen[n_seen > 0]
            mean, half = _mean_and_half_width(accuracy, confidence, t_value, len(names))
            out["by"].append(name)
            out["threshold"].append(float(theta))
            out["accuracy_mean"].append(mean)
            out["ci_low"].append(mean - half)
            out["ci_high"].append(mean + half)
            out["n"].append(hi - lo)
    schema = pa.schema([("by", pa.string()), ("threshold", pa.float64()), ("accuracy_mean", pa.float64()),
                        ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int64())])
    return pa.table(out, schema=schema)


# --- helpers ----------------------------------------------------------------------------------------------
def _rows(ledger: Ledger, split: str | None) -> np.ndarray:
    return np.arange(ledger.n_samples) if split is None else np.flatnonzero(_in_split(ledger, split))


def _min_max(values: np.ndarray) -> np.ndarray:
    """(v − min) / (max − min) over the finite values; NaN stays NaN; all equal gives 0."""
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        out[finite] = (values[finite] - low) / (high - low) if high > low else 0.0
    return out


def _thresholds(thresholds: int | Sequence[float]) -> np.ndarray:
    if isinstance(thresholds, (int, np.integer)) and not isinstance(thresholds, bool):
        if thresholds < 1:
            raise ShapeMismatchError(f"thresholds must be a positive count or a list of values, got {thresholds}")
        return np.arange(1, int(thresholds) + 1) / int(thresholds)
    grid = np.asarray(thresholds, dtype=np.float64).ravel()
    if grid.size == 0 or not np.all((grid >= 0) & (grid <= 1)):
        raise ShapeMismatchError(
            f"thresholds are normalized scores in [0, 1], e.g. [0.1, 0.5, 1.0], or a count; got {thresholds!r}"
        )
    return grid


def _mean_and_half_width(accuracy: np.ndarray, confidence: float, t_value: float, n_runs: int) -> tuple[float, float]:
    if accuracy.size == 0:
        return float("nan"), float("nan")
    mean = float(accuracy.mean())
    if accuracy.size < 2:
        return mean, float("nan")
    t = t_value if accuracy.size == n_runs else _t_quantile((1.0 + confidence) / 2.0, accuracy.size - 1)
    return mean, float(t * accuracy.std(ddof=1) / math.sqrt(accuracy.size))


def _scalar_at_tick(ledger: Ledger, run: str, stream: str, tick: int) -> np.ndarray:
    """(N,) float64 values of a scalar stream at one committed tick, NaN where not logged."""
    array, position, _ = stream_at_tick(
        ledger, run, stream, tick, need_element=False,
        hint=f"log 0/1 correctness with run.log(ids, {stream}=logits.argmax(1) == y), or pass {stream}= the name "
        "of such a stream",
    )
    out = np.empty(ledger.n_samples)
    for slab in scan(array, np.array([position])):
        out[slab.lo : slab.hi] = slab.values[0]
    return out


def _ensemble_entropy(
    ledger: Ledger, runs: list[str], probs: str, tick: int, probabilities: Any
) -> np.ndarray:
    """(N,) entropy in nats of the mean class-probability vector over ``runs`` (module docstring)."""
    n = ledger.n_samples
    if probabilities is not None:
        user = to_numpy(probabilities, "probabilities")
        if user.ndim != 3 or user.shape[:2] != (len(runs), n) or user.dtype.kind not in "fiu":
            raise ShapeMismatchError(
                f"probabilities must be a real array (runs, samples, classes) = ({len(runs)}, {n}, C) in ledger "
                f"row order; got shape {user.shape} and dtype {user.dtype}"
            )
        sources: list[Callable[[int, int], Any]] = [partial(_rows_of, user[r]) for r in range(len(runs))]
        n_classes = user.shape[2]
        step = max(1, BLOCK_VALUES // max(1, n_classes))
    else:
        hint = (f"log class probabilities with run.log(ids, {probs}=softmax(logits)) (element shape (C,)), or pass "
                "probabilities= (runs, samples, classes)")
        opened = [stream_at_tick(ledger, run, probs, tick, need_element=True, hint=hint) for run in runs]
        shapes = {element for _, _, element in opened}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ShapeMismatchError(
                f"stream {probs!r} must hold one probability vector (C,) per sample, the same C in every run; "
                f"got element shapes {sorted(shapes)}"
            )
        n_classes = next(iter(shapes))[0]
        sources = [partial(_rows_at_tick, array, position) for array, position, _ in opened]
        width = int(opened[0][0].chunks[1])  # blocks of whole chunks of the first run
        step = width * max(1, BLOCK_VALUES // max(1, n_classes * width))
    entropy = np.full(n, np.nan)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        total = np.zeros((hi - lo, n_classes))
        count = np.zeros(hi - lo, np.int64)
        for source in sources:
            p = np.asarray(source(lo, hi), dtype=np.float64)
            ok = np.isfinite(p).all(axis=1)
            if (p[ok] < 0).any():
                raise ShapeMismatchError(
                    f"class probabilities must be non-negative; found {p[ok].min()} (log softmax(logits), not logits)"
                )
            total[ok] += p[ok]
            count += ok
        has = count > 0
        mean = total[has] / count[has, None]
        norm = mean.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = mean / norm
            terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        block = np.full(hi - lo, np.nan)
        block[has] = np.where(norm[:, 0] > 0, -terms.sum(axis=1), np.nan)
        entropy[lo:hi] = block
    return entropy


def _rows_of(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return values[lo:hi]


def _rows_at_tick(array: zarr.Array, tick: int, lo: int, hi: int) -> np.ndarray:
    return np.asarray(array[tick, lo:hi])


def _t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with integer ``df`` ≥ 1 degrees of freedom.

    Inverts the exact closed form of P(|T| ≤ t) for integer df (Abramowitz & Stegun 26.7.3-4) by bisection
    on θ = arctan(t / √df); no scipy needed.
    """
    target = 2.0 * p - 1.0  # P(|T| <= t)

    def two_sided(theta: float) -> float:
        s, c2 = math.sin(theta), math.cos(theta) ** 2
        if df % 2 == 0:
            term = total = 1.0
            for j in range(1, (df - 2) // 2 + 1):
                term *= (2 * j - 1) / (2 * j) * c2
                total += term
            return s * total
        if df == 1:
            return 2.0 * theta / math.pi
        term = total = math.cos(theta)
        for j in range(1, (df - 3) // 2 + 1):
            term *= (2 * j) / (2 * j + 1) * c2
            total += term
        return 2.0 / math.pi * (theta + s * total)

    lo, hi = 0.0, math.pi / 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) < target else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)
