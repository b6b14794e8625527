"""Which ticks to sum: the window of training before the network starts to memorize wrong labels.

Once a network memorizes, the loss of a mislabeled sample falls like everyone else's, and ticks after that
point dilute the action. :func:`memorization_window` finds where that starts without knowing which labels are
wrong, from one streamed pass over the run:

- ``"validation"``: the tick after which the mean loss of the ledger's validation split stops improving
  (its minimum, after smoothing) — used when the run logged validation samples;
- ``"separability"``: otherwise, from the shape of the per-tick distribution of training losses. While the
  network learns the clean samples and not yet the wrong ones, log-losses are bimodal; memorization merges the
  modes. The statistic is Otsu's between-class variance ratio of the log-loss histogram (1 = two point
  masses, 0 = one), and the window ends at its maximum (after smoothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from .._commit import open_stream, read_run_attrs
from .._scan import scan
from ..errors import ShapeMismatchError, UnknownStreamError

if TYPE_CHECKING:
    from ..ledger import Ledger

Method = Literal["auto", "validation", "separability"]

#: Log-loss histogram of one tick: bins over [log 1e-7, log 1e3], values outside are clipped into the edges.
_BINS = np.linspace(np.log(1e-7), np.log(1e3), 513)
VALIDATION_SPLITS = ("val", "valid", "validation")


@dataclass(frozen=True)
class Window:
    """A window of ticks ``[start, stop)`` and how it was chosen.

    ``curve``: ``tick``, ``statistic`` (validation mean loss, or separability), ``smoothed``, one row per tick.
    """

    start: int
    stop: int
    method: str
    curve: pa.Table

    @property
    def ticks(self) -> slice:
        """The window as a ``ticks=`` argument of :meth:`Ledger.scores`."""
        return slice(self.start, self.stop)


def memorization_window(
    ledger: Ledger, run: str, stream: str = "loss", *, method: Method = "auto", smooth: int = 5
) -> Window:
    """The ticks from the start of ``run`` to the onset of memorization (see the module docstring).

    ``method="auto"`` uses ``"validation"`` when the ledger has a validation split (``val``, ``valid`` or
    ``validation``) whose samples were logged in ``stream``, else ``"separability"`` over the ``train`` split
    (or every sample when there are no splits). ``smooth``: width in ticks of the centred moving average
    applied to the curve before taking its extremum. Runs of fewer than 3 ticks get the whole run.
    Memory: one scan slab plus a 512-bin histogram per tick (O(T)), never N × T.
    """
    if smooth < 1:
        raise ShapeMismatchError(f"smooth must be a positive number of ticks, got {smooth}")
    commit = read_run_attrs(ledger._io, run)["commit"]
    if stream not in commit["streams"]:
        raise UnknownStreamError(f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}")
    if commit["streams"][stream]["element_shape"]:
        raise ShapeMismatchError(f"stream {stream!r} is not scalar; the window needs one loss per sample and tick")
    n_ticks = commit["ticks"]
    validation = _split_mask(ledger, VALIDATION_SPLITS)
    train = _split_mask(ledger, ("train",))
    array = open_stream(ledger._io, run, stream, commit, ledger.n_samples)
    hist, val_sum, val_n = _per_tick(array, n_ticks, train, validation)
    if method == "auto":
        method = "validation" if validation is not None and val_n.sum() > 0 else "separability"
    if method == "validation":
        if validation is None or val_n.sum() == 0:
            raise ShapeMismatchError(
                "method='validation' needs a validation split (splits named one of "
                f"{list(VALIDATION_SPLITS)}) logged in stream {stream!r}; use method='separability'"
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            statistic = val_sum / val_n
        pick = np.nanargmin
    elif method == "separability":
        statistic = np.array([_otsu_ratio(h) for h in hist])
        pick = np.nanargmax
    else:
        raise ShapeMismatchError(f"method must be 'auto', 'validation' or 'separability', got {method!r}")
    smoothed = _moving_average(statistic, smooth)
    stop = n_ticks if n_ticks < 3 or np.isnan(smoothed).all() else int(pick(smoothed)) + 1
    curve = pa.table(
        {
            "tick": pa.array(np.arange(n_ticks, dtype=np.int64)),
            "statistic": pa.array(statistic, pa.float64()),
            "smoothed": pa.array(smoothed, pa.float64()),
        }
    )
    return Window(0, stop, method, curve)


def _split_mask(ledger: Ledger, names: tuple[str, ...]) -> np.ndarray | None:
    samples = ledger._samples
    if samples.split is None or samples.splits is None:
        return None
    codes = [i for i, name in enumerate(samples.splits) if name.lower() in names]
    return np.isin(samples.split, codes) if codes else None


def _per_tick(
    array, n_ticks: int, train: np.ndarray | None, validation: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tick: the log-loss histogram of the train samples, and the sum and count of validation losses."""
    hist = np.zeros((n_ticks, _BINS.size - 1), dtype=np.int64)
    val_sum = np.zeros(n_ticks)
    val_n = np.zeros(n_ticks, dtype=np.int64)
    for slab in scan(array, np.arange(n_ticks, dtype=np.int64)):
        values = slab.values.astype(np.float64)
        block_train = slice(None) if train is None else train[slab.lo : slab.hi]
        logs = np.log(np.clip(values[:, block_train], 1e-7, 1e3))
        for row, tick in enumerate(slab.ticks):
            finite = logs[row][~np.isnan(logs[row])]
            hist[tick] += np.histogram(finite, _BINS)[0]
        if validation is not None:
            block = values[:, validation[slab.lo : slab.hi]]
            observed = ~np.isnan(block)
            val_sum[slab.ticks] += np.where(observed, block, 0.0).sum(axis=1)
            val_n[slab.ticks] += observed.sum(axis=1)
    return hist, val_sum, val_n


def _otsu_ratio(counts: np.ndarray) -> float:
    """Max over thresholds of between-class variance / total variance of a histogram (NaN if < 2 values)."""
    total = counts.sum()
    if total < 2:
        return float("nan")
    p = counts / total
    centres = (_BINS[:-1] + _BINS[1:]) / 2.0
    w = np.cumsum(p)
    m = np.cumsum(p * centres)
    mean = m[-1]
    variance = float((p * (centres - mean) ** 2).sum())
    if variance <= 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mean * w - m) ** 2 / (w * (1.0 - w))
    return float(np.nanmax(between[:-1]) / variance)


def _moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over the non-NaN values within ``width`` ticks (shrinks at the edges)."""
    half = width // 2
    out = np.full(values.size, np.nan)
    for i in range(values.size):
        window = values[max(0, i - half) : i + half + 1]
        if (~np.isnan(window)).any():
            out[i] = np.nanmean(window)
    return out
