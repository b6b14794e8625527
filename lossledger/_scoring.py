"""``Ledger.scores``: run the score engine over a stream and cache the result as parquet in the ledger.

Cache: ``<ledger>/cache/scores/<run>/<stream>.<dt>.parquet``, written block by block (so the result never
needs to fit in memory while it is computed) to a temp file, then renamed into place. It is valid while the
run's commit record is unchanged (same tick count and ``updated`` stamp, stored in the parquet metadata);
windows (``ticks=``) are not cached. The cache holds derived data only: it is written whenever the folder is
writable, also through a ledger opened read-only, and deleting it loses nothing. The files are plain
(no dictionary, no compression): loss statistics are random float64s that neither shrinks, and encoding them
costs more than the scores themselves.

Several ``dt`` modes are computed in one read of the stream (:func:`stored_scores_all`, for the SQL view).
A table returned by :func:`compute_scores` is remembered while someone holds it, tied to the cache file it
matches: asking again (``Ledger.top`` right after ``Ledger.scores``) returns it without reading the file, and
deleting or rewriting the file forgets it.
"""

from __future__ import annotations

import json
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._arrays import tick_positions
from ._commit import read_run_attrs, read_ticks
from ._samples import Samples
from ._store import StoreIO
from .errors import ShapeMismatchError, UnknownStreamError
from .format import stream_key
from .scores import DT_MODES, block_table, null_to_nan, score_blocks, scores_schema, tick_durations

_CACHE_VERSION = 1
#: Tables handed out by :func:`compute_scores`, by (cache file, its identity, commit stamp); held weakly.
_handed_out: weakref.WeakValueDictionary[tuple, pa.Table] = weakref.WeakValueDictionary()


def cache_path(root: Path, run: str, stream: str, dt: str) -> Path:
    return root / "cache" / "scores" / run / f"{stream}.{dt}.parquet"


def compute_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True
) -> pa.Table:
    """Scores of ``stream`` in ``run`` (see :mod:`lossledger.scores`), one row per sample in row order, NaN missing.

    Memory: the scan's slabs (64 MB) plus the result (~80 bytes per sample) and a block's state.
    """
    cacheable = use_cache and ticks is None
    key = _handed_out_key(io, run, stream, dt) if cacheable else None
    if key is not None and (table := _handed_out.get(key)) is not None:
        return table
    before = json.dumps(_stamp(read_run_attrs(io, run)["commit"])) if cacheable else None
    table = null_to_nan(stored_scores(io, samples, run, stream, dt, ticks, use_cache=use_cache))
    key = _handed_out_key(io, run, stream, dt) if cacheable else None
    # Remember the table only under the commit it was computed from: a commit landing meanwhile changes the stamp.
    if key is not None and key[-1] == before:
        _handed_out[key] = table
    return table


def stored_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True
) -> pa.Table:
    """Like :func:`compute_scores`, with missing scores as null, as the cache stores them."""
    return _scores(io, samples, run, stream, (dt,), ticks, use_cache)[dt]


def stored_scores_all(io: StoreIO, samples: Samples, run: str, stream: str) -> dict[str, pa.Table]:
    """:func:`stored_scores` over all ticks for every ``dt`` mode; the ones not cached are computed in one read."""
    return _scores(io, samples, run, stream, DT_MODES, None, True)


def _scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dts: tuple[str, ...], ticks: Any, use_cache: bool
) -> dict[str, pa.Table]:
    for dt in dts:
        if dt not in DT_MODES:
            raise ShapeMismatchError(f"dt must be one of {list(DT_MODES)} (Δt per tick), got {dt!r}")
    commit = read_run_attrs(io, run)["commit"]
    if stream not in commit["streams"]:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}"
        )
    n_ticks = commit["ticks"]
    stamp = _stamp(commit)
    cacheable = use_cache and ticks is None
    out: dict[str, pa.Table] = {}
    if cacheable:
        for dt in dts:
            cached = _read_cache(cache_path(io.root, run, stream, dt), stamp)
            if cached is not None:
                out[dt] = cached
    todo = [dt for dt in dts if dt not in out]
    if not todo:
        return out
    tick_index = np.unique(tick_positions(ticks, n_ticks))  # a window counts each tick once
    rows = read_ticks(io, run, commit)
    series = np.stack([tick_durations(dt, rows["step"], rows["wall"])[tick_index] for dt in todo])
    schema = scores_schema(samples.label is not None)
    writers = {}
    if cacheable and _writable(cache_path(io.root, run, stream, todo[0]).parent):
        writers = {dt: _CacheWriter(cache_path(io.root, run, stream, dt), schema, stamp) for dt in todo}
    batches: dict[str, list[pa.RecordBatch]] = {dt: [] for dt in todo}
    try:
        array = io.open_array(stream_key(run, stream)) if tick_index.size else None
        for per_dt in _batches(array, tick_index, series, samples, schema):
            for dt, batch in zip(todo, per_dt):
                batches[dt].append(batch)
                if dt in writers:
                    writers[dt].write(batch)
        for writer in writers.values():
            writer.commit()
    finally:
        for writer in writers.values():
            writer.discard()
    for dt in todo:
        out[dt] = pa.Table.from_batches(batches[dt], schema=schema)
    return out


def _batches(array, tick_index: np.ndarray, series: np.ndarray, samples: Samples, schema: pa.Schema):
    """Yield, per sample block, one record batch per row of ``series`` (one Δt series per dt mode)."""
    if tick_index.size == 0:
        stats: dict[str, Any] = {name: np.full(samples.n, np.nan) for name in schema.names}
        stats["n_obs"] = np.zeros(samples.n, np.int64)
        yield [block_table(schema, samples.sample_id, samples.label, stats)] * series.shape[0]
        return
    for lo, hi, stats in score_blocks(array, tick_index, series):
        label = None if samples.label is None else samples.label[lo:hi]
        yield [
            block_table(schema, samples.sample_id[lo:hi], label, {**stats, "action": action})
            for action in stats["action"]
        ]


def _stamp(commit: dict[str, Any]) -> dict[str, Any]:
    return {"ticks": commit["ticks"], "updated": commit["updated"], "version": _CACHE_VERSION}


def _handed_out_key(io: StoreIO, run: str, stream: str, dt: str) -> tuple | None:
    path = cache_path(io.root, run, stream, dt)
    try:
        commit = read_run_attrs(io, run)["commit"]
        st = path.stat()
    except (OSError, KeyError):
        return None
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size, json.dumps(_stamp(commit)))


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


class _CacheWriter:
    """Writes one cache file batch by batch to a temp file; :meth:`commit` renames it into place."""

    def __init__(self, path: Path, schema: pa.Schema, stamp: dict[str, Any]) -> None:
        self.path = path
        self.schema = schema.with_metadata({b"lossledger": json.dumps(stamp).encode()})
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.tmp, self.schema, compression="none", use_dictionary=False
        )

    def write(self, batch: pa.RecordBatch) -> None:
        assert self.writer is not None
        self.writer.write_batch(batch.replace_schema_metadata(self.schema.metadata))

    def commit(self) -> None:
        assert self.writer is not None
        self.writer.close()
        self.writer = None
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.tmp.unlink(missing_ok=True)


def _read_cache(path: Path, stamp: dict[str, Any]) -> pa.Table | None:
    try:
        table = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowInvalid):
        return None
    meta = (table.schema.metadata or {}).get(b"lossledger")
    if meta is None or json.loads(meta) != stamp:
        return None
    return table.replace_schema_metadata(None)
