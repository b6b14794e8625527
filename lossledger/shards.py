"""Shard writers: processes other than the run's writer write whole chunks of declared streams themselves.

Meant for data-parallel training (one process per rank), where gathering every rank's per-pixel losses to the
one process that holds the run would move and hold them all there. The protocol, for the run's open tick ``t``
(the first uncommitted one):

1. the run's writer declares the stream (:meth:`lossledger.Run.declare_stream`): its array metadata exists, with
   capacity > ``t``, before any chunk of it is written; it is the only process that writes metadata;
2. each process writes, through its own :class:`ShardWriter`, the chunks of tick ``t`` holding its samples: whole
   chunks only, so no two processes ever write the same chunk (one sample per chunk lets any process write any
   sample); the chunks are encoded exactly as the run's writer encodes its own;
3. after every process has finished writing (a barrier), the run's writer commits ``t`` (``end_epoch``), which
   lists the stream in the commit record and keeps its capacity a tick ahead.

Until step 3 the chunks are invisible to readers (they read only ticks below the commit record's count); if the
run's writer dies before it, the next writer's recovery deletes them. A shard writer refuses a tick other than the
open one, a run that no writer holds, and a run whose writer changed since the shard writer was opened (a process
left over from a failed job); it holds no lock and writes nothing but chunk files.

It checks the run's writer before every write: on a local disk by the writer's lock file (a shared ``flock`` fails
exactly while the writer holds it; the pid in it tells writers apart), on ``s3://`` by the writer's lease object
(``runs/<run>/writer.lock``: it exists while a writer holds the run, and its random ``token`` tells writers apart; a
lease not renewed for ``LEASE_SECONDS`` belongs to a writer that is gone). Chunks go through the ledger's store: temp
file + rename locally, one atomic PUT per chunk on an object store.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import _remote
from ._arrays import as_ids, as_values
from ._commit import array_meta, read_run_attrs
from ._remote import RemoteStoreIO, is_url, read_lease, store_io
from ._samples import SampleIndex
from ._store import ChunkEncoder, Payload, StoreIO
from .errors import (
    DuplicateSampleError,
    ReadOnlyError,
    RunClosedError,
    RunLockedError,
    ShapeMismatchError,
    UnknownStreamError,
)
from .format import check_run_name, check_stream_name, run_key, stream_key
from .ledger import Ledger
from .run import SHARDED, check_finite

#: How long opening a shard writer waits for a writer that has just taken the run's lock to write its pid there.
_PID_WAIT_S = 2.0


class ShardWriter:
    """Writes whole chunks of the declared streams of run ``run`` in the ledger at ``path``, for the open tick.

    ``path``: the ledger's folder, or its ``s3://`` URL with fsspec ``storage_options`` (as in :func:`lossledger.open`).

    Open one per process (rank) after the run's writer has declared the streams (:meth:`lossledger.Run.
    declare_stream`); :meth:`write` then writes the chunks holding the given samples, which the run's writer's next
    ``end_epoch`` commits. It reads the ledger's metadata and takes no lock. ``allow_nonfinite`` as in
    :meth:`lossledger.Ledger.run` (NaN marks ignored elements of element streams anyway; inf is refused without it).

    Memory: the ledger's sample ids and their index (O(N)), one flag per sample and stream (the samples written in
    the open tick), and the chunks of one call. Requests per :meth:`write` on an object store: two GETs of small
    objects (the commit record and the writer's lease) and one PUT per chunk.

    Example (every rank; the run's writer is open in rank 0 and declared ``pixel``)::

        shards = ShardWriter("seg.ll", "unet-s0")
        tick = shards.open_tick()
        for ids, x, y in loader:                               # this rank's samples
            shards.write(tick, ids, pixel=per_pixel_loss(x, y))   # (B, H, W)
        # barrier; rank 0: run.end_epoch(); barrier; next tick
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        run: str,
        *,
        allow_nonfinite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if is_url(path) and not str(path).startswith("s3://"):
            raise ReadOnlyError(
                f"shard writers write ledgers in a local folder or on s3:// only (they check the run's writer by its "
                f"lock file or its S3 lease), not {path}; or let the run's writer log every value"
            )
        # The read-only Ledger checks the format and reads the sample ids; chunks go through a writable StoreIO.
        ledger = Ledger(path, mode="r", storage_options=storage_options)
        self._sample_ids = ledger.sample_ids  # (N,) int64, row order
        self._index = SampleIndex(self._sample_ids)
        self.path: Path | str = ledger.path
        self.storage_options = ledger.storage_options
        self.run = check_run_name(run)
        self._io: StoreIO = store_io(self.path, read_only=False, storage_options=storage_options)
        self._allow_nonfinite = allow_nonfinite
        read_run_attrs(self._io, run)  # raises UnknownRunError if there is no such run
        self._writer = _wait_for_writer(self._io, run)  # (identity, words for messages)
        self._metas: dict[str, dict[str, Any]] = {}
        self._tick: int | None = None  # the tick of the flags below
        self._written: dict[str, np.ndarray] = {}  # stream -> (N,) bool, samples written in self._tick

    def open_tick(self) -> int:
        """The run's open tick: the number of committed ticks, the only tick :meth:`write` accepts."""
        return int(read_run_attrs(self._io, self.run)["commit"]["ticks"])

    def write(self, tick: int, ids: Any, /, **streams: Any) -> int:
        """Write the chunks of ``tick`` that hold ``ids``, for each declared stream given as a keyword.

        ``ids``: (B,) sample ids; each keyword: (B, *element_shape) values of a declared stream. ``tick`` must be the
        run's open tick (:meth:`open_tick`). Every chunk touched must be whole: all its samples in ``ids`` (one
        sample per chunk always is). A sample may be written once per tick and stream. Bad input raises before
        anything is written. Returns the number of chunk files written.
        """
        ids_arr = as_ids(ids)
        if not streams:
            raise ShapeMismatchError("write() got ids but no stream; pass values as keywords, e.g. write(t, ids, pixel=m)")
        values = {check_stream_name(name): as_values(raw, name, len(ids_arr)) for name, raw in streams.items()}
        rows = self._index.rows(ids_arr)
        self._check_tick(tick)
        self._check_writer()
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if rows.size > 1 and (rows[1:] == rows[:-1]).any():
            repeated = np.unique(ids_arr[order][1:][rows[1:] == rows[:-1]])
            raise DuplicateSampleError(
                f"sample id(s) {repeated[:5].tolist()} given twice in one write() of tick {tick}; write each sample "
                "once per tick"
            )
        items: dict[str, Payload] = {}
        for name, vals in values.items():
            items.update(self._chunks(name, int(tick), rows, vals[order]))
        self._io.put_many(items)
        if self._tick != tick:
            self._tick, self._written = int(tick), {}
        for name in values:
            self._written.setdefault(name, np.zeros(self._index.n, dtype=bool))[rows] = True
        return len(items)

    def discard(self) -> int:
        """Delete the chunk files this writer wrote in the open tick (a tick that will not be committed).

        Deletes nothing once the run's writer has committed that tick (its chunks are part of the run then); call
        it only where no commit of the tick can be under way. Returns the number of files deleted.
        """
        keys = []
        if self._tick != self.open_tick():  # committed meanwhile: those chunks are the run's now
            self._written = {}
            return 0
        for name, written in self._written.items():
            per_chunk, suffix = self._layout(name)
            chunks = np.unique(np.flatnonzero(written) // per_chunk)
            keys += [f"{stream_key(self.run, name)}/c/{self._tick}/{c}{suffix}" for c in chunks.tolist()]
        self._io.delete_many(keys)
        self._written = {}
        return len(keys)

    def __repr__(self) -> str:
        return f"<lossledger.ShardWriter run={self.run!r} ledger={str(self.path)!r} writer={self._writer[1]!r}>"

    # --- checks ---------------------------------------------------------------------------------------
    def _check_tick(self, tick: Any) -> None:
        if not isinstance(tick, int | np.integer) or isinstance(tick, bool):
            raise ShapeMismatchError(f"tick must be an int (the run's open tick), got {tick!r}")
        open_tick = self.open_tick()
        if tick != open_tick:
            state = "already committed" if tick < open_tick else "not open yet"
            raise RunClosedError(
                f"tick {tick} of run {self.run!r} is {state}: shard writers write only the open tick {open_tick} "
                "(the one the run's writer commits next); write after its end_epoch() of the previous tick, "
                "and before the one of this tick"
            )

    def _check_writer(self) -> None:
        holder = _holder(self._io, self.run)
        if holder is None:
            raise RunClosedError(
                f"no writer holds run {self.run!r}: chunks written now would be removed when it next opens; open "
                "the run (ledger.run(name)) in one process first, then write"
            )
        if holder[0] != self._writer[0]:
            raise RunLockedError(
                f"run {self.run!r} is now held by another writer ({holder[1]}) than when this shard writer was opened "
                f"({self._writer[1]}): this process is left over from a stopped job; open a new ShardWriter"
            )

    def _meta(self, name: str, tick: int) -> dict[str, Any]:
        """The declared stream's array metadata, re-read while its capacity does not hold ``tick``."""
        meta = self._metas.get(name)
        if meta is None or meta["shape"][0] <= tick:
            key = stream_key(self.run, name)
            if not self._io.exists(f"{key}/zarr.json"):
                raise UnknownStreamError(
                    f"run {self.run!r} has no stream {name!r} for shard writers; declare it first in the run's "
                    f"writer: run.declare_stream({name!r}, element_shape)"
                )
            meta = array_meta(self._io, key)
            if not meta.get("attributes", {}).get(SHARDED):
                raise RunLockedError(
                    f"stream {name!r} of run {self.run!r} is written by the run's writer (run.log), not by shard "
                    f"writers; declare a stream for them with run.declare_stream (a new name)"
                )
            if meta["shape"][0] <= tick:
                raise UnknownStreamError(
                    f"stream {name!r} of run {self.run!r} is declared for ticks below {meta['shape'][0]}, not tick "
                    f"{tick}; the run's writer declares the stream (and each end_epoch extends it) before shard "
                    "writers write a tick"
                )
            self._metas[name] = meta
        return meta

    def _layout(self, name: str) -> tuple[int, str]:
        meta = self._metas[name]
        return int(meta["chunk_grid"]["configuration"]["chunk_shape"][1]), "/0" * (len(meta["shape"]) - 2)

    def _chunks(self, name: str, tick: int, rows: np.ndarray, values: np.ndarray) -> dict[str, Payload]:
        """The chunk files of ``tick`` holding ``rows`` (sorted) of stream ``name``, checked, encoded lazily."""
        meta = self._meta(name, tick)
        element = tuple(meta["shape"][2:])
        if values.shape[1:] != element:
            raise ShapeMismatchError(
                f"stream {name!r} has element shape {element} in run {self.run!r} but got {values.shape[1:]}; keep one "
                "element shape per stream"
            )
        check_finite(name, meta["data_type"], element, values, allow_nonfinite=self._allow_nonfinite)
        written = self._written.get(name) if self._tick == tick else None
        if written is not None and written[rows].any():
            again = self._sample_ids[rows[written[rows]]]
            raise DuplicateSampleError(
                f"stream {name!r}: sample id(s) {again[:5].tolist()} were already written in tick {tick} of run "
                f"{self.run!r}; write each sample once per tick"
            )
        per_chunk, suffix = self._layout(name)
        chunks, starts, counts = np.unique(rows // per_chunk, return_index=True, return_counts=True)
        widths = np.minimum(per_chunk, self._index.n - chunks * per_chunk)
        partial_chunks = chunks[counts != widths]
        if partial_chunks.size:
            chunk = int(partial_chunks[0])
            lo, hi = chunk * per_chunk, min(self._index.n, (chunk + 1) * per_chunk)
            missing = np.setdiff1d(np.arange(lo, hi), rows)
            raise ShapeMismatchError(
                f"stream {name!r} has {per_chunk} samples per chunk, and {partial_chunks.size} chunk(s) of this "
                f"write are partial: chunk {chunk} lacks sample id(s) {self._sample_ids[missing][:5].tolist()}. "
                "A shard writer writes whole chunks only (so no two processes write one chunk): write all of a "
                "chunk's samples in one call, or declare the stream with samples_per_chunk=1"
            )
        encoder = ChunkEncoder(meta)
        block = values.astype(np.float32, copy=False)  # as the run's tick buffer holds values: same rounding
        base = stream_key(self.run, name)
        return {
            f"{base}/c/{tick}/{chunk}{suffix}": partial(encoder.encode, block[start : start + count][None])
            for chunk, start, count in zip(chunks.tolist(), starts.tolist(), counts.tolist(), strict=True)
        }


def _holder(io: StoreIO, run: str) -> tuple[int | str, str] | None:
    """Who holds ``run``'s writer lock now, None while nobody does: an identity that differs between writers (a local
    writer's pid, 0 if not yet written; an S3 lease's token) and words naming it in messages."""
    if not isinstance(io, RemoteStoreIO):
        pid = _writer_pid(io.root, run)
        return None if pid is None else (pid, f"pid {pid}")
    lease = read_lease(io, run)
    if lease is None or lease["age_s"] >= _remote.LEASE_SECONDS:  # an expired lease: its writer is gone
        return None
    return lease["token"], f"pid {lease.get('pid')} on {lease.get('host')}"


def _writer_pid(root: Path, run: str) -> int | None:
    """The pid in the run's lock file while a writer holds the lock, None while none does (0 if not yet written).

    Tries a shared ``flock`` on the lock file: it fails exactly while a writer holds its exclusive lock.
    """
    path = root / run_key(run) / "writer.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.pread(fd, 32, 0).split()
            return int(words[0]) if words and words[0].isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _wait_for_writer(io: StoreIO, run: str) -> tuple[int | str, str]:
    """The holder of the run's lock (:func:`_holder`), waiting briefly for a local writer that has just taken the
    lock to write its pid there (an S3 lease is written whole, with its token)."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        holder = _holder(io, run)
        if holder is None:
            raise RunClosedError(
                f"no writer holds run {run!r} in {io.root}; open the run (ledger.run(name)) in one process, declare "
                "its sharded streams, then open the shard writers"
            )
        if holder[0] or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)
