"""Noisy-label candidates: samples whose action is too high for their label to be right.

Threshold, chosen from the data, never from knowing which labels are wrong:

- ``"mixture"``: a two-component Gaussian mixture on log-action of the candidates (EM); a sample is flagged
  when the high component's posterior is at least 0.5, and the threshold is where that posterior crosses 0.5.
- ``"reference"``: the ``quantile`` of the action of a reference split that was not trained with noisy labels
  (the paper's Fig 12 compares train-flipped, train-clean and validation actions): a sample is flagged when its
  action is above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from ..errors import ShapeMismatchError
from .window import Window, _split_mask, memorization_window

if TYPE_CHECKING:
    from ..ledger import Ledger


@dataclass(frozen=True)
class NoisyLabels:
    """The result of :func:`flag_noisy`.

    ``table``: one row per candidate sample, highest action first: ``sample_id``, ``label``, ``action``,
    ``p_noisy`` (mixture posterior; null for ``"reference"``), ``flagged``. ``threshold``: in action units.
    ``window``: the ticks summed (None when the caller gave ``ticks``). ``method``: how the threshold was chosen.
    """

    table: pa.Table
    threshold: float
    window: Window | None
    method: str

    @property
    def flagged_ids(self) -> np.ndarray:
        """(k,) int64 ids of the flagged samples, highest action first."""
        return self.table.filter(self.table["flagged"])["sample_id"].to_numpy()


def flag_noisy(
    ledger: Ledger,
    run: str,
    stream: str = "loss",
    *,
    ticks: Any = "auto",
    method: Literal["mixture", "reference"] = "mixture",
    split: str | None = "train",
    reference_split: str = "val",
    quantile: float = 0.95,
) -> NoisyLabels:
    """Flag samples of ``split`` (default ``train``; all samples if the ledger has no such split) as noisy.

    ``ticks``: ``"auto"`` sums the :func:`memorization_window` (reported in the result), ``None`` every
    committed tick, or a window as in :meth:`Ledger.scores`. Samples never observed are not candidates.
    Memory: the scores of the run (O(N)) plus one scan slab.
    """
    window = memorization_window(ledger, run, stream) if isinstance(ticks, str) and ticks == "auto" else None
    scores = ledger.scores(run, stream, ticks=window.ticks if window else ticks)
    action = scores["action"].to_numpy(zero_copy_only=False)
    candidates = ~np.isnan(action)
    in_split = _split_mask(ledger, (split,)) if split is not None else None
    if in_split is not None:
        candidates &= in_split
    if candidates.sum() < 2:
        raise ShapeMismatchError(f"run {run!r} has fewer than 2 observed samples in split {split!r} to compare")
    p_noisy = None
    if method == "mixture":
        threshold, p_noisy = _mixture_threshold(action[candidates])
        flagged = p_noisy >= 0.5
    elif method == "reference":
        if not 0.0 < quantile < 1.0:
            raise ShapeMismatchError(f"quantile must lie in (0, 1), got {quantile}")
        reference = _split_mask(ledger, (reference_split,))
        if reference is None or not (reference & ~np.isnan(action)).any():
            raise ShapeMismatchError(
                f"method='reference' needs samples of split {reference_split!r} logged in {stream!r}; create the "
                "ledger with splits=... and log the held-out samples, or use method='mixture'"
            )
        threshold = float(np.quantile(action[reference & ~np.isnan(action)], quantile))
        flagged = action[candidates] > threshold
    else:
        raise ShapeMismatchError(f"method must be 'mixture' or 'reference', got {method!r}")
    rows = np.flatnonzero(candidates)
    order = np.argsort(-action[rows], kind="stable")
    columns: dict[str, pa.Array] = {"sample_id": pa.array(scores["sample_id"].to_numpy()[rows][order])}
    if "label" in scores.column_names:
        columns["label"] = pa.array(scores["label"].to_numpy()[rows][order])
    columns["action"] = pa.array(action[rows][order], pa.float64())
    columns["p_noisy"] = pa.nulls(rows.size, pa.float64()) if p_noisy is None else pa.array(p_noisy[order])
    columns["flagged"] = pa.array(flagged[order], pa.bool_())
    return NoisyLabels(pa.table(columns), float(threshold), window, method)


def _mixture_threshold(action: np.ndarray, *, iterations: int = 200) -> tuple[float, np.ndarray]:
    """Fit a 2-Gaussian mixture to log(action) by EM; return (threshold in action units, posterior of high)."""
    x = np.log(np.maximum(action, np.finfo(np.float64).tiny))
    lo, hi = np.quantile(x, [0.25, 0.9])
    mu = np.array([lo, hi if hi > lo else lo + 1.0])
    sd = np.full(2, max(float(x.std()), 1e-6))
    weight = np.array([0.8, 0.2])
    for _ in range(iterations):
        dens = weight * _normal_pdf(x[:, None], mu, sd)
        total = dens.sum(axis=1, keepdims=True)
        resp = np.divide(dens, total, out=np.full_like(dens, 0.5), where=total > 0)
        nk = resp.sum(axis=0) + 1e-12
        new_mu = (resp * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (x[:, None] - new_mu) ** 2).sum(axis=0) / nk) + 1e-6
        weight = nk / nk.sum()
        converged = np.allclose(new_mu, mu, atol=1e-9)
        mu = new_mu
        if converged:
            break
    high = int(np.argmax(mu))
    dens = weight * _normal_pdf(x[:, None], mu, sd)
    posterior = dens[:, high] / np.maximum(dens.sum(axis=1), 1e-300)
    # The threshold: where the high component's posterior crosses 0.5 between the two means.
    grid = np.linspace(mu.min(), mu.max(), 2001)
    g = weight * _normal_pdf(grid[:, None], mu, sd)
    crossing = grid[np.argmax(g[:, high] / np.maximum(g.sum(axis=1), 1e-300) >= 0.5)]
    return float(np.exp(crossing)), posterior


def _normal_pdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * np.sqrt(2.0 * np.pi))
