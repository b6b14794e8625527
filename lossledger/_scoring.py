"""``Ledger.scores``: run the score engine over a stream and cache the result as parquet in the ledger.

Cache: ``<ledger>/cache/scores/<run>/<stream>.<dt>.parquet``, written block by block (so the result never
needs to fit in memory while it is computed) to a temp file, then renamed into place. It is valid while the
run's commit record is unchanged (same tick count and ``updated`` stamp, stored in the parquet metadata);
windows (``ticks=``) are not cached. The cache holds derived data only: it is written whenever the folder is
writable, also through a ledger opened read-only, and deleting it loses nothing.
"""

from __future__ import annotations

import json
import os
import uuid
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


def cache_path(root: Path, run: str, stream: str, dt: str) -> Path:
    return root / "cache" / "scores" / run / f"{stream}.{dt}.parquet"


def compute_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True
) -> pa.Table:
    """Scores of ``stream`` in ``run`` (see :mod:`lossledger.scores`), one row per sample in row order, NaN missing."""
    return null_to_nan(stored_scores(io, samples, run, stream, dt, ticks, use_cache=use_cache))


def stored_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, use_cache: bool = True
) -> pa.Table:
    """Like :func:`compute_scores`, with missing scores as null, as the cache stores them."""
    if dt not in DT_MODES:
        raise ShapeMismatchError(f"dt must be one of {list(DT_MODES)} (Δt per tick), got {dt!r}")
    commit = read_run_attrs(io, run)["commit"]
    if stream not in commit["streams"]:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}"
        )
    n_ticks = commit["ticks"]
    stamp = {"ticks": n_ticks, "updated": commit["updated"], "version": _CACHE_VERSION}
    path = cache_path(io.root, run, stream, dt)
    cacheable = use_cache and ticks is None
    if cacheable:
        cached = _read_cache(path, stamp)
        if cached is not None:
            return cached
    tick_index = np.unique(tick_positions(ticks, n_ticks))  # a window counts each tick once
    rows = read_ticks(io, run, commit)
    dts = tick_durations(dt, rows["step"], rows["wall"])[tick_index] if n_ticks else np.zeros(0)
    array = io.open_array(stream_key(run, stream))
    schema = scores_schema(samples.label is not None)
    batches = _batches(array, tick_index, dts, samples, schema)
    if cacheable and _writable(path.parent):
        _write_cache(path, schema, batches, stamp)
        cached = _read_cache(path, stamp)
        assert cached is not None
        return cached
    return pa.Table.from_batches(list(batches), schema=schema)


def _batches(array, tick_index: np.ndarray, dts: np.ndarray, samples: Samples, schema: pa.Schema):
    if tick_index.size == 0:
        stats = {name: np.full(samples.n, np.nan) for name in schema.names}
        stats["n_obs"] = np.zeros(samples.n, np.int64)
        yield block_table(schema, samples.sample_id, samples.label, stats)
        return
    for lo, hi, stats in score_blocks(array, tick_index, dts):
        label = None if samples.label is None else samples.label[lo:hi]
        yield block_table(schema, samples.sample_id[lo:hi], label, stats)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _write_cache(path: Path, schema: pa.Schema, batches, stamp: dict[str, Any]) -> None:
    schema = schema.with_metadata({b"lossledger": json.dumps(stamp).encode()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                writer.write_batch(batch.replace_schema_metadata(schema.metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(path: Path, stamp: dict[str, Any]) -> pa.Table | None:
    try:
        table = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowInvalid):
        return None
    meta = (table.schema.metadata or {}).get(b"lossledger")
    if meta is None or json.loads(meta) != stamp:
        return None
    return table.replace_schema_metadata(None)
