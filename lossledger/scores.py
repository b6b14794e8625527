"""Per-sample scores of a stream over committed ticks: the action and its companions, out of core.

For sample ``i`` with loss ``L[t, i]`` at the scanned ticks ``t`` where it was logged (NaN ticks skipped):

- ``action``   = Σ_t L[t, i] · Δt[t]  (Arriaga & Valdenegro-Toro). Δt is 1 per tick (``dt="epoch"``), the
  optimizer steps in the tick (``"step"``: step[t] - step[t-1], step[-1] = 0), or its wall-clock seconds
  (``"wall"``: wall[t] - wall[t-1], wall[-1] = 0). Δt belongs to the tick, so a window ``ticks=`` sums the
  same terms the full run has for those ticks.
- ``variance`` = population variance (ddof=0) of L over the observed ticks, unweighted; ``mean`` likewise.
- ``first``/``last`` = L at the first/last observed tick; ``min``/``max``; ``n_obs`` = observed ticks.

A sample never observed has ``n_obs = 0`` and NaN everywhere else (never 0). For element streams (e.g.
per-pixel losses, element shape (H, W)) each statistic is first computed per element, then averaged over the
elements observed at least once; ``n_obs`` is the most any element was observed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._scan import Slab, scan

Dt = Literal["epoch", "step", "wall"]
DT_MODES: tuple[str, ...] = ("epoch", "step", "wall")
SCORE_COLUMNS: tuple[str, ...] = ("action", "variance", "mean", "first", "last", "min", "max")


def tick_durations(dt: str, step: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Δt of every committed tick (T,) float64 for a ``dt`` mode (see the module docstring)."""
    if dt == "epoch":
        return np.ones(step.shape[0], dtype=np.float64)
    series = np.asarray(step if dt == "step" else wall, dtype=np.float64)
    return np.diff(series, prepend=0.0)


class _BlockMoments:
    """Running statistics of one sample block, combined slab by slab (Chan et al.'s parallel variance)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = np.zeros(shape, np.int64)
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)
        self.action = np.zeros(shape, np.float64)
        self.first = np.full(shape, np.nan, np.float64)
        self.last = np.full(shape, np.nan, np.float64)
        self.min = np.full(shape, np.inf, np.float64)
        self.max = np.full(shape, -np.inf, np.float64)

    def update(self, values: np.ndarray, dts: np.ndarray) -> None:
        valid = ~np.isnan(values)
        count = valid.sum(axis=0)
        seen = count > 0
        zeroed = np.where(valid, values, 0.0).astype(np.float64)
        weights = dts.reshape((-1,) + (1,) * (values.ndim - 1))
        self.action += (zeroed * weights).sum(axis=0)
        group_mean = np.divide(zeroed.sum(axis=0), count, out=np.zeros(count.shape), where=seen)
        group_m2 = np.where(valid, (values - group_mean) ** 2, 0.0).sum(axis=0)
        total = self.n + count
        delta = group_mean - self.mean
        share = np.divide(count, total, out=np.zeros(count.shape), where=total > 0)
        self.m2 += group_m2 + delta**2 * self.n * share
        self.mean += delta * share
        first_pos = np.argmax(valid, axis=0)
        last_pos = values.shape[0] - 1 - np.argmax(valid[::-1], axis=0)
        take = lambda pos: np.take_along_axis(values, pos[None], axis=0)[0]  # noqa: E731
        fresh = seen & (self.n == 0)
        self.first[fresh] = take(first_pos)[fresh]
        self.last[seen] = take(last_pos)[seen]
        self.min = np.minimum(self.min, np.where(valid, values, np.inf).min(axis=0))
        self.max = np.maximum(self.max, np.where(valid, values, -np.inf).max(axis=0))
        self.n = total

    def per_sample(self) -> dict[str, np.ndarray]:
        """Statistics per sample (element statistics averaged over observed elements)."""
        observed = self.n > 0
        stats = {
            "action": self.action,
            "variance": np.divide(self.m2, self.n, out=np.zeros(self.n.shape), where=observed),
            "mean": self.mean,
            "first": self.first,
            "last": self.last,
            "min": self.min,
            "max": self.max,
        }
        out: dict[str, np.ndarray] = {}
        if self.n.ndim == 1:
            for name, values in stats.items():
                out[name] = np.where(observed, values, np.nan)
            out["n_obs"] = self.n
            return out
        axes = tuple(range(1, self.n.ndim))
        n_elements = observed.sum(axis=axes)
        for name, values in stats.items():
            total = np.where(observed, values, 0.0).sum(axis=axes)
            out[name] = np.divide(total, n_elements, out=np.full(total.shape, np.nan), where=n_elements > 0)
        out["n_obs"] = self.n.max(axis=axes)
        return out


def score_blocks(
    array, tick_index: np.ndarray, dts: np.ndarray, *, budget_bytes: int | None = None
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield ``(lo, hi, stats)`` per sample block of ``array`` over the ticks ``tick_index``.

    ``dts``: Δt of each tick in ``tick_index``. Memory: one slab (``budget_bytes``, default 64 MB) plus ~60 bytes per
    element of the block; never the whole (ticks x samples) matrix.
    """
    state: _BlockMoments | None = None
    slab: Slab
    for slab in scan(array, tick_index, budget_bytes=budget_bytes):
        if slab.block_start:
            state = _BlockMoments(slab.values.shape[1:])
        assert state is not None
        state.update(slab.values, dts[slab.ticks])
        if slab.block_end:
            yield slab.lo, slab.hi, state.per_sample()


def scores_schema(with_label: bool) -> pa.Schema:
    fields = [pa.field("sample_id", pa.int64())]
    if with_label:
        fields.append(pa.field("label", pa.int32()))
    fields += [pa.field(name, pa.float64()) for name in SCORE_COLUMNS]
    fields.append(pa.field("n_obs", pa.int64()))
    return pa.schema(fields)


def block_table(
    schema: pa.Schema, sample_id: np.ndarray, label: np.ndarray | None, stats: dict[str, np.ndarray]
) -> pa.RecordBatch:
    columns = [pa.array(sample_id, pa.int64())]
    if label is not None:
        columns.append(pa.array(label, pa.int32()))
    # Missing is stored as null: parquet statistics ignore NaN, and DuckDB then folds isnan() to false.
    columns += [pa.array(stats[name], pa.float64(), from_pandas=True) for name in SCORE_COLUMNS]
    columns.append(pa.array(stats["n_obs"], pa.int64()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def null_to_nan(table: pa.Table) -> pa.Table:
    """Score columns with missing as NaN (the Python API's convention) instead of null (the storage's)."""
    for name in SCORE_COLUMNS:
        index = table.column_names.index(name)
        table = table.set_column(index, name, pc.fill_null(table[name], float("nan")))
    return table
