"""Stream a stream's committed values block by block: never the whole (ticks x samples) matrix.

A scan walks sample blocks (a whole number of stored chunks wide) and, inside each, groups of ticks, so the
values in memory at once are one slab of at most ``budget_bytes`` (float32), plus the caller's per-block state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

#: Default bytes of one slab: a few MB more than a chunk keeps reads sequential and numpy vectorized.
SCAN_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class Slab:
    lo: int  # first sample row of the block
    hi: int  # one past the last sample row
    ticks: np.ndarray  # (g,) positions into the scanned tick list (0-based, increasing)
    values: np.ndarray  # (g, hi - lo, *element_shape) float32, NaN where not logged
    block_start: bool  # True for the first slab of a sample block
    block_end: bool  # True for the last slab of a sample block


def scan(array: zarr.Array, tick_index: np.ndarray, *, budget_bytes: int | None = None) -> Iterator[Slab]:
    """Yield slabs of ``array`` (T, N, *element) at the ticks ``tick_index`` (sorted, unique), block by block.

    Memory: one slab, at most ``max(budget_bytes, one chunk)`` bytes of float32 (default
    ``SCAN_BUDGET_BYTES``).
    """
    budget_bytes = SCAN_BUDGET_BYTES if budget_bytes is None else budget_bytes
    n = int(array.shape[1])
    per_chunk = int(array.chunks[1])
    element = tuple(int(d) for d in array.shape[2:])
    element_bytes = 4 * int(np.prod(element, dtype=np.int64))
    n_ticks = int(tick_index.size)
    if n_ticks == 0 or n == 0:
        return
    # As many whole chunks per block as fit with all ticks; if even one chunk does not, split the ticks.
    chunks_per_block = max(1, budget_bytes // max(1, n_ticks * per_chunk * element_bytes))
    width = min(n, chunks_per_block * per_chunk)
    ticks_per_slab = int(max(1, min(n_ticks, budget_bytes // max(1, width * element_bytes))))
    runs = _contiguous_runs(tick_index)
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        for start in range(0, n_ticks, ticks_per_slab):
            stop = min(n_ticks, start + ticks_per_slab)
            values = _read(array, tick_index, runs, start, stop, lo, hi)
            yield Slab(lo, hi, np.arange(start, stop), values, start == 0, stop == n_ticks)


def _contiguous_runs(tick_index: np.ndarray) -> list[tuple[int, int]]:
    """Split positions 0..len-1 of a sorted tick list into runs of consecutive ticks: [(pos_start, pos_stop)]."""
    breaks = np.flatnonzero(np.diff(tick_index) != 1) + 1
    edges = np.concatenate([[0], breaks, [tick_index.size]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _read(
    array: zarr.Array, tick_index: np.ndarray, runs: list[tuple[int, int]], start: int, stop: int, lo: int, hi: int
) -> np.ndarray:
    # Basic slices over consecutive ticks are ~10x faster in Zarr than orthogonal (integer-array) selection.
    parts = []
    for a, b in runs:
        a, b = max(a, start), min(b, stop)
        if a < b:
            t0 = int(tick_index[a])
            parts.append(array[t0 : t0 + (b - a), lo:hi])
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return values.astype(np.float32, copy=False)
