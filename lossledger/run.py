"""The run writer: buffer one tick of per-sample values, then commit it atomically.

Memory: one tick buffer per stream logged in the tick, ``N x element_size`` values in the stream's storage
dtype (float32 in ``on_duplicate="mean"`` mode, which sums), rounded up to whole chunks, plus one flag per sample
(about 5 bytes per sample for a float32 scalar stream), never ``N x ticks``. A float16 stream's values are cast
to float16 as they are logged, so the commit encodes its chunks straight from the buffer, without copies. After a
commit the buffers are kept for the next tick (reset, not reallocated: fresh memory costs a page fault per 4 KiB,
about as much as filling it) until ``discard`` or ``close``. Streams declared with
:meth:`Run.declare_stream` are written by :class:`lossledger.shards.ShardWriter` objects instead (no buffer here).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._arrays import as_ids, as_values
from ._commit import now_iso, write_run_attrs
from ._store import (
    DEFAULT_COMPRESSOR,
    SCALAR_COMPRESSOR,
    ChunkEncoder,
    Data,
    Payload,
    StoreIO,
    WriterLock,
    json_bytes,
)
from .errors import (
    DuplicateSampleError,
    InvalidDTypeError,
    LedgerWarning,
    NonFiniteValueError,
    RunClosedError,
    RunLockedError,
    ShapeMismatchError,
)
from .format import (
    STREAM_DTYPES,
    TICK_COLUMNS,
    TICKS_CHUNK,
    TICKS_FLUSH,
    OnDuplicate,
    check_stream_name,
    samples_per_chunk,
    stream_key,
    ticks_key,
)

if TYPE_CHECKING:
    from ._samples import SampleIndex

_FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Batches of fewer values are cast to float16 by numpy: pyarrow's cast gives the same bits for every float32 and
#: is 1.4x faster on loss maps (3.5x on values below 6e-5, float16 subnormals), but costs ~20 us per call.
_ARROW_CAST_MIN = 1 << 14
#: Array attribute of a declared stream: its chunks are written by shard writers, never by the run's writer.
SHARDED = "sharded"


@dataclass
class _Stream:
    """A stream's fixed layout, and its array metadata (kept here: the run's writer is its only writer)."""

    name: str
    dtype: str
    element_shape: tuple[int, ...]
    since: int
    per_chunk: int
    meta: dict[str, Any] | None = None  # None until the stream's array is created at its first commit

    @property
    def sharded(self) -> bool:
        """Declared with :meth:`Run.declare_stream` (kept in the array's attributes, so it survives a resume)."""
        return bool(self.meta is not None and self.meta.get("attributes", {}).get(SHARDED))

    def record(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "element_shape": list(self.element_shape), "since": self.since}


@dataclass
class _TickBuffer:
    """One stream's values logged in the current tick."""

    #: (n_chunks x per_chunk, *element_shape) in the storage dtype (mean mode: float32 sums), NaN if not logged
    values: np.ndarray
    seen: np.ndarray  # (N,) bool
    touched: np.ndarray  # (n_chunks,) bool: chunks that hold at least one logged sample
    counts: np.ndarray | None = field(default=None)  # (n_chunks x per_chunk,) int32 for on_duplicate="mean"

    def reset(self, per_chunk: int) -> None:
        """Empty the buffer for a new tick: only chunks that were touched hold values."""
        for chunk in np.flatnonzero(self.touched):
            self.values[chunk * per_chunk : (chunk + 1) * per_chunk] = np.nan
        self.seen[:] = False
        self.touched[:] = False
        if self.counts is not None:
            self.counts[:] = 0


class Run:
    """Writes one training run. Get one with :meth:`lossledger.Ledger.run`; use it as a context manager.

    Example::

        with ledger.run("mlp-s0", model="mlp", seed=0) as run:
            for epoch in range(10):
                for ids, x, y in loader:
                    run.log(ids, loss=per_sample_loss(x, y))
                run.end_epoch()
    """

    def __init__(
        self,
        *,
        io: StoreIO,
        name: str,
        index: SampleIndex,
        lock: WriterLock,
        attrs: dict[str, Any],
        ticks: dict[str, np.ndarray],
        flushed: int,
        tick_meta: dict[str, dict[str, Any]],
        streams: dict[str, _Stream],
        on_duplicate: OnDuplicate,
        allow_nonfinite: bool,
        stream_dtypes: dict[str, str],
    ) -> None:
        self._io, self.name, self._index, self._lock = io, name, index, lock
        self._attrs = attrs
        self._ticks = ticks  # committed tick rows, O(T)
        self._flushed = flushed  # rows in the ticks/ arrays; later ones are in the commit record
        self._tick_meta = tick_meta
        self._streams = streams
        self._on_duplicate = on_duplicate
        self._allow_nonfinite = allow_nonfinite
        self._stream_dtypes = stream_dtypes
        self._buffers: dict[str, _TickBuffer] = {}
        self._spare: dict[str, _TickBuffer] = {}  # buffers of committed ticks, reset when next logged to
        self._calls_in_tick = 0
        self._closed = False
        self._wall_base = float(ticks["wall"][-1]) if len(ticks["wall"]) else 0.0
        self._started = time.monotonic()

    # --- public API -----------------------------------------------------------------------------------
    @property
    def ticks(self) -> int:
        """Number of committed ticks."""
        return int(self._attrs["commit"]["ticks"])

    @property
    def attrs(self) -> dict[str, Any]:
        """The run's user attributes (JSON)."""
        return dict(self._attrs["attrs"])

    @property
    def allow_nonfinite(self) -> bool:
        """Whether NaN/inf values are stored rather than refused (``Ledger.run(..., allow_nonfinite=)``)."""
        return self._allow_nonfinite

    @property
    def ledger_path(self) -> Path | str:
        """Where the ledger of this run is: its folder, or its object-store URL (shard writers open it)."""
        return self._io.root

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options the ledger was opened with (empty for a local folder); shard writers need them."""
        return dict(getattr(self._io, "storage_options", {}))

    def log(self, ids: Any, /, **streams: Any) -> None:
        """Record per-sample values of one or more streams for the current tick.

        ``ids``: (B,) int sample ids. Each keyword is a stream: (B, *element_shape) real values, one per id
        (per-sample losses with ``reduction="none"``), as numpy arrays, sequences, or ``__array__``/DLPack
        tensors. Bad input raises before anything is recorded. Costs O(B) time; counts as one optimizer step.
        """
        self._check_open()
        if not streams:
            raise ShapeMismatchError("log() got ids but no stream; pass values as keywords, e.g. run.log(ids, loss=l)")
        ids_arr = as_ids(ids)
        rows = self._index.rows(ids_arr)
        unique_rows = None
        checked: list[tuple[_Stream, np.ndarray]] = []
        for name, raw in streams.items():
            values = as_values(raw, check_stream_name(name), len(ids_arr))
            stream = self._streams.get(name) or self._new_stream(name, values)
            if stream.sharded:
                raise RunLockedError(
                    f"stream {name!r} of run {self.name!r} is declared for shard writers (declare_stream), which "
                    "write its chunks; write its values with lossledger.shards.ShardWriter, not run.log"
                )
            if values.shape[1:] != stream.element_shape:
                raise ShapeMismatchError(
                    f"stream {name!r} has element shape {stream.element_shape} in run {self.name!r} but got "
                    f"{values.shape[1:]}; keep one element shape per stream (log other shapes to a new stream name)"
                )
            check_finite(name, stream.dtype, stream.element_shape, values, allow_nonfinite=self._allow_nonfinite)
            if self._on_duplicate == "error":
                if unique_rows is None:
                    sorted_rows = np.sort(rows)  # a sort is several times faster than np.unique's hash
                    unique_rows = not (sorted_rows[1:] == sorted_rows[:-1]).any()
                self._check_no_duplicates(name, ids_arr, rows, unique_rows)
            checked.append((stream, values))
        for stream, values in checked:
            self._record(stream, rows, values)
        self._calls_in_tick += 1

    def declare_stream(
        self,
        name: str,
        element_shape: tuple[int, ...],
        *,
        dtype: str | None = None,
        samples_per_chunk: int | None = None,
    ) -> None:
        """Declare a stream whose chunks other processes write, each through a :class:`lossledger.shards.ShardWriter`.

        Creates the stream's array metadata now, sized for the open tick ``self.ticks``; from then on every
        ``end_epoch`` lists the stream in the commit record and keeps its capacity a tick ahead, though this writer
        logs nothing to it (``run.log`` refuses it). ``element_shape`` e.g. ``(H, W)``; ``dtype`` "float32" or
        "float16" (default: the run's ``stream_dtypes`` entry, else float32); ``samples_per_chunk`` samples per
        chunk file (default 1; a shard writer writes only whole chunks, and with 1 any process may write any sample;
        a chunk holds ``samples_per_chunk x prod(element_shape)`` values, 16 KiB for one 64x64 float32 map).
        Declaring an existing stream (after a resume) checks that it matches (``None``: its own chunking) and makes
        it a shard writers' stream from the open tick on. Nothing is written on bad input.
        """
        self._check_open()
        check_stream_name(name)
        if not isinstance(element_shape, tuple | list) or not all(
            isinstance(d, int | np.integer) and d >= 0 for d in element_shape
        ):
            raise ShapeMismatchError(f"element_shape {element_shape!r} is not a tuple of sizes; pass e.g. (H, W)")
        shape = tuple(int(d) for d in element_shape)
        dtype = self._stream_dtypes.get(name, "float32") if dtype is None else dtype
        if dtype not in STREAM_DTYPES:
            raise InvalidDTypeError(f"dtype {dtype!r} is not supported; use one of {list(STREAM_DTYPES)}")
        if samples_per_chunk is not None and not 1 <= int(samples_per_chunk) <= self._index.n:
            raise ShapeMismatchError(
                f"samples_per_chunk = {samples_per_chunk} is not between 1 and the {self._index.n} samples"
            )
        stream = self._streams.get(name)
        if stream is None:
            stream = _Stream(name, dtype, shape, since=self.ticks, per_chunk=int(samples_per_chunk or 1))
            meta = self._create_array(stream, self.ticks, attributes={SHARDED: True})
        else:
            if name in self._buffers:
                raise RunLockedError(
                    f"stream {name!r} has values logged by run.log in tick {self.ticks}; declare it before logging "
                    "(its chunks then belong to the shard writers), or use a new stream name"
                )
            per_chunk = stream.per_chunk if samples_per_chunk is None else int(samples_per_chunk)
            if (stream.element_shape, stream.dtype, stream.per_chunk) != (shape, dtype, per_chunk):
                raise ShapeMismatchError(
                    f"stream {name!r} of run {self.name!r} exists with element shape {stream.element_shape}, dtype "
                    f"{stream.dtype} and {stream.per_chunk} sample(s) per chunk, not {shape}, {dtype} and "
                    f"{per_chunk}; declare it as it is, or use a new stream name"
                )
            if stream.sharded and stream.meta is not None and stream.meta["shape"][0] > self.ticks:
                return
            assert stream.meta is not None  # a committed stream has its array
            meta = {**stream.meta, "attributes": {**stream.meta.get("attributes", {}), SHARDED: True}}
            if meta["shape"][0] <= self.ticks:
                meta = _with_capacity(meta, self.ticks + 1)
            self._io.put_json(f"{stream_key(self.name, name)}/zarr.json", meta)
        stream.meta = meta
        self._streams[name] = stream
        self._spare.pop(name, None)  # run.log no longer writes it

    def end_epoch(self, *, epoch: int | None = None, step: int | None = None) -> int:
        """Commit the current tick and return its index (0-based).

        Records ``epoch`` (default: previous + 1, from 0), ``step`` (global optimizer step; default: previous +
        number of ``log`` calls in the tick) and ``wall`` (seconds the run has been open, summed over resumes).
        Samples not logged in the tick stay NaN. After this returns the tick survives a crash.
        """
        self._check_open()
        tick = self.ticks
        if not self._buffers and not any(s.sharded for s in self._streams.values()):
            warnings.warn(
                f"run {self.name!r}: tick {tick} is committed with no values logged (every sample NaN)",
                LedgerWarning,
                stacklevel=2,
            )
        row = self._next_tick_row(epoch, step)
        ticks = {column: np.append(self._ticks[column], value) for column, value in row.items()}
        items: dict[str, Payload] = {}
        for name, buffer in self._buffers.items():
            items.update(self._encode_tick(self._streams[name], buffer, tick))
        # A declared stream stays a tick ahead: shard writers write the next tick before anything commits it.
        needed = {stream_key(self.name, name): tick + 1 + s.sharded for name, s in self._streams.items()}
        flushed = self._flushed
        if tick + 1 - flushed >= TICKS_FLUSH:
            items.update(self._encode_tick_rows(ticks, flushed))
            needed.update({ticks_key(self.name, column): tick + 1 for column in TICK_COLUMNS})
            flushed = tick + 1
        self._write_files(items, needed)
        self._commit(tick + 1, ticks, flushed)
        self._spare.update(self._buffers)
        self._buffers.clear()
        self._calls_in_tick = 0
        return tick

    def discard(self) -> int:
        """Drop every value logged since the last ``end_epoch`` (the tick starts afresh); writes nothing.

        Returns the number of (sample, stream) values dropped. Streams first logged in the tick are forgotten too.
        """
        self._check_open()
        n = int(sum(int(b.seen.sum()) for b in self._buffers.values()))
        self._buffers.clear()
        self._spare.clear()
        self._calls_in_tick = 0
        self._streams = {name: s for name, s in self._streams.items() if s.meta is not None}  # never created
        return n

    def close(self) -> None:
        """Release the run. Values logged since the last ``end_epoch`` are discarded, with a warning.

        Also moves the tick rows still held in the commit record into the ``ticks/`` arrays.
        """
        if self._closed:
            return
        n = self.discard()
        if n:
            warnings.warn(
                f"run {self.name!r}: {n} value(s) logged since the last end_epoch() were discarded on close; "
                "call run.end_epoch() before closing to keep them",
                LedgerWarning,
                stacklevel=2,
            )
        self._closed = True
        try:
            if self._flushed < self.ticks:
                n = self.ticks
                self._write_files(
                    self._encode_tick_rows(self._ticks, self._flushed),
                    {ticks_key(self.name, column): n for column in TICK_COLUMNS},
                )
                self._commit(n, self._ticks, n)
        finally:
            self._lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<lossledger.Run {self.name!r} ticks={self.ticks} streams={sorted(self._streams)} {state}>"

    # --- logging --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RunClosedError(f"run {self.name!r} is closed; reopen it with ledger.run({self.name!r})")

    def _new_stream(self, name: str, values: np.ndarray) -> _Stream:
        dtype = self._stream_dtypes.get(name, "float32")
        element_shape = tuple(int(d) for d in values.shape[1:])
        per_chunk = samples_per_chunk(self._index.n, element_shape, np.dtype(dtype).itemsize)
        # Not registered in self._streams until the log call passes every check (nothing written on bad input).
        return _Stream(name, dtype, element_shape, since=self.ticks, per_chunk=per_chunk)

    def _check_no_duplicates(self, name: str, ids: np.ndarray, rows: np.ndarray, unique_in_batch: bool) -> None:
        buffer = self._buffers.get(name)
        repeated = None
        if not unique_in_batch:
            sorted_ids = np.sort(ids)
            repeated = sorted_ids[1:][np.diff(sorted_ids) == 0]
        elif buffer is not None and buffer.seen[rows].any():
            repeated = ids[buffer.seen[rows]]
        if repeated is not None:
            raise DuplicateSampleError(
                f"stream {name!r}: sample id(s) {np.unique(repeated)[:5].tolist()} logged twice in tick {self.ticks}"
                f" of run {self.name!r}; log each sample once per tick, or open the run with on_duplicate="
                "'first' | 'last' | 'mean'"
            )

    def _record(self, stream: _Stream, rows: np.ndarray, values: np.ndarray) -> None:
        self._streams.setdefault(stream.name, stream)
        buffer = self._buffers.get(stream.name)
        mode = self._on_duplicate
        if buffer is None and stream.name in self._spare:
            buffer = self._spare.pop(stream.name)
            buffer.reset(stream.per_chunk)
            self._buffers[stream.name] = buffer
        if buffer is None:
            n_chunks = -(-self._index.n // stream.per_chunk)
            rows_held = n_chunks * stream.per_chunk  # whole chunks: the edge chunk is encoded without padding
            buffer = _TickBuffer(
                values=np.full(
                    (rows_held, *stream.element_shape), np.nan, dtype=np.float32 if mode == "mean" else stream.dtype
                ),
                seen=np.zeros(self._index.n, dtype=bool),
                touched=np.zeros(n_chunks, dtype=bool),
                counts=np.zeros(rows_held, dtype=np.int32) if mode == "mean" else None,
            )
            self._buffers[stream.name] = buffer
        if mode == "mean":
            assert buffer.counts is not None  # made with the buffer in this mode
            np.add.at(buffer.counts, rows, 1)
            first_time = ~buffer.seen[rows]
            buffer.values[rows[first_time]] = 0.0
            np.add.at(buffer.values, rows, values)
        else:
            if mode in ("first", "last"):
                rows, values = _dedupe(rows, values, keep=mode)
            if mode == "first":
                fresh = ~buffer.seen[rows]
                rows, values = rows[fresh], values[fresh]
            buffer.values[rows] = as_float16(values) if buffer.values.dtype == np.float16 else values
        buffer.seen[rows] = True
        buffer.touched[rows // stream.per_chunk] = True

    # --- committing -----------------------------------------------------------------------------------
    def _next_tick_row(self, epoch: int | None, step: int | None) -> dict[str, Any]:
        last_epoch = int(self._ticks["epoch"][-1]) if len(self._ticks["epoch"]) else -1
        last_step = int(self._ticks["step"][-1]) if len(self._ticks["step"]) else 0
        return {
            "epoch": last_epoch + 1 if epoch is None else int(epoch),
            "step": last_step + self._calls_in_tick if step is None else int(step),
            "wall": self._wall_base + (time.monotonic() - self._started),
        }

    def _encode_tick(self, stream: _Stream, buffer: _TickBuffer, tick: int) -> dict[str, Payload]:
        """The tick's chunk files of ``stream``, encoded lazily (in the writer threads)."""
        if stream.meta is None:
            stream.meta = self._create_array(stream, tick)
        encoder = ChunkEncoder(stream.meta)
        base = stream_key(self.name, stream.name)
        suffix = "/0" * len(stream.element_shape)
        out: dict[str, Payload] = {}
        for chunk in np.flatnonzero(buffer.touched):
            lo = int(chunk) * stream.per_chunk
            block = buffer.values[lo : lo + stream.per_chunk][None]  # a view: whole chunk, storage dtype
            key = f"{base}/c/{tick}/{chunk}{suffix}"
            if buffer.counts is None:
                out[key] = partial(encoder.encode, block)
            else:
                counts = buffer.counts[lo : lo + stream.per_chunk]
                out[key] = partial(_encode_means, encoder, block, counts)
        return out

    def _create_array(
        self, stream: _Stream, tick: int, attributes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Create ``stream``'s array (its metadata only), sized to hold tick ``tick``; return the metadata."""
        return self._io.create_array(
            stream_key(self.name, stream.name),
            shape=(_capacity(tick + 1), self._index.n, *stream.element_shape),
            chunks=(1, stream.per_chunk, *stream.element_shape),
            dtype=stream.dtype,
            fill_value=float("nan"),
            attributes=attributes,
            compressor=DEFAULT_COMPRESSOR if stream.element_shape else SCALAR_COMPRESSOR,
        )

    def _encode_tick_rows(self, ticks: dict[str, np.ndarray], start: int) -> dict[str, Payload]:
        """The ``ticks/`` chunk files holding rows ``start`` and later of ``ticks`` (all committed rows)."""
        out: dict[str, Payload] = {}
        for column, values in ticks.items():
            encoder = ChunkEncoder(self._tick_meta[column])
            for chunk in range(start // TICKS_CHUNK, -(-len(values) // TICKS_CHUNK)):
                lo = chunk * TICKS_CHUNK
                history = values[lo : lo + TICKS_CHUNK].astype(TICK_COLUMNS[column][0])
                out[f"{ticks_key(self.name, column)}/c/{chunk}"] = encoder.encode(history)
        return out

    def _write_files(self, items: dict[str, Payload], needed: dict[str, int]) -> None:
        """Write ``items`` and grow each array ``key`` of ``needed`` to hold ``needed[key]`` ticks.

        Array shapes grow by doubling, so most commits rewrite no array metadata; the grown metadata is
        adopted by this writer only once it is on disk.
        """
        metas = {ticks_key(self.name, column): meta for column, meta in self._tick_meta.items()}
        metas.update({stream_key(self.name, name): s.meta for name, s in self._streams.items() if s.meta})
        grown = {key: _with_capacity(metas[key], n) for key, n in needed.items() if metas[key]["shape"][0] < n}
        self._io.put_many({**items, **{f"{key}/zarr.json": json_bytes(meta) for key, meta in grown.items()}})
        for key, meta in grown.items():
            metas[key].update(meta)

    def _commit(self, n_ticks: int, ticks: dict[str, np.ndarray], flushed: int) -> None:
        """Write the commit record: ``n_ticks`` committed, rows ``flushed`` and later held in the record."""
        # A stream first logged (or declared) in a tick that was never committed is not part of the run yet.
        record = {
            "ticks": n_ticks,
            "streams": {name: s.record() for name, s in self._streams.items() if s.since < n_ticks},
            "pending_ticks": {column: values[flushed:].tolist() for column, values in ticks.items()},
            "updated": now_iso(),
        }
        attrs = {**self._attrs, "commit": record}
        write_run_attrs(self._io, self.name, attrs)
        self._attrs, self._ticks, self._flushed = attrs, ticks, flushed


def check_finite(
    name: str, dtype: str, element_shape: tuple[int, ...], values: np.ndarray, *, allow_nonfinite: bool
) -> None:
    """Refuse NaN/inf values of stream ``name`` (NaN is allowed in element streams), and float16 overflow."""
    if values.dtype.kind != "f":
        return
    if not allow_nonfinite:
        # In an element stream (pixel maps) NaN marks an ignored element (void, ignore_index): allowed; inf never.
        finite = ~np.isinf(values) if element_shape else np.isfinite(values)
        if not finite.all():
            bad = int(values.size - finite.sum())
            what = "inf" if element_shape else "NaN/inf"
            raise NonFiniteValueError(
                f"stream {name!r} got {bad} {what} value(s); fix the loss (e.g. clamp log(0)), or open the run "
                "with allow_nonfinite=True to store them (NaN then reads as 'not logged')"
            )
    if dtype == "float16" and _largest_magnitude(values) > _FLOAT16_MAX:
        raise NonFiniteValueError(
            f"stream {name!r} is stored as float16 but got values above {_FLOAT16_MAX:g}; store it as float32 "
            "(stream_dtypes={...: 'float32'}) or rescale"
        )


def _largest_magnitude(values: np.ndarray) -> float:
    """max |x| over the non-NaN values of float array ``values`` (-inf if none); unlike np.nanmax(np.abs(values)),
    fmax / fmin make no temporary array."""
    top = np.fmax.reduce(values, axis=None, initial=-np.inf)
    return float(max(top, -np.fmin.reduce(values, axis=None, initial=np.inf)))


def as_float16(values: np.ndarray) -> np.ndarray:
    """``values`` as float16, with exactly the bits of numpy's float32 -> float16 cast (round to nearest even;
    other dtypes are cast to float32 first, as the float32 buffer of a float32 stream would hold them)."""
    if values.dtype == np.float16:
        return values
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.size < _ARROW_CAST_MIN:
        return values.astype(np.float16)
    half = pc.cast(pa.array(values.reshape(-1)), pa.float16(), safe=False)  # pyarrow >= 16
    return np.frombuffer(half.buffers()[1], np.float16, count=values.size).reshape(values.shape)


def _encode_means(encoder: ChunkEncoder, sums: np.ndarray, counts: np.ndarray) -> Data:
    """Encode one chunk of ``on_duplicate="mean"`` sums (1, per_chunk, *element) float32, divided by ``counts``
    (per_chunk,) int32 (0 where not logged: the sum is NaN there)."""
    means = (sums / np.maximum(counts, 1).reshape((1, -1) + (1,) * (sums.ndim - 2))).astype(np.float32)
    return encoder.encode(as_float16(means) if encoder.dtype == np.float16 else means)


def _capacity(ticks: int) -> int:
    """Ticks an array is sized for when it must hold ``ticks``: the next power of two, at least 16."""
    return max(16, 1 << (ticks - 1).bit_length())


def _with_capacity(meta: dict[str, Any], ticks: int) -> dict[str, Any]:
    return {**meta, "shape": [_capacity(ticks), *meta["shape"][1:]]}


def _dedupe(rows: np.ndarray, values: np.ndarray, *, keep: str) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first (or last) occurrence of each row within one batch."""
    if keep == "last":
        _, rev_index = np.unique(rows[::-1], return_index=True)
        index = rows.size - 1 - rev_index
    else:
        _, index = np.unique(rows, return_index=True)
    if index.size == rows.size:
        return rows, values
    return rows[index], values[index]
