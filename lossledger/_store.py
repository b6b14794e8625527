"""Store I/O: JSON documents, encoded chunks and the run writer's lock, on a Zarr v3 store.

Reads go through Zarr. A commit's files are written here with plain temp file + rename (atomic per key, as
Zarr's LocalStore does it), and its chunks are encoded here rather than through ``zarr.Array.__setitem__``:
a tick is always whole chunks, so there is nothing to read back, and skipping Zarr's per-call machinery makes
a commit about 2x faster. Chunks are encoded and written by a small thread pool (blosc and file writes
release the GIL), so encoding one chunk overlaps writing another. The bytes are exactly what Zarr's own
pipeline (``bytes`` little-endian, then ``blosc``, then ``crc32c`` in format v2) writes, so any Zarr v3 reader
reads them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import google_crc32c  # Zarr's own dependency, for its crc32c codec
import numcodecs
import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ._threads import thread_pool
from .errors import CorruptLedgerError, ReadOnlyError, RunLockedError
from .format import run_key

_PROTO = default_buffer_prototype()

#: Codec of scalar streams (one value per sample): blosc/lz4 without shuffle. The mantissa bits of losses
#: are noise: byte shuffle saves only ~10% of their bytes but costs ~2.5x the encode and decode time (a
#: commit ~1.3x slower); lz4 still squeezes the NaN runs of samples not logged in a tick (~40x).
SCALAR_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")
#: Codec of element streams (pixel maps, embeddings) and of every other array: blosc/lz4 with byte shuffle,
#: which groups the exponent bytes of neighbouring values, where smooth maps are redundant.
DEFAULT_COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")

#: Threads that encode and write a commit's files, the caller's included. Four keep both cores of a small
#: machine busy while some wait on the file system; more buys nothing for the handful of files of a tick.
WRITE_THREADS = 4

#: The bytes of one key: one buffer, or parts stored one after the other (a chunk and its checksum, uncopied).
Data = bytes | tuple[bytes, ...]
#: A value to store: its data, or a function that makes it (called in a writer thread).
Payload = Data | Callable[[], Data]


def write_pool() -> ThreadPoolExecutor:
    """The writer threads of this process (besides the caller's)."""
    return thread_pool("write", WRITE_THREADS - 1)


class StoreIO:
    """Synchronous helpers over one Zarr store rooted at ``root``: a local folder (``store`` None: a
    ``LocalStore``), or another store given as ``store`` (:class:`lossledger._remote.RemoteStoreIO`).

    ``checksums``: arrays created here end their codec pipeline with ``crc32c`` (format v2); False for a
    format v1 ledger, whose arrays have none.
    """

    local = True

    def __init__(self, root: Path, *, read_only: bool, checksums: bool = True, store: Store | None = None) -> None:
        self.root = root
        self.read_only = read_only
        self.checksums = checksums
        self.store: Store = LocalStore(root, read_only=read_only) if store is None else store
        self._folders: set[Path] = set()  # folders known to exist (forgotten whenever anything is deleted)

    # --- JSON documents -------------------------------------------------------------------------------
    def get_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object stored at ``key``, or None if there is none."""
        buf = sync(self.store.get(key, prototype=_PROTO))
        if buf is None:
            return None
        try:
            doc = json.loads(buf.to_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptLedgerError(
                f"{self.root / key} is not valid JSON ({err}); the ledger is damaged: restore it from a copy"
            ) from err
        if not isinstance(doc, dict):
            raise CorruptLedgerError(f"{self.root / key} does not hold a JSON object; the ledger is damaged")
        return doc

    def put_json(self, key: str, doc: Mapping[str, Any]) -> None:
        """Write ``doc`` at ``key`` atomically (readers see the old or the new document, never a mix)."""
        self.put_many({key: json_bytes(doc)})

    # --- raw keys -------------------------------------------------------------------------------------
    def put_many(self, items: Mapping[str, Payload]) -> None:
        """Write every key and return when all are written; each is replaced atomically on its own.

        A value is bytes, or a function returning them (called in a writer thread, so encoding overlaps
        writing). The calling thread works through the keys together with up to ``WRITE_THREADS - 1`` pool
        threads, in no particular order: callers that need one key to land after the others (a commit
        record) write it in a later call. On error, every other key is still written, no temp file is left
        behind, and the first error is raised.
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.root} is open read-only")
        for folder in {(self.root / key).parent for key in items} - self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        todo = deque(items.items())

        def work() -> None:
            while todo:
                try:
                    key, data = todo.popleft()
                except IndexError:  # another thread took the last one
                    return
                self._put(key, data)

        helpers = [write_pool().submit(work) for _ in range(min(WRITE_THREADS, len(todo)) - 1)]
        try:
            work()
        finally:
            errors = [f.exception() for f in helpers]
        for error in errors:
            if error is not None:
                raise error

    def _put(self, key: str, data: Payload) -> None:
        path = self.root / key
        payload = data() if callable(data) else data
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.writelines(payload if isinstance(payload, tuple) else (payload,))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def delete_many(self, keys: Iterable[str]) -> None:
        async def delete_all(ks: list[str]) -> None:
            await asyncio.gather(*(self.store.delete(k) for k in ks))

        keys = list(keys)
        if keys:
            self._folders.clear()
            sync(delete_all(keys))

    def delete_dir(self, prefix: str) -> None:
        self._folders.clear()
        sync(self.store.delete_dir(prefix))

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly below ``prefix`` (no trailing slash)."""

        async def collect() -> list[str]:
            return [name async for name in self.store.list_dir(prefix)]

        return sorted(sync(collect()))

    def exists(self, key: str) -> bool:
        return bool(sync(self.store.exists(key)))

    def remove_partial_files(self, prefix: str, *, recursive: bool = True) -> int:
        """Delete ``*.partial`` temp files a killed writer left below ``prefix``; return how many."""
        folder = self.root / prefix
        paths = folder.rglob("*.partial") if recursive else folder.glob("*.partial")
        removed = 0
        for path in list(paths):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- the run writer's lock --------------------------------------------------------------------------
    def lock_run(self, run: str) -> WriterLock:
        """Take the exclusive lock of ``run``'s writer (:class:`RunLockedError` if another writer holds it)."""
        return RunLock(self.root / run_key(run) / "writer.lock", run)

    def other_writers(self, run: str) -> list[str]:
        """Runs other than ``run`` whose writer may be alive: their lock file names a live process (a writer
        writes its pid there right after taking the lock, before it writes anything else)."""
        alive = []
        for name in self.list_dir("runs"):
            try:
                pid = int((self.root / run_key(name) / "writer.lock").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if name != run and pid > 0 and _alive(pid):
                alive.append(name)
        return alive

    # --- arrays ---------------------------------------------------------------------------------------
    def create_array(
        self,
        key: str,
        *,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        fill_value: float,
        attributes: Mapping[str, Any] | None = None,
        compressor: zarr.codecs.BloscCodec = DEFAULT_COMPRESSOR,
    ) -> dict[str, Any]:
        """Create an array node (its zarr.json only) and return its metadata document."""
        zarr.create_array(
            self.store,
            name=key,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=(compressor, zarr.codecs.Crc32cCodec()) if self.checksums else compressor,
            chunk_key_encoding={"name": "default", "separator": "/"},
            attributes=dict(attributes or {}),
            overwrite=True,
        )
        meta = self.get_json(f"{key}/zarr.json")
        assert meta is not None
        return meta

    def open_array(self, key: str) -> zarr.Array:
        """Open the array at ``key`` for reading, with its metadata as stored now."""
        return zarr.open_array(self.store, path=key, mode="r")

    def write_array(self, key: str, values: np.ndarray) -> None:
        """Write a whole array through Zarr (used once, for the ``samples/`` columns)."""
        zarr.open_array(self.store, path=key, mode="r+")[...] = values

    def group_attrs(self, key: str) -> dict[str, Any] | None:
        meta = self.get_json(f"{key}/zarr.json" if key else "zarr.json")
        if meta is None:
            return None
        attrs = meta.get("attributes", {})
        return attrs if isinstance(attrs, dict) else {}

    def create_group(self, key: str, attributes: Mapping[str, Any] | None = None) -> None:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes or {})}
        self.put_json(f"{key}/zarr.json" if key else "zarr.json", doc)


def json_bytes(doc: Mapping[str, Any]) -> bytes:
    """A metadata document as stored: compact JSON (Zarr writes NaN fill values as the string "NaN").

    Compact, not indented: ``json`` encodes indented output in pure Python, which made encoding the commit
    record (with up to 64 pending tick rows) about a third of the commit time of a small tick.
    """
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


#: The codec pipelines lossledger writes: format v1, and format v2 whose chunks end with a crc32c checksum.
PIPELINES: tuple[list[str], ...] = (["bytes", "blosc"], ["bytes", "blosc", "crc32c"])


def crc32c_bytes(data: Any) -> bytes:
    """The 4 bytes Zarr's ``crc32c`` codec appends to a chunk: CRC-32C of ``data``, little-endian."""
    return google_crc32c.value(np.frombuffer(data, np.uint8)).to_bytes(4, "little")


class ChunkEncoder:
    """Encodes whole chunks of one array exactly as its Zarr codec pipeline would."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.fill_value = meta["fill_value"]
        codecs = meta["codecs"]
        names = [c["name"] for c in codecs]
        if names not in PIPELINES:
            raise CorruptLedgerError(
                f"unsupported codec pipeline {codecs!r}; this writer needs bytes + blosc (+ crc32c)"
            )
        self._checksum = names[-1] == "crc32c"
        cfg = codecs[1]["configuration"]
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[cfg["shuffle"]]
        self._blosc = numcodecs.Blosc(
            cname=cfg["cname"], clevel=cfg["clevel"], shuffle=shuffle, blocksize=cfg.get("blocksize", 0)
        )
        self._blosc.typesize = cfg.get("typesize", self.dtype.itemsize)

    def encode(self, block: np.ndarray) -> Data:
        """Encode ``block`` (at most the chunk shape; an edge block is padded with the fill value)."""
        if block.shape != self.chunk_shape:
            padded = np.full(self.chunk_shape, _fill(self.fill_value), dtype=self.dtype)
            padded[tuple(slice(0, s) for s in block.shape)] = block
            block = padded
        data = self._blosc.encode(np.ascontiguousarray(block, dtype=self.dtype))
        return (data, crc32c_bytes(data)) if self._checksum else data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _fill(value: Any) -> float:
    return float("nan") if value == "NaN" else value


class WriterLock(Protocol):
    """The lock a run's writer holds (:meth:`StoreIO.lock_run`): a :class:`RunLock`, or an object store's lease."""

    def release(self) -> None: ...


class RunLock:
    """An exclusive advisory lock (``flock``) on a run: released by the OS when the writer dies."""

    def __init__(self, path: Path, run: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self._fd)
            raise RunLockedError(
                f"run {run!r} is being written by another writer (lock {path} is held); close that writer "
                "first, or log to a run of another name"
            ) from err
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
