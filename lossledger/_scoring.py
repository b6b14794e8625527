"""``Ledger.scores``: run the score engine over a stream into a file, and hand the file out memory-mapped.

Cache: ``<ledger>/cache/scores/<run>/<stream>.<dt>.arrow``, an uncompressed Arrow IPC file written batch by
batch (at most :data:`BATCH_ROWS` rows each, so the result never has to fit in memory) to a temp file, then
renamed into place. It is valid while the run's commit record is unchanged (same tick count and ``updated``
stamp, stored in the file's schema metadata with the cache version) and it has the ledger's rows and
columns; windows (``ticks=``) are not cached. The cache holds derived data only: it is written whenever the
folder is writable, also through a ledger opened read-only, and deleting it loses nothing. Files are
replaced by rename, never rewritten in place, so a table mapped from an older file stays valid.

A missing score is stored both as null (the validity bitmap: DuckDB then skips it in aggregates) and as NaN
in the values under it, so the Python API's NaN form is the same buffers without the bitmap (:func:`nan_view`,
no copy).

Results are tables over a memory-mapped file (zero-copy): they cost address space, and RSS only for the pages
the caller touches, which the OS can drop again. A result that is not cached (a window, a ledger whose cache
folder cannot be written, or one on an object store, which has no local folder) goes to a temp file without a name (``O_TMPFILE``: a crash leaves nothing
behind) in ``<ledger>/cache/``, or else in the system temp folder, mapped the same way; only when neither can
be written is it built in memory (~80 bytes per sample). Consumers that go through every row (``top``,
``export``) read batch by batch (:func:`score_batches`). Several ``dt`` modes are computed in one read of
the stream (:func:`stored_scores_all`, for the SQL view). A table returned by :func:`compute_scores` is
remembered while someone holds it, tied to the cache file it matches: asking again returns it without
opening the file, and deleting or rewriting the file forgets it.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa

from . import _scan
from ._arrays import tick_positions
from ._commit import read_run_attrs, read_ticks
from ._samples import Samples
from ._store import StoreIO
from .errors import ShapeMismatchError, UnknownStreamError
from .format import stream_key
from .scores import DT_MODES, SCORE_COLUMNS, block_table, score_blocks, scores_schema, tick_durations

_CACHE_VERSION = 2
#: Rows per record batch of a score file: a reader going batch by batch holds ~20 MB (9 columns of 8 bytes).
BATCH_ROWS = 1 << 18
#: Values per sample block at most: the engine keeps ~80 bytes of state per value of a block, and the scan
#: widens blocks when a run has few ticks (8.4M samples for one tick: 1.1 GB more at the peak). Narrower
#: blocks cost no time: one tick of 10M samples scored in 0.22 s in blocks of 1M, 0.32 s in blocks of 8.4M.
BLOCK_VALUES = 1 << 20
#: What computes the statistics of a stream's sample blocks: ``(array, tick_index, dts (k, n), *, budget_bytes)``
#: to ``(lo, hi, stats)`` per block in row order, as :func:`lossledger.scores.score_blocks` yields them.
BlockSource = Callable[..., Iterator[tuple[int, int, dict[str, Any]]]]
#: Tables handed out by :func:`compute_scores`, by (cache file, its identity, commit stamp); held weakly.
_handed_out: weakref.WeakValueDictionary[tuple, pa.Table] = weakref.WeakValueDictionary()


def cache_path(root: Path, run: str, stream: str, dt: str) -> Path:
    return root / "cache" / "scores" / run / f"{stream}.{dt}.arrow"


class ScoreFile:
    """The scores of one ``dt`` mode (missing as null): a table over a memory-mapped file, or in memory.

    ``path`` is the cache file it was read from or written to (None for a window or an uncacheable result).
    """

    def __init__(self, table: pa.Table, path: Path | None, mapping: mmap.mmap | None) -> None:
        self.table = table
        self.path = path
        self._mapping = mapping

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The table's record batches in row order; memory: one batch's pages at a time (each batch's pages are
        given back to the OS, which keeps them in its page cache, when the next one is asked for)."""
        for batch in self.table.to_batches():
            yield batch
            if self._mapping is not None:
                self._mapping.madvise(mmap.MADV_DONTNEED)  # clean file pages: touching them again re-reads them


def compute_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True,
    blocks: BlockSource | None = None,
) -> pa.Table:
    """Scores of ``stream`` in ``run`` (see :mod:`lossledger.scores`), one row per sample in row order, NaN missing.

    ``blocks`` computes the per-block statistics (default :func:`lossledger.scores.score_blocks`; the Dask
    engine's tasks); whichever does, the blocks, slabs and cache are the same. Memory: while computing, the scan's slabs
    (64 MB) and a block's state; the result is a memory-mapped file (RSS only for the pages the caller touches),
    or ~80 bytes per sample where no file can be written.
    """
    cacheable = use_cache and ticks is None and io.local
    key = _handed_out_key(io, run, stream, dt) if cacheable else None
    if key is not None and (table := _handed_out.get(key)) is not None:
        return table
    before = _commit_id(read_run_attrs(io, run)["commit"]) if cacheable else None
    table = nan_view(stored_scores(io, samples, run, stream, dt, ticks, use_cache=use_cache, blocks=blocks))
    key = _handed_out_key(io, run, stream, dt) if cacheable else None
    # Remember the table only under the commit it was computed from: a commit landing meanwhile changes the stamp.
    if key is not None and key[-1] == before:
        _handed_out[key] = table
    return table


def stored_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True,
    blocks: BlockSource | None = None,
) -> pa.Table:
    """Like :func:`compute_scores`, with missing scores as null, as the files store them."""
    return _score_files(io, samples, run, stream, (dt,), ticks, use_cache, blocks=blocks)[dt].table


def stored_scores_all(io: StoreIO, samples: Samples, run: str, stream: str) -> dict[str, ScoreFile]:
    """The scores over all ticks of every ``dt`` mode (missing as null; ``path`` set where cached); the modes not
    cached are computed in one read of the stream."""
    return _score_files(io, samples, run, stream, DT_MODES, None, True)


def score_batches(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema of the scores and an iterator over them (missing as null), batches of at most
    :data:`BATCH_ROWS` rows in row order; arguments are checked now, nothing is read before the first batch.

    Over all ticks they come from the cache (computed into it first when stale or missing); a window, or a
    ledger whose cache folder cannot be written, is computed batch by batch as it is read, without a file.
    Memory: one batch (~20 MB), or the engine's (the scan's slabs and a block's state) while computing.
    """
    commit = _checked_commit(io, run, stream, (dt,))
    tick_positions(ticks, commit["ticks"])  # a bad window raises here
    return scores_schema(samples.label is not None), _batches(io, samples, run, stream, dt, ticks)


def _batches(io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any) -> Iterator[pa.RecordBatch]:
    if ticks is None and io.local:
        cached = _score_files(io, samples, run, stream, (dt,), None, True, compute_uncached=False)
        if dt in cached:
            yield from cached[dt].batches()
            return
    commit = _checked_commit(io, run, stream, (dt,))
    for per_dt in _engine(io, samples, run, stream, commit, (dt,), ticks):
        yield per_dt[0]


def nan_view(table: pa.Table) -> pa.Table:
    """Score columns with missing as NaN (the Python API's convention) instead of null: the same value buffers
    without the validity bitmap (no copy), which is right because score files keep NaN under every null."""
    for name in SCORE_COLUMNS:
        column = table[name]
        if column.null_count == 0:
            continue
        chunks = [
            pa.Array.from_buffers(chunk.type, len(chunk), [None, chunk.buffers()[1]], null_count=0, offset=chunk.offset)
            for chunk in column.chunks
        ]
        table = table.set_column(table.column_names.index(name), name, pa.chunked_array(chunks, column.type))
    return table


def _checked_commit(io: StoreIO, run: str, stream: str, dts: tuple[str, ...]) -> dict[str, Any]:
    for dt in dts:
        if dt not in DT_MODES:
            raise ShapeMismatchError(f"dt must be one of {list(DT_MODES)} (Δt per tick), got {dt!r}")
    commit = read_run_attrs(io, run)["commit"]
    if stream not in commit["streams"]:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}"
        )
    return commit


def _score_files(
    io: StoreIO, samples: Samples, run: str, stream: str, dts: tuple[str, ...], ticks: Any, use_cache: bool,
    *, compute_uncached: bool = True, blocks: BlockSource | None = None,
) -> dict[str, ScoreFile]:
    """The scores of each ``dt`` in ``dts``: from valid cache files, the others computed in one read into new
    cache files (when cacheable and writable) or else into temp files; with ``compute_uncached=False`` the
    modes that cannot be cached are left out of the result instead."""
    commit = _checked_commit(io, run, stream, dts)
    stamp = _stamp(commit)
    schema = scores_schema(samples.label is not None)
    cacheable = use_cache and ticks is None and io.local  # an object store's ledger has no local cache folder
    out: dict[str, ScoreFile] = {}
    if cacheable:
        for dt in dts:
            found = _open_cache(cache_path(io.root, run, stream, dt), stamp)
            if found is not None and found.table.num_rows == samples.n and found.table.schema.equals(schema):
                out[dt] = found
    todo = tuple(dt for dt in dts if dt not in out)
    if not todo:
        return out
    cache_it = cacheable and _writable(cache_path(io.root, run, stream, todo[0]).parent)
    if not cache_it and not compute_uncached:
        return out
    writers: dict[str, _FileWriter | _MemoryWriter] = {}
    try:
        for dt in todo:
            writers[dt] = (
                _CacheWriter(cache_path(io.root, run, stream, dt), schema, stamp) if cache_it
                else _scratch_writer(schema, io.root / "cache" if io.local else None)
            )
        for per_dt in _engine(io, samples, run, stream, commit, todo, ticks, blocks):
            for dt, batch in zip(todo, per_dt):
                writers[dt].write(batch)
        for dt in todo:
            out[dt] = writers[dt].commit()
    finally:
        for writer in writers.values():
            writer.discard()
    return out


def _engine(
    io: StoreIO, samples: Samples, run: str, stream: str, commit: dict[str, Any], dts: tuple[str, ...], ticks: Any,
    blocks_of: BlockSource | None = None,
) -> Iterator[list[pa.RecordBatch]]:
    """Yield, per slice of at most :data:`BATCH_ROWS` samples, one record batch for each ``dt`` in ``dts``."""
    tick_index = np.unique(tick_positions(ticks, commit["ticks"]))  # a window counts each tick once
    rows = read_ticks(io, run, commit)
    series = np.stack([tick_durations(dt, rows["step"], rows["wall"])[tick_index] for dt in dts])
    schema = scores_schema(samples.label is not None)
    if tick_index.size == 0:  # an empty window: nothing observed
        blocks: Iterator[tuple[int, int, dict[str, Any]]] = (
            (lo, min(samples.n, lo + BATCH_ROWS), _unobserved(min(samples.n, lo + BATCH_ROWS) - lo, len(dts)))
            for lo in range(0, samples.n, BATCH_ROWS)
        )
    else:
        array = io.open_array(stream_key(run, stream))
        compute = blocks_of or score_blocks  # looked up now (the default is this module's score_blocks)
        blocks = compute(array, tick_index, series, budget_bytes=_slab_budget(array, tick_index.size))
    for lo, hi, stats in blocks:
        label = None if samples.label is None else samples.label[lo:hi]
        per_dt = [
            block_table(schema, samples.sample_id[lo:hi], label, {**stats, "action": action})
            for action in stats["action"]
        ]
        for start in range(0, hi - lo, BATCH_ROWS):
            yield [batch.slice(start, BATCH_ROWS) for batch in per_dt]


def _slab_budget(array: Any, n_ticks: int) -> int:
    """The scan budget (bytes of float32 slabs) that keeps a sample block to whole chunks of at most
    :data:`BLOCK_VALUES` values, or the scan's default budget if that is less."""
    chunk_values = int(array.chunks[1]) * int(np.prod(array.shape[2:], dtype=np.int64))
    chunks = max(1, BLOCK_VALUES // chunk_values)
    # The scan makes a block as many chunks wide as fit in half the budget with all ticks (lossledger._scan).
    return min(_scan.SCAN_BUDGET_BYTES, 2 * chunks * chunk_values * 4 * n_ticks)


def _unobserved(width: int, k: int) -> dict[str, Any]:
    """Statistics of ``width`` samples never observed, with ``k`` actions (as :func:`score_blocks` yields them)."""
    stats: dict[str, Any] = {name: np.full(width, np.nan) for name in SCORE_COLUMNS}
    stats["action"] = np.full((k, width), np.nan)
    stats["n_obs"] = np.zeros(width, np.int64)
    return stats


def _stamp(commit: dict[str, Any]) -> dict[str, Any]:
    return {"ticks": commit["ticks"], "updated": commit["updated"], "version": _CACHE_VERSION}


def _commit_id(commit: dict[str, Any]) -> str:
    return json.dumps([commit["ticks"], commit["updated"]])


def _handed_out_key(io: StoreIO, run: str, stream: str, dt: str) -> tuple | None:
    path = cache_path(io.root, run, stream, dt)
    try:
        commit = read_run_attrs(io, run)["commit"]
        st = path.stat()
    except (OSError, KeyError):
        return None
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size, _commit_id(commit))


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _mapped(file: IO[bytes]) -> tuple[mmap.mmap, pa.ipc.RecordBatchFileReader]:
    """Map an open score file read-only and open it as an Arrow IPC file (raises on a damaged file)."""
    mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return mapping, pa.ipc.open_file(pa.py_buffer(mapping))


def _read_cache(path: Path, stamp: dict[str, Any]) -> pa.Table | None:
    """The scores in the cache file at ``path`` (missing as null, memory-mapped), if they are of the commit
    ``stamp`` names; else None."""
    found = _open_cache(path, stamp)
    return None if found is None else found.table


def _open_cache(path: Path, stamp: dict[str, Any]) -> ScoreFile | None:
    """The cache file at ``path`` mapped, if it holds the scores of the commit ``stamp`` names; else None."""
    try:
        with open(path, "rb") as file:
            mapping, reader = _mapped(file)
        meta = (reader.schema.metadata or {}).get(b"lossledger")
        if meta is None or json.loads(meta) != stamp:
            return None
        table = reader.read_all()
    except (OSError, ValueError, pa.ArrowInvalid):  # missing, empty, damaged (a reader never sees a partial one)
        return None
    return ScoreFile(table.replace_schema_metadata(None), path, mapping)


class _FileWriter:
    """Writes one score file batch by batch into ``file``; :meth:`commit` maps it and returns it."""

    def __init__(self, file: IO[bytes], schema: pa.Schema, stamp: dict[str, Any] | None) -> None:
        self.file: IO[bytes] | None = file
        meta = {} if stamp is None else {b"lossledger": json.dumps(stamp).encode()}
        self.writer = pa.ipc.new_file(file, schema.with_metadata(meta))

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch)

    def commit(self) -> ScoreFile:
        assert self.file is not None
        self.writer.close()
        self.file.flush()
        mapping, reader = _mapped(self.file)
        self.file.close()
        self.file = None
        return ScoreFile(reader.read_all().replace_schema_metadata(None), None, mapping)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _CacheWriter(_FileWriter):
    """Writes the cache file ``path`` through a hidden temp file beside it, renamed into place by :meth:`commit`."""

    def __init__(self, path: Path, schema: pa.Schema, stamp: dict[str, Any]) -> None:
        self.path = path
        self.tmp: Path | None = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        super().__init__(open(self.tmp, "xb+"), schema, stamp)  # noqa: SIM115 - closed by commit() or discard()

    def commit(self) -> ScoreFile:
        done = super().commit()  # mapped before the rename: the table is this file's, whatever replaces it later
        assert self.tmp is not None
        os.replace(self.tmp, self.path)
        self.tmp = None
        done.path = self.path
        return done

    def discard(self) -> None:
        super().discard()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


class _MemoryWriter:
    """Keeps the batches in memory: the last resort when no file can be written (~80 bytes per sample)."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.batches: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self.batches.append(batch)

    def commit(self) -> ScoreFile:
        return ScoreFile(pa.Table.from_batches(self.batches, schema=self.schema), None, None)

    def discard(self) -> None:
        self.batches = []


def _scratch_writer(schema: pa.Schema, scratch: Path | None) -> _FileWriter | _MemoryWriter:
    """A writer to a temp file without a name (``O_TMPFILE`` where the OS has it: nothing is left behind by a
    crash) in ``scratch``, or else in the system temp folder, or else to memory."""
    for folder in (scratch, None) if scratch is not None else (None,):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            return _FileWriter(tempfile.TemporaryFile(dir=folder), schema, None)
        except OSError:
            continue
    return _MemoryWriter(schema)
