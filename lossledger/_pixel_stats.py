"""Accumulators of the per-pixel analyses (:mod:`lossledger.pixels`): per-pixel moments of a block of samples,
and per-class statistics of pixel action, both merged block by block with Chan et al.'s formulas.

Lean on purpose: 28 bytes per pixel of a block (n, action, mean, M2), where the score engine's
``scores._BlockMoments`` keeps first/last/min/max too (64 + 8 k bytes per value) for the per-sample scores.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa


class PixelMoments:
    """Per-pixel running n, action, mean and M2 of one block, float64, merged slab by slab (Chan et al.)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = np.zeros(shape, np.int32)
        self.action = np.zeros(shape, np.float64)
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)

    def update(self, values: np.ndarray, dts: np.ndarray) -> None:
        """Add a slab ``values`` (g, *shape) float32 (NaN = not observed) whose ticks last ``dts`` (g,)."""
        if values.shape[0] == 0:
            return
        valid = ~np.isnan(values)
        count = valid.sum(axis=0, dtype=np.int32)
        x = values.astype(np.float64)
        np.copyto(x, 0.0, where=~valid)
        total = x.sum(axis=0)
        if np.all(dts == 1.0):
            self.action += total
        else:
            self.action += np.tensordot(dts, x, axes=1)
        group_mean = np.divide(total, count, out=np.zeros(count.shape), where=count > 0)
        x -= group_mean
        x *= valid  # unobserved ticks add nothing to M2
        x *= x
        group_m2 = x.sum(axis=0)
        n = self.n + count
        share = np.divide(count, n, out=np.zeros(count.shape), where=n > 0)
        delta = group_mean - self.mean
        self.m2 += group_m2 + delta * delta * self.n * share
        self.mean += delta * share
        self.n = n

    def action_variance(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 action and variance maps, NaN where never observed."""
        seen = self.n > 0
        action = np.where(seen, self.action, np.nan)
        variance = np.divide(self.m2, self.n, out=np.full(self.n.shape, np.nan), where=seen)
        return action, variance

    def maps(self) -> dict[str, np.ndarray]:
        action, variance = self.action_variance()
        mean = np.where(self.n > 0, self.mean, np.nan)
        return {"action": action.astype(np.float32), "mean": mean.astype(np.float32),
                "variance": variance.astype(np.float32), "n_obs": self.n.copy()}

    def summary(self, threshold: float) -> dict[str, np.ndarray]:
        axes = tuple(range(1, self.n.ndim))
        seen = self.n > 0
        n_valid = seen.sum(axis=axes)
        has = n_valid > 0
        action, variance = self.action_variance()

        def mean_over(values: np.ndarray) -> np.ndarray:
            total = np.where(seen, values, 0.0).sum(axis=axes)
            return np.divide(total, n_valid, out=np.full(total.shape, np.nan), where=has)

        above = (seen & (self.mean > threshold)).sum(axis=axes)
        return {
            "action_mean": mean_over(action),
            "action_max": np.where(has, np.where(seen, action, -np.inf).max(axis=axes), np.nan),
            "variance_mean": mean_over(variance),
            "frac_above": np.divide(above, n_valid, out=np.full(above.shape, np.nan), where=has),
            "n_valid_pixels": n_valid,
        }


class ClassStats:
    """Per-class count, mean and M2 of pixel action (Chan's merge per block), max, variance sum, samples."""

    _FILL: ClassVar[dict[str, float]] = {"n": 0, "mean": 0.0, "m2": 0.0, "max": -np.inf, "var_sum": 0.0, "samples": 0}

    def __init__(self) -> None:
        self.n = self.samples = np.zeros(0, np.int64)
        self.mean = self.m2 = self.max = self.var_sum = np.zeros(0)

    def _grow(self, k: int) -> None:
        """Make room for classes 0..k-1."""
        for name, fill in self._FILL.items():
            old = getattr(self, name)
            if k > old.size:
                setattr(self, name, np.concatenate([old, np.full(k - old.size, fill, old.dtype)]))

    def update(self, codes: np.ndarray, action: np.ndarray, variance: np.ndarray, sample_of: np.ndarray) -> None:
        if codes.size == 0:
            return
        k = int(codes.max()) + 1
        self._grow(k)
        count = np.bincount(codes, minlength=k)
        total = np.bincount(codes, weights=action, minlength=k)
        bmean = np.divide(total, count, out=np.zeros(k), where=count > 0)
        bm2 = np.bincount(codes, weights=(action - bmean[codes]) ** 2, minlength=k)
        n_old = self.n[:k]
        both = n_old + count
        delta = bmean - self.mean[:k]
        share = np.divide(count, both, out=np.zeros(k), where=both > 0)
        self.m2[:k] += bm2 + delta**2 * n_old * share
        self.mean[:k] += delta * share
        self.n[:k] = both
        np.maximum.at(self.max, codes, action)
        self.var_sum[:k] += np.bincount(codes, weights=variance, minlength=k)
        present = np.unique(sample_of * k + codes)  # (sample, class) pairs of this block
        self.samples[:k] += np.bincount(present % k, minlength=k)

    def table(self, classes: list[str] | tuple[str, ...] | None) -> pa.Table:
        self._grow(0 if classes is None else len(classes))
        keep = np.arange(self.n.size) if classes is not None else np.flatnonzero(self.n > 0)
        n = self.n[keep]
        has = n > 0
        nan = lambda values: np.where(has, values, np.nan)
        total = float((self.mean[keep] * n).sum())
        columns: dict[str, pa.Array] = {"class": pa.array(keep.astype(np.int32), pa.int32())}
        if classes is not None:
            columns["name"] = pa.array([str(classes[i]) for i in keep], pa.string())
        columns["n_pixels"] = pa.array(n, pa.int64())
        columns["n_samples"] = pa.array(self.samples[keep], pa.int64())
        columns["action_mean"] = pa.array(nan(self.mean[keep]), pa.float64())
        columns["action_std"] = pa.array(nan(np.sqrt(np.divide(self.m2[keep], np.maximum(n, 1)))), pa.float64())
        columns["action_max"] = pa.array(nan(self.max[keep]), pa.float64())
        columns["variance_mean"] = pa.array(nan(self.var_sum[keep] / np.maximum(n, 1)), pa.float64())
        share = self.mean[keep] * n / total if total != 0 else np.full(keep.size, np.nan)
        columns["action_share"] = pa.array(nan(share), pa.float64())
        return pa.table(columns)
