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

import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._scan import Slab, scan
from ._threads import thread_pool

Dt = Literal["epoch", "step", "wall"]
DT_MODES: tuple[str, ...] = ("epoch", "step", "wall")
SCORE_COLUMNS: tuple[str, ...] = ("action", "variance", "mean", "first", "last", "min", "max")


def tick_durations(dt: str, step: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Δt of every committed tick (T,) float64 for a ``dt`` mode (see the module docstring)."""
    if dt == "epoch":
        return np.ones(step.shape[0], dtype=np.float64)
    series = np.asarray(step if dt == "step" else wall, dtype=np.float64)
    return np.diff(series, prepend=0.0)


#: Values per tile: statistics are reduced over ticks tile by tile (a few thousand samples wide), so that the
#: float64 temporaries of a tile (8 bytes per value) stay in the CPU cache instead of streaming through memory.
TILE_VALUES = 1 << 18


class _BlockMoments:
    """Running statistics of one sample block, combined slab by slab (Chan et al.'s parallel variance).

    ``shape``: (w, *element) of the block; ``k``: how many Δt series the action is computed for at once.
    Memory: ~(64 + 8 k) bytes per value of the block, plus float64 temporaries of one tile.
    """

    def __init__(self, shape: tuple[int, ...], k: int = 1) -> None:
        m = int(np.prod(shape, dtype=np.int64))
        self.shape = shape
        self.fresh = True  # no slab seen yet
        self.n = np.zeros(m, np.int64)
        self.mean = np.zeros(m, np.float64)
        self.m2 = np.zeros(m, np.float64)
        self.action = np.zeros((k, m), np.float64)
        self.first = np.full(m, np.nan, np.float64)
        self.last = np.full(m, np.nan, np.float64)
        self.min = np.full(m, np.nan, np.float64)
        self.max = np.full(m, np.nan, np.float64)

    def update(self, values: np.ndarray, dts: np.ndarray) -> None:
        """Add a slab: ``values`` (g, w, *element) float32, NaN = not observed; ``dts`` (k, g) Δt of its ticks."""
        g = values.shape[0]
        x = values.reshape(g, -1)
        weighted = [i for i in range(dts.shape[0]) if not np.all(dts[i] == 1.0)]  # the others are plain sums
        step = max(1, TILE_VALUES // max(1, g))

        def fold(c0: int) -> None:
            sl = slice(c0, min(x.shape[1], c0 + step))
            tile = x[:, sl]
            stats = _tile_stats(tile, dts, weighted)
            bad = np.isnan(stats[1])  # a column with a missing value: redo it with the masked kernel
            if bad.any():
                stats = _patch(stats, bad, tile, dts, weighted)
            self._combine(sl, *stats)

        starts = range(0, x.shape[1], step)
        if len(starts) > 1:  # tiles own disjoint columns, and numpy releases the GIL: fold them on all cores
            for _ in thread_pool("score", os.cpu_count() or 2).map(fold, starts):
                pass
        else:
            fold(0)
        self.fresh = False

    def _combine(self, sl: slice, count, total, m2, action, first, last, lo, hi) -> None:
        """Fold a tile's statistics into columns ``sl``; ``count`` is an int when no value of the tile is missing."""
        dense = np.ndim(count) == 0
        mean = total / count if dense else total / np.maximum(count, 1)
        if self.fresh:
            self.n[sl] = count
            self.mean[sl] = mean
            self.m2[sl] = m2
            self.action[:, sl] = action
            self.first[sl] = first
            self.last[sl] = last
            self.min[sl] = lo
            self.max[sl] = hi
            return
        n_a = self.n[sl]
        n = n_a + count
        share = count / n if dense else np.divide(count, n, out=np.zeros(n.shape), where=n > 0)
        delta = mean - self.mean[sl]
        self.m2[sl] += m2 + delta**2 * n_a * share
        self.mean[sl] += delta * share
        self.action[:, sl] += action
        new = n_a == 0
        if dense:
            self.last[sl] = last
        else:
            seen = count > 0
            new &= seen
            self.last[sl][seen] = last[seen]
        if new.any():
            self.first[sl][new] = first[new]
        np.fmin(self.min[sl], lo, out=self.min[sl])
        np.fmax(self.max[sl], hi, out=self.max[sl])
        self.n[sl] = n

    def per_sample(self) -> dict[str, np.ndarray]:
        """Statistics per sample (element statistics averaged over observed elements); ``action`` is (k, w)."""
        observed = self.n > 0
        stats = {
            "variance": np.divide(self.m2, self.n, out=np.zeros(self.n.shape), where=observed),
            "mean": self.mean,
            "first": self.first,
            "last": self.last,
            "min": self.min,
            "max": self.max,
        }
        w = self.shape[0]
        if len(self.shape) == 1:
            out = {name: np.where(observed, values, np.nan) for name, values in stats.items()}
            out["action"] = np.where(observed, self.action, np.nan)
            out["n_obs"] = self.n
            return out
        observed = observed.reshape(w, -1)
        n_elements = observed.sum(axis=1)
        some = n_elements > 0

        def average(values: np.ndarray) -> np.ndarray:
            total = np.where(observed, values.reshape(w, -1), 0.0).sum(axis=1)
            return np.divide(total, n_elements, out=np.full(total.shape, np.nan), where=some)

        out = {name: average(values) for name, values in stats.items()}
        out["action"] = np.stack([average(row) for row in self.action])
        out["n_obs"] = self.n.reshape(w, -1).max(axis=1)
        return out


def _tile_stats(x: np.ndarray, dts: np.ndarray, weighted: list[int]) -> tuple:
    """Statistics of a tile (g, w) with no missing value: (count, sum, m2, action (k, w), first, last, min, max),
    ``count`` an int (g).

    A column with a NaN comes out with a NaN sum (and is redone by :func:`_patch`).
    """
    g = x.shape[0]
    total = x.sum(axis=0, dtype=np.float64)
    d = x - total / g  # float64
    m2 = np.einsum("ij,ij->j", d, d)
    action = _actions(total, x, dts, weighted)
    return g, total, m2, action, x[0], x[-1], x.min(axis=0), x.max(axis=0)


def _masked_stats(x: np.ndarray, dts: np.ndarray, weighted: list[int]) -> tuple:
    """Like :func:`_tile_stats` for a tile with missing values (NaN): they are skipped."""
    valid = ~np.isnan(x)
    count = valid.sum(axis=0)
    z = np.where(valid, x, np.float32(0))
    total = z.sum(axis=0, dtype=np.float64)
    d = z - total / np.maximum(count, 1)
    d[~valid] = 0.0
    m2 = np.einsum("ij,ij->j", d, d)
    action = _actions(total, z, dts, weighted)
    cols = np.arange(x.shape[1])
    first = x[np.argmax(valid, axis=0), cols]
    last = x[x.shape[0] - 1 - np.argmax(valid[::-1], axis=0), cols]
    return count, total, m2, action, first, last, np.fmin.reduce(x, axis=0), np.fmax.reduce(x, axis=0)


def _actions(total: np.ndarray, z: np.ndarray, dts: np.ndarray, weighted: list[int]) -> np.ndarray:
    """Σ_t z·Δt for each Δt series (k, w): the plain sum where Δt is 1, else one product per series (so that
    a mode's action is bit-identical whichever other modes are computed with it)."""
    action = np.empty((dts.shape[0], z.shape[1]))
    action[:] = total
    for i in weighted:
        action[i] = dts[i] @ z
    return action


def _patch(stats: tuple, bad: np.ndarray, x: np.ndarray, dts: np.ndarray, weighted: list[int]) -> tuple:
    """Replace the statistics of the columns ``bad`` (which have missing values) by the masked kernel's."""
    if bad.all():
        return _masked_stats(x, dts, weighted)
    fixed = _masked_stats(x[:, bad], dts, weighted)
    count = np.full(x.shape[1], stats[0], np.int64)
    count[bad] = fixed[0]
    out = [count]
    for values, patch in zip(stats[1:], fixed[1:]):
        values = np.array(values, np.float64)  # a copy: x[0], x[-1] are views of the slab
        values[..., bad] = patch
        out.append(values)
    return tuple(out)


def score_blocks(
    array, tick_index: np.ndarray, dts: np.ndarray, *, budget_bytes: int | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield ``(lo, hi, stats)`` per sample block of ``array`` over the ticks ``tick_index`` (only the blocks of
    sample ``rows``, see :func:`lossledger._scan.scan`, when given).

    ``dts``: Δt of each tick in ``tick_index``, (n,) or (k, n) for k Δt series at once (one read of the data);
    ``stats["action"]`` is then (hi - lo,) or (k, hi - lo). Memory: the scan's slabs (``budget_bytes``,
    default 64 MB in all) plus ~(70 + 8 k) bytes per value of the block; never the whole (ticks x samples)
    matrix.
    """
    series = np.atleast_2d(np.asarray(dts, dtype=np.float64))
    state: _BlockMoments | None = None
    slab: Slab
    for slab in scan(array, tick_index, budget_bytes=budget_bytes, reuse=True, rows=rows):  # update() keeps no view
        if slab.block_start:
            state = _BlockMoments(slab.values.shape[1:], series.shape[0])
        assert state is not None
        state.update(slab.values, series[:, slab.ticks])
        if slab.block_end:
            stats = state.per_sample()
            if np.ndim(dts) == 1:
                stats["action"] = stats["action"][0]
            yield slab.lo, slab.hi, stats


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
    # Missing is stored as null (parquet statistics ignore NaN; DuckDB skips nulls), with the NaN kept in the
    # values under it: lossledger._scoring.nan_view gives the NaN form by dropping the bitmap, without a copy.
    columns += [pa.array(stats[name], pa.float64(), from_pandas=True) for name in SCORE_COLUMNS]
    columns.append(pa.array(stats["n_obs"], pa.int64()))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def null_to_nan(table: pa.Table) -> pa.Table:
    """Score columns with missing as NaN (the Python API's convention) instead of null (the storage's)."""
    for name in SCORE_COLUMNS:
        index = table.column_names.index(name)
        table = table.set_column(index, name, pc.fill_null(table[name], float("nan")))
    return table
