"""Stream a stream's committed values block by block: never the whole (ticks x samples) matrix.

A scan walks sample blocks (a whole number of stored chunks wide) and, inside each, groups of ticks. Each
group is one slab of at most half of ``budget_bytes`` (float32): the next slab is read while the caller works
on the current one, so the two fit in the budget together.

Chunks are read and decoded straight from their files: :class:`ChunkSource` reads the chunk file and blosc
decodes it (numcodecs) into its place in the slab, in a small pool of threads (file reads and blosc release
the GIL, so decoding runs beside the caller's numpy work). That skips Zarr's per-call indexing and event loop,
~10x the decode itself for 1 MiB chunks. On an object store a chunk is fetched through Zarr's store (one GET)
and decoded the same way. Arrays that are not ``bytes`` + ``blosc`` (+ ``crc32c``) Zarr v3 arrays with a NaN
fill value (none that lossledger writes) are read through Zarr instead.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ._commit import decode_chunk, has_checksum
from ._progress import report
from ._threads import thread_pool

_PROTO = default_buffer_prototype()
#: Bytes of slabs in memory at once (the slab the caller holds and the one being read ahead), float32.
SCAN_BUDGET_BYTES = 64 << 20
#: Threads that read and decode chunks. Two keep a two-core machine busy beside the caller's numpy work.
READ_THREADS = max(2, min(4, os.cpu_count() or 2))
#: Chunks a :func:`read_chunks` keeps in flight ahead of its caller.
READ_AHEAD_CHUNKS = 8


def _read_pool() -> ThreadPoolExecutor:
    return thread_pool("read", READ_THREADS)


@dataclass(frozen=True)
class Slab:
    lo: int  # first sample row of the block
    hi: int  # one past the last sample row
    ticks: np.ndarray  # (g,) positions into the scanned tick list (0-based, increasing)
    values: np.ndarray  # (g, hi - lo, *element_shape) float32, NaN where not logged
    block_start: bool  # True for the first slab of a sample block
    block_end: bool  # True for the last slab of a sample block


class ChunkSource:
    """Reads one stream array (T, N, *element) chunk by chunk: tick ``t``, chunk column ``col``.

    Chunk column ``col`` holds sample rows ``col * per_chunk`` up to ``(col + 1) * per_chunk`` (clipped to
    N). A chunk that was never written (no sample logged in the tick) reads as NaN, its fill value. Safe to
    call from several threads at once.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.n = int(array.shape[1])
        self.per_chunk = int(array.chunks[1])
        self.element = tuple(int(d) for d in array.shape[2:])
        self.dtype = np.dtype(array.dtype)
        self.n_cols = -(-self.n // self.per_chunk)
        meta: dict[str, Any] = dict(array.metadata.to_dict())  # the array's zarr.json document
        self._folder = _chunk_folder(array, meta)
        self._checksum = bool(has_checksum(meta))
        self._local = isinstance(array.store, LocalStore)
        self._suffix = "/0" * len(self.element)
        self._nbytes = self.per_chunk * int(np.prod(self.element, dtype=np.int64)) * self.dtype.itemsize

    @property
    def direct(self) -> bool:
        """True when chunks are decoded straight from their files, False when read through Zarr."""
        return self._folder is not None

    def width(self, col: int) -> int:
        """Sample rows in chunk column ``col``."""
        return min(self.per_chunk, self.n - col * self.per_chunk)

    def read(self, tick: int, col: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values of chunk ``(tick, col)`` as float32, shape ``(width(col), *element)``, written into ``out`` if given.

        Memory: the result, plus one decoded chunk for an edge chunk or a float16 stream.
        """
        lo = col * self.per_chunk
        w = self.width(col)
        if out is None:
            out = np.empty((w, *self.element), np.float32)
        if self._folder is None:
            out[...] = self.array[tick, lo : lo + w]
            return out
        data, path = self._fetch(f"{tick}/{col}{self._suffix}")
        if data is None:
            out.fill(np.nan)
            return out
        whole = w == self.per_chunk and self.dtype == np.float32 and out.flags.c_contiguous
        target = out if whole else np.empty((self.per_chunk, *self.element), self.dtype)
        decode_chunk(data, self._nbytes, path, out=target, checksum=self._checksum)
        if not whole:
            out[...] = target[:w]
        return out


    def _fetch(self, name: str) -> tuple[bytes | None, Any]:
        """The stored bytes of chunk ``name`` (None if it was never written), and its path or URL for messages."""
        assert self._folder is not None
        if self._local:
            path = Path(self._folder) / name
            try:
                with open(path, "rb") as f:
                    return f.read(), path
            except FileNotFoundError:
                return None, path
        key = f"{self._folder}/{name}"  # an object store: fetched through Zarr's store (fsspec), ~1 request
        data = sync(self.array.store.get(key, prototype=_PROTO))
        return (None if data is None else data.to_bytes()), f"{self.array.store}/{key}"


def _chunk_folder(array: zarr.Array, meta: dict[str, Any]) -> str | None:
    """Where ``array``'s chunks are (a local folder, or a key prefix in its store) if this module can decode them
    itself (``meta``: its zarr.json document), else None."""
    store = array.store
    fill = meta.get("fill_value")
    if (
        has_checksum(meta) is None
        or not np.little_endian
        or meta.get("data_type") not in ("float32", "float16")
        or not (isinstance(fill, str) and fill == "NaN" or isinstance(fill, float) and np.isnan(fill))
    ):
        return None
    return str(Path(store.root) / array.path / "c") if isinstance(store, LocalStore) else f"{array.path}/c"


def read_chunks(source: ChunkSource, keys: Iterable[tuple[int, int]]) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ``((tick, col), values)`` for each key in order, reading up to ``READ_AHEAD_CHUNKS`` ahead in threads.

    Memory: at most ``READ_AHEAD_CHUNKS + 1`` decoded chunks (about 1 MiB each).
    """
    pool = _read_pool()
    todo = iter(keys)
    pending: deque[tuple[tuple[int, int], Future[np.ndarray]]] = deque()
    try:
        for key in todo:
            pending.append((key, pool.submit(source.read, *key)))
            if len(pending) > READ_AHEAD_CHUNKS:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def scan(
    array: zarr.Array,
    tick_index: np.ndarray,
    *,
    budget_bytes: int | None = None,
    reuse: bool = False,
    rows: tuple[int, int] | None = None,
) -> Iterator[Slab]:
    """Yield slabs of ``array`` (T, N, *element) at the ticks ``tick_index`` (sorted, unique), block by block.

    ``rows``: only the blocks of sample rows ``lo..hi`` (``lo`` a block start of :func:`block_layout`; the Dask
    engine scores one block per task), else all.

    Memory: two slabs (the one yielded and the next, read meanwhile), together at most
    ``max(budget_bytes, two chunk rows)`` bytes of float32 (default ``SCAN_BUDGET_BYTES``). A yielded slab's
    values are the caller's and never written again, unless ``reuse``: then the caller is done with them
    when it asks for the next slab, and their memory is refilled (which saves the page faults of touching a
    fresh array, about a third of the time it takes to decode it).
    """
    budget_bytes = SCAN_BUDGET_BYTES if budget_bytes is None else budget_bytes
    source = ChunkSource(array)
    n = source.n
    n_ticks = int(tick_index.size)
    if n_ticks == 0 or n == 0:
        return
    width, ticks_per_slab = block_layout(n, source.per_chunk, source.element, n_ticks, budget_bytes)
    first, end = rows if rows is not None else (0, n)
    plan = [
        (lo, min(n, lo + width), start, min(n_ticks, start + ticks_per_slab))
        for lo in range(first, min(n, end), width)
        for start in range(0, n_ticks, ticks_per_slab)
    ]
    if not source.direct:
        runs = contiguous_runs(tick_index)
        for i, (lo, hi, start, stop) in enumerate(plan):
            values = read_zarr(array, tick_index, runs, start, stop, lo, hi)
            report(i + 1, len(plan))
            yield Slab(lo, hi, np.arange(start, stop), values, start == 0, stop == n_ticks)
        return
    spare: np.ndarray | None = None  # with reuse: the memory of the slab the caller is done with
    pending = _submit(source, tick_index, plan[0], None)
    try:
        for i, (lo, hi, start, stop) in enumerate(plan):
            values, futures = pending
            for future in futures:
                future.result()
            pending = _submit(source, tick_index, plan[i + 1], spare) if i + 1 < len(plan) else (values, [])
            report(i + 1, len(plan))
            yield Slab(lo, hi, np.arange(start, stop), values, start == 0, stop == n_ticks)
            spare = values.base if reuse and values.base is not None else None
    finally:
        for future in pending[1]:
            future.cancel()


def block_layout(n: int, per_chunk: int, element: tuple[int, ...], n_ticks: int, budget_bytes: int) -> tuple[int, int]:
    """(samples per block, ticks per slab) of :func:`scan`'s plan, a pure function of the stream's shape and the
    scan budget (so the Dask engine's tasks score the same blocks and slabs): blocks start at multiples of the
    first and slabs at multiples of the second (the last of each clipped). Slab values are float32 whatever
    the stored dtype, hence 4 bytes. As many whole chunks per block as fit with all ticks; if even one chunk
    does not, the ticks are split."""
    slab_bytes = max(1, budget_bytes // 2)
    element_bytes = 4 * int(np.prod(element, dtype=np.int64))
    chunks_per_block = max(1, slab_bytes // max(1, n_ticks * per_chunk * element_bytes))
    width = min(n, chunks_per_block * per_chunk)
    ticks_per_slab = int(max(1, min(n_ticks, slab_bytes // max(1, width * element_bytes))))
    return width, ticks_per_slab


def _submit(
    source: ChunkSource, tick_index: np.ndarray, item: tuple[int, int, int, int], spare: np.ndarray | None
) -> tuple[np.ndarray, list[Future[np.ndarray]]]:
    """Start reading one slab into a view of ``spare`` (a flat float32 buffer) if it is large enough, else into
    a new buffer; return the slab's values with the futures that fill them."""
    lo, hi, start, stop = item
    shape = (stop - start, hi - lo, *source.element)
    size = int(np.prod(shape, dtype=np.int64))
    if spare is None or spare.size < size:
        spare = np.empty(size, np.float32)
    values = spare[:size].reshape(shape)
    pool = _read_pool()
    futures = []
    for col in range(lo // source.per_chunk, -(-hi // source.per_chunk)):
        a = col * source.per_chunk - lo
        b = a + source.width(col)
        for i in range(stop - start):
            futures.append(pool.submit(source.read, int(tick_index[start + i]), col, values[i, a:b]))
    return values, futures


def contiguous_runs(tick_index: np.ndarray) -> list[tuple[int, int]]:
    """Split positions 0..len-1 of a sorted tick list into runs of consecutive ticks: [(pos_start, pos_stop)]."""
    breaks = np.flatnonzero(np.diff(tick_index) != 1) + 1
    edges = np.concatenate([[0], breaks, [tick_index.size]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def read_zarr(
    array: zarr.Array, tick_index: np.ndarray, runs: list[tuple[int, int]], start: int, stop: int, lo: int, hi: int
) -> np.ndarray:
    """Rows lo..hi at tick positions start..stop (``runs`` from :func:`contiguous_runs`) as float32, through Zarr."""
    # Basic slices over consecutive ticks are ~10x faster in Zarr than orthogonal (integer-array) selection.
    parts = []
    for a, b in runs:
        a, b = max(a, start), min(b, stop)
        if a < b:
            t0 = int(tick_index[a])
            parts.append(np.asarray(array[t0 : t0 + (b - a), lo:hi]))
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return values.astype(np.float32, copy=False)
