"""The commit protocol of a run.

A run's group ``zarr.json`` holds the commit record ``attributes["commit"]``::

    {"ticks": T, "streams": {name: {"dtype": "float32", "element_shape": [...], "since": tick}},
     "pending_ticks": {"epoch": [...], "step": [...], "wall": [...]}, "updated": ISO}

``pending_ticks`` holds the rows of the last ticks, not yet written to the ``ticks/`` arrays (the writer
writes them every ``TICKS_FLUSH`` commits and when it closes).

A tick is committed by (1) writing its chunks and, when an array's capacity (its ``shape[0]``, grown by
doubling) is reached, the grown array metadata, then (2) replacing the run's ``zarr.json`` with
``ticks = T + 1`` and the tick's row. Step (2) is one atomic key replacement, so a
reader that reads the commit record first and then only ticks ``< T`` never sees a partial tick, and a
writer killed at any point leaves either T or T + 1 committed ticks. Whatever lies at ticks ``>= T`` (or in
streams the record does not list) is garbage from a killed writer; :func:`recover` removes it before a
writer resumes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeGuard

import numcodecs.blosc
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ._store import PIPELINES, StoreIO, crc32c_bytes
from .errors import (
    CorruptLedgerError,
    InvalidNameError,
    LedgerError,
    LedgerWarning,
    UnknownRunError,
    UnknownStreamError,
)
from .format import STREAM_DTYPES, TICK_COLUMNS, TICKS_CHUNK, check_stream_name, run_key, stream_key, ticks_key

_PROTO = default_buffer_prototype()
#: The end of every message about damage (``Ledger.sql`` also finds it in what DuckDB passes on).
DAMAGED = "the ledger is damaged: restore it from a copy"
#: Chunks :func:`read_stream_chunks` fetches at once.
READ_BATCH = 32


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_run_attrs(io: StoreIO, run: str) -> dict[str, Any]:
    """The run group's attributes (commit record, user attrs, created), checked; raises if there is no such run.

    Raises :class:`UnknownRunError` without the run's metadata, :class:`CorruptLedgerError` (naming the file)
    when the commit record is not one a writer writes: every field is checked, so readers can index it.
    """
    attrs = io.group_attrs(run_key(run))
    if attrs is None:
        raise UnknownRunError(f"no run named {run!r} in {io.root}; existing runs: {list_runs(io)}")
    problem = _record_problem(attrs)
    if problem is not None:
        raise CorruptLedgerError(
            f"run {run!r}: {io.root / run_key(run) / 'zarr.json'} has no valid commit record ({problem}); the "
            "ledger is damaged: restore the run from a copy"
        )
    return attrs


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _record_problem(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a run group's attributes, or None (the layout is docs/format.md's commit record)."""
    commit = attrs.get("commit")
    if not isinstance(commit, dict):
        return "no 'commit' object"
    ticks = commit.get("ticks")
    if not _is_int(ticks) or ticks < 0:
        return f"ticks = {ticks!r}, not a count"
    streams = commit.get("streams")
    if not isinstance(streams, dict):
        return f"streams = {streams!r}, not an object"
    for name, record in streams.items():
        try:
            check_stream_name(name)
        except InvalidNameError:
            return f"stream name {name!r} is not a stream name"
        if not isinstance(record, dict):
            return f"stream {name!r} has record {record!r}, not an object"
        shape, since = record.get("element_shape"), record.get("since")
        if record.get("dtype") not in STREAM_DTYPES:
            return f"stream {name!r} has dtype {record.get('dtype')!r}, not one of {list(STREAM_DTYPES)}"
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            return f"stream {name!r} has element_shape {shape!r}, not a list of sizes"
        if not _is_int(since) or not 0 <= since < ticks:
            return f"stream {name!r} has since = {since!r}, not a tick below ticks = {ticks}"
    pending = commit.get("pending_ticks", {})
    if not isinstance(pending, dict) or (pending and set(pending) != set(TICK_COLUMNS)):
        return f"pending_ticks = {pending!r} is not an object with the columns {list(TICK_COLUMNS)}"
    lengths = set()
    for column, values in pending.items():
        number = _is_int if TICK_COLUMNS[column][0] == "int64" else _is_number
        if not isinstance(values, list) or not all(number(v) for v in values):
            return f"pending_ticks[{column!r}] is not a list of {TICK_COLUMNS[column][0]} values"
        lengths.add(len(values))
    if len(lengths) > 1 or max(lengths, default=0) > ticks:
        return f"pending_ticks has rows of lengths {sorted(lengths)}, not one length of at most ticks = {ticks}"
    if not isinstance(commit.get("updated"), str):
        return f"updated = {commit.get('updated')!r}, not a time stamp"
    if not isinstance(attrs.get("attrs"), dict):
        return f"attrs = {attrs.get('attrs')!r}, not an object of user attributes"
    return None


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def write_run_attrs(io: StoreIO, run: str, attrs: dict[str, Any]) -> None:
    """Replace the run's group metadata in one atomic write: this is the commit point."""
    io.put_json(f"{run_key(run)}/zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})


def list_runs(io: StoreIO) -> list[str]:
    """Names of the runs whose group metadata exists (a half-created run is not listed)."""
    return [name for name in io.list_dir("runs") if io.exists(f"{run_key(name)}/zarr.json")]


def flushed_ticks(commit: dict[str, Any]) -> int:
    """How many tick rows are in the ``ticks/`` arrays (the rest are pending in the commit record)."""
    return int(commit["ticks"]) - len(commit.get("pending_ticks", {}).get("epoch", []))


def read_ticks(io: StoreIO, run: str, commit: dict[str, Any]) -> dict[str, np.ndarray]:
    """The committed tick rows of ``run``, (T,) per column of ``TICK_COLUMNS``: the ``ticks/`` arrays, then
    the rows still pending in the commit record (checked by :func:`read_run_attrs`). Memory O(T)."""
    pending = commit.get("pending_ticks", {})
    flushed = flushed_ticks(commit)
    out = {}
    for column, (dtype, _) in TICK_COLUMNS.items():
        tail = np.asarray(pending.get(column, []), dtype=dtype)
        # A run killed while being created has no tick arrays yet: with nothing flushed there is nothing to read.
        head = read_column(io, ticks_key(run, column), dtype, rows=flushed) if flushed else np.zeros(0, dtype)
        out[column] = np.concatenate([head, tail])
    unwritten = np.flatnonzero(~np.isfinite(out["wall"][:flushed]))
    if unwritten.size:  # the writer writes a finite wall time in every row it flushes
        raise CorruptLedgerError(
            f"{io.root / ticks_key(run, 'wall')} holds no row for committed tick(s) {unwritten[:5].tolist()}: the "
            f"commit record counts more ticks than were written; {DAMAGED}"
        )
    return out


def ensure_tick_arrays(io: StoreIO, run: str) -> None:
    """Create the run's ``ticks/`` arrays if missing (a writer killed while creating the run leaves none)."""
    for column, (dtype, fill) in TICK_COLUMNS.items():
        if not io.exists(f"{ticks_key(run, column)}/zarr.json"):
            io.create_array(ticks_key(run, column), shape=(0,), chunks=(TICKS_CHUNK,), dtype=dtype, fill_value=fill)


def recover(io: StoreIO, run: str, commit: dict[str, Any], n_samples: int) -> int:
    """Remove what a killed writer left past the commit record; return how many objects were removed.

    Call after :func:`ensure_tick_arrays`. Deletes ``*.partial`` temp files, streams the record does not
    list, and chunks at ticks ``>= committed``. Array shapes are capacities (at least ``committed``) and stay;
    arrays that do not match the record (:func:`stream_meta`) raise :class:`CorruptLedgerError`.
    """
    committed, streams, flushed = commit["ticks"], commit["streams"], flushed_ticks(commit)
    removed = io.remove_partial_files(run_key(run))
    # Zarr creates missing parent groups through temp files too: a kill then can leave them one level up. A live
    # writer of another run makes such temp files too (and fails if one vanishes before it renames it), so they
    # are removed only while no other writer is alive; else they stay (harmless) until a later resume.
    if not io.other_writers(run):
        removed += io.remove_partial_files("", recursive=False) + io.remove_partial_files("runs", recursive=False)
    streams_dir = f"{run_key(run)}/streams"
    for name in io.list_dir(streams_dir):
        if name == "zarr.json":  # the implicit group Zarr made when the first stream array was created
            continue
        if name not in streams:
            io.delete_dir(f"{streams_dir}/{name}")
            removed += 1
            continue
        for tick in io.list_dir(f"{stream_key(run, name)}/c"):
            if tick.isdigit() and int(tick) >= committed:
                io.delete_dir(f"{stream_key(run, name)}/c/{tick}")
                removed += 1
    for name in streams:
        stream_meta(io, run, name, commit, n_samples)
    for column, (dtype, _) in TICK_COLUMNS.items():
        column_meta(io, ticks_key(run, column), dtype, flushed)
    if removed:
        warnings.warn(
            f"run {run!r}: removed {removed} leftover object(s) of an uncommitted tick (a writer stopped before "
            f"end_epoch()); the run resumes after its {committed} committed tick(s)",
            LedgerWarning,
            stacklevel=3,
        )
    return removed


# --- checked reads of array metadata and chunks -----------------------------------------------------------
def array_meta(io: StoreIO, key: str, *, ndim: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The metadata document of the array at ``key``, checked to be a Zarr v3 array that lossledger can read.

    Raises :class:`CorruptLedgerError` naming the file when it is missing, not JSON, not an array of ``ndim``
    dimensions and ``dtype``, or has a chunk grid, chunk key encoding or codec Zarr does not know.
    """
    path = io.root / key / "zarr.json"
    meta = io.get_json(f"{key}/zarr.json")
    if meta is None:
        raise CorruptLedgerError(f"{path} is missing: the array {key} is gone; {DAMAGED}")
    shape = meta.get("shape")
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    problem = None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        problem = "not the metadata of a Zarr v3 array"
    elif not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        problem = f"shape {shape!r} is not a list of sizes"
    elif ndim is not None and len(shape) != ndim:
        problem = f"shape {shape} has {len(shape)} dimension(s), not {ndim}"
    elif dtype is not None and meta.get("data_type") != dtype:
        problem = f"data type {meta.get('data_type')!r} is not {dtype!r}"
    elif not isinstance(grid, dict) or grid.get("name") != "regular" or not isinstance(chunks, list) or len(
        chunks
    ) != len(shape) or not all(
        _is_int(c) and c >= 1 for c in chunks
    ):
        problem = f"chunk grid {grid!r} is not a regular grid of {len(shape)} dimension(s)"
    else:
        codecs = meta.get("codecs")
        names = [c.get("name") if isinstance(c, dict) else None for c in codecs] if isinstance(codecs, list) else None
        if not names or not all(isinstance(n, str) and _known_codec(n) for n in names):
            problem = f"codecs {codecs!r} are not codecs Zarr knows"
    if problem:
        raise CorruptLedgerError(f"{path}: {problem}; {DAMAGED}")
    return meta


def _known_codec(name: str) -> bool:
    try:
        zarr.registry.get_codec_class(name)
    except KeyError:
        return False
    return True


def stream_meta(io: StoreIO, run: str, stream: str, commit: dict[str, Any], n_samples: int) -> dict[str, Any]:
    """The checked metadata of a committed stream's array: it holds the committed ticks, one row per sample,
    the element shape and dtype of the record, one tick per chunk, and NaN for what was never written.

    Raises :class:`UnknownStreamError` if ``commit`` does not list ``stream``, :class:`CorruptLedgerError`
    (naming the file) if the array does not match the record.
    """
    records = commit["streams"]
    if stream not in records:
        raise UnknownStreamError(f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(records)}")
    record = records[stream]
    key = stream_key(run, stream)
    element = list(record["element_shape"])
    meta = array_meta(io, key, ndim=2 + len(element), dtype=record["dtype"])
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    problem = None
    if shape[0] < commit["ticks"]:
        problem = f"shape {shape} holds {shape[0]} ticks, fewer than the {commit['ticks']} committed"
    elif shape[1] != n_samples:
        problem = f"shape {shape} has {shape[1]} rows, but the ledger has {n_samples} samples"
    elif shape[2:] != element:
        problem = f"shape {shape} does not end with the element shape {element} of the commit record"
    elif chunks[0] != 1 or chunks[2:] != element:
        problem = f"chunk shape {chunks} is not one tick by whole elements"
    elif meta.get("fill_value") != "NaN":
        problem = f"fill value {meta.get('fill_value')!r} is not NaN (samples not logged must read as NaN)"
    if problem:
        raise CorruptLedgerError(f"{io.root / key / 'zarr.json'}: {problem}; {DAMAGED}")
    return meta


def open_stream(io: StoreIO, run: str, stream: str, commit: dict[str, Any], n_samples: int) -> zarr.Array:
    """A committed stream's array opened for reading, after :func:`stream_meta` checked it."""
    stream_meta(io, run, stream, commit, n_samples)
    key = stream_key(run, stream)
    try:
        return io.open_array(key)
    except LedgerError:
        raise
    except Exception as err:
        raise CorruptLedgerError(
            f"{io.root / key / 'zarr.json'} cannot be opened by Zarr ({type(err).__name__}: {err}); {DAMAGED}"
        ) from err


def check_run(io: StoreIO, run: str, commit: dict[str, Any], n_samples: int) -> None:
    """Check the metadata of every array a reader of ``run`` opens: its committed streams and ``ticks/``."""
    for stream in commit["streams"]:
        stream_meta(io, run, stream, commit, n_samples)
    if flushed_ticks(commit):
        for column, (dtype, _) in TICK_COLUMNS.items():
            column_meta(io, ticks_key(run, column), dtype, flushed_ticks(commit))


def column_meta(io: StoreIO, key: str, dtype: str, rows: int | None) -> dict[str, Any]:
    meta = array_meta(io, key, ndim=1, dtype=dtype)
    if rows is not None and meta["shape"][0] < rows:
        raise CorruptLedgerError(
            f"{io.root / key / 'zarr.json'}: shape {meta['shape']} holds fewer than the {rows} rows committed; "
            f"{DAMAGED}"
        )
    return meta


def read_column(
    io: StoreIO, key: str, dtype: str, *, rows: int | None = None, fill_missing_up_to: int = 0
) -> np.ndarray:
    """Rows ``0 .. rows - 1`` (default: all) of the 1-D array at ``key``, each chunk checked as it is decoded.

    A missing chunk raises :class:`CorruptLedgerError` naming it, unless it holds at most
    ``fill_missing_up_to`` rows: then it reads as the fill value, as Zarr defines it (Zarr does not store a
    chunk that holds only the fill value). Memory: the result.
    """
    meta = column_meta(io, key, dtype, rows)
    n = meta["shape"][0] if rows is None else rows
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    out = np.empty(n, dtype)
    for k in range(-(-n // chunk)):
        lo, hi = k * chunk, min(n, (k + 1) * chunk)
        chunk_key = _chunk_key(meta, key, k)
        if chunk_key is None:  # not the layout lossledger writes: let Zarr read it
            out[lo:hi] = _zarr_read(io, key, slice(lo, hi))
            continue
        data = sync(io.store.get(chunk_key, prototype=_PROTO))
        if data is None:
            if hi - lo > fill_missing_up_to:
                raise CorruptLedgerError(f"chunk {io.root / chunk_key} is missing; {DAMAGED}")
            out[lo:hi] = meta["fill_value"]
            continue
        decoded = decode_chunk(data.to_bytes(), chunk * out.itemsize, io.root / chunk_key, checksum=bool(has_checksum(meta)))
        out[lo:hi] = np.frombuffer(decoded, dtype=np.dtype(dtype).newbyteorder("<"))[: hi - lo]
    return out


def _chunk_key(meta: dict[str, Any], key: str, index: int) -> str | None:
    """The key of chunk ``index`` of a 1-D array if lossledger decodes its chunks itself (:func:`has_checksum`
    is not None), else None."""
    return None if has_checksum(meta) is None else f"{key}/c/{index}"


def has_checksum(meta: dict[str, Any]) -> bool | None:
    """Whether each chunk of the array with metadata ``meta`` ends with a crc32c checksum (format v2), or None
    when its chunks are not in a layout lossledger decodes itself: little-endian ``bytes`` + ``blosc``
    (+ ``crc32c``) under the default chunk key encoding with separator "/"."""
    codecs = meta["codecs"]
    encoding = meta.get("chunk_key_encoding", {})
    names = [c["name"] for c in codecs]
    if (
        names not in PIPELINES
        or codecs[0].get("configuration", {}).get("endian", "little") != "little"
        or encoding.get("name") != "default"
        or encoding.get("configuration", {}).get("separator", "/") != "/"
    ):
        return None
    return names[-1] == "crc32c"


def read_stream_chunks(
    io: StoreIO, key: str, meta: dict[str, Any], chunks: Iterable[tuple[int, int]]
) -> Iterator[tuple[tuple[int, int], np.ndarray | None]]:
    """Yield ``((tick, col), values)`` for each chunk of the stream array at ``key`` (``meta`` checked by
    :func:`stream_meta`): ``values`` (rows of chunk column ``col``, *element) in the stored dtype, or None
    for a chunk never written (no sample of it logged in the tick: all NaN).

    Chunks are fetched ``READ_BATCH`` at a time, concurrently, and each checked as it is decoded; memory:
    one batch of chunks.
    """
    shape, per_chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"][1]
    element = tuple(shape[2:])
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    nbytes = per_chunk * math.prod(element) * dtype.itemsize
    suffix = "/0" * len(element)
    checksum = has_checksum(meta)
    todo = iter(chunks)
    while batch := list(itertools.islice(todo, READ_BATCH)):
        if checksum is None:  # not the layout lossledger writes: let Zarr read it
            for tick, col in batch:
                values = _zarr_read(io, key, (tick, slice(col * per_chunk, (col + 1) * per_chunk)))
                yield (tick, col), values
            continue
        keys = [f"{key}/c/{tick}/{col}{suffix}" for tick, col in batch]
        found = sync(_get_all(io, keys))
        for (tick, col), chunk_key, data in zip(batch, keys, found):
            if data is None:
                yield (tick, col), None
                continue
            decoded = decode_chunk(data.to_bytes(), nbytes, io.root / chunk_key, checksum=checksum)
            width = min(per_chunk, shape[1] - col * per_chunk)
            yield (tick, col), np.frombuffer(decoded, dtype).reshape(per_chunk, *element)[:width]


async def _get_all(io: StoreIO, keys: list[str]) -> list[Any]:
    return await asyncio.gather(*(io.store.get(k, prototype=_PROTO) for k in keys))


def _zarr_read(io: StoreIO, key: str, selection: Any) -> np.ndarray:
    try:
        return np.asarray(io.open_array(key)[selection])
    except Exception as err:
        raise CorruptLedgerError(
            f"array {io.root / key} cannot be read ({type(err).__name__}: {err}); {DAMAGED}"
        ) from err


def decode_chunk(data: bytes, nbytes: int, path: Any, out: np.ndarray | None = None, *, checksum: bool) -> Any:
    """Decode one stored chunk of ``nbytes`` bytes: check its crc32c (when the array has ``checksum``), then its
    blosc header against the file's length, then decompress.

    Returns the bytes, or ``out`` (a writable array of ``nbytes`` bytes) decoded in place. Blosc trusts its
    header: a truncated chunk would otherwise decode into memory past the data; the checksum catches changed
    bytes anywhere (a flipped bit in stored values decodes to other numbers without it).
    """
    if checksum:
        body = memoryview(data)[:-4]
        if len(data) < 4 or crc32c_bytes(body) != bytes(data[-4:]):
            raise CorruptLedgerError(
                f"chunk {path} fails its crc32c checksum: its bytes changed after they were written; {DAMAGED}"
            )
        data = body  # type: ignore[assignment]
    if len(data) < 16:
        raise CorruptLedgerError(f"chunk {path} cannot be decoded (it holds only {len(data)} bytes); {DAMAGED}")
    size, compressed = int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")
    if (size, compressed) != (nbytes, len(data)):
        raise CorruptLedgerError(
            f"chunk {path} cannot be decoded (its blosc header says {size} bytes from {compressed}, not {nbytes} "
            f"from the {len(data)} in the file); {DAMAGED}"
        )
    try:
        if out is not None:
            numcodecs.blosc.decompress(data, out)
            return out
        return bytes(numcodecs.blosc.decompress(data))
    except (RuntimeError, ValueError) as err:
        raise CorruptLedgerError(f"chunk {path} cannot be decoded ({err}); {DAMAGED}") from err
