"""Ledgers on object storage (``s3://bucket/prefix``) through fsspec: the store, and the run writer's lease.

The commit protocol needs four things of the store (``docs/object-storage.md``): an object is replaced
atomically (a reader gets the old or the new bytes, never a mix); a PUT that returned is seen by every later
GET and LIST (strong read-after-write consistency, as AWS S3 gives since December 2020); a conditional PUT
(``If-None-Match: *`` and ``If-Match: <etag>``) for the writer's lock; and nothing else. There is no
rename and no ``fsync``: the writer waits for every chunk PUT of a tick to return before it PUTs the commit
record, so a reader that reads the record first never finds a committed chunk missing.

Writing needs the lock, so it is implemented for ``s3://`` (s3fs; AWS S3, MinIO, Ceph RGW and other stores
with conditional writes); reading works over any fsspec URL.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ._store import Data, Payload, StoreIO, json_bytes, write_pool
from .errors import CorruptLedgerError, MissingDependencyError, ReadOnlyError, RunLockedError, ShapeMismatchError
from .format import run_key

_PROTO = default_buffer_prototype()

#: Seconds a run's lock stays valid without renewal: a writer renews it every ``LEASE_SECONDS / 4`` (a
#: background thread) and before every commit; a writer killed without releasing it is taken over this long
#: after its last renewal, by the store's clock (no clock of ours is trusted).
LEASE_SECONDS = 60.0


def is_url(path: object) -> bool:
    """True for an fsspec URL other than a local file (``s3://bucket/x.ll``)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


class URL(str):
    """An object-store location; ``url / "key"`` joins with "/" like a :class:`~pathlib.Path` (for messages)."""

    def __truediv__(self, other: object) -> URL:
        return URL(f"{self.rstrip('/')}/{other}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


def store_io(
    path: str | os.PathLike[str], *, read_only: bool, storage_options: Mapping[str, Any] | None = None
) -> StoreIO:
    """A :class:`StoreIO` for a local folder, or for an fsspec URL (``storage_options`` go to fsspec)."""
    if is_url(path):
        return RemoteStoreIO(URL(str(path)), read_only=read_only, storage_options=storage_options)
    check_no_options(path, storage_options)
    return StoreIO(Path(path), read_only=read_only)


def check_no_options(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> None:
    """Refuse ``storage_options`` for a local path (they would be silently ignored)."""
    if storage_options:
        raise ShapeMismatchError(
            f"storage_options apply to URLs such as 's3://bucket/ledger.ll', not to the local path {str(path)!r}; "
            "drop them, or pass the ledger's URL"
        )


class RemoteStoreIO(StoreIO):
    """:class:`StoreIO` over Zarr's ``FsspecStore``: each key is one object, replaced by one atomic PUT."""

    local = False

    def __init__(
        self, url: URL, *, read_only: bool, storage_options: Mapping[str, Any] | None, checksums: bool = True
    ) -> None:
        from zarr.storage import FsspecStore

        options = dict(storage_options or {})
        if url.startswith("s3://"):
            # s3fs caches listings by default: a reader would not see runs and ticks committed after its first look.
            options.setdefault("use_listings_cache", False)
        try:
            store = FsspecStore.from_url(url, storage_options=options, read_only=read_only)
        except ImportError as err:
            raise MissingDependencyError(
                f"reading {url} needs fsspec's driver for {url.split('://')[0]}:// ({err}); install it, e.g. "
                "pip install 'lossledger[s3]' for s3://"
            ) from err
        # A URL joins keys with "/" like a Path: messages and callers use the root the same way.
        super().__init__(url, read_only=read_only, checksums=checksums, store=store)  # type: ignore[arg-type]
        self.storage_options = dict(storage_options or {})
        self.store_path: str = store.path  # "bucket/prefix" of the ledger, without the scheme
        self._leases: dict[str, LeaseLock] = {}

    def put_many(self, items: Mapping[str, Payload]) -> None:
        """Write every key (payloads made in the writer threads, then PUT concurrently); return when all returned.

        A commit record (``runs/<run>/zarr.json``) is written only while this process holds the run's lease.
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.root} is open read-only")
        for key in items:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "runs" and parts[2] == "zarr.json" and parts[1] in self._leases:
                self._leases[parts[1]].check()
        made = list(write_pool().map(lambda kv: (kv[0], _joined(kv[1]() if callable(kv[1]) else kv[1])), items.items()))

        async def put_all() -> None:
            await asyncio.gather(*(self.store.set(k, _PROTO.buffer.from_bytes(v)) for k, v in made))

        sync(put_all())

    def remove_partial_files(self, prefix: str, *, recursive: bool = True) -> int:
        return 0  # a PUT is all or nothing: an object store has no temp files to clean

    def lock_run(self, run: str) -> LeaseLock:
        lock = LeaseLock(self, run)
        self._leases[run] = lock
        return lock

    def other_writers(self, run: str) -> list[str]:
        return []  # only local temp files need another writer's consent to remove (see _commit.recover)


def _joined(data: Data) -> bytes:
    return b"".join(data) if isinstance(data, tuple) else data


class LeaseLock:
    """The exclusive lock of a run's writer on an object store: the object ``runs/<run>/writer.lock``.

    Taken with a conditional PUT (``If-None-Match: *``); renewed every ``LEASE_SECONDS / 4`` by a thread and
    before every commit with ``If-Match`` on its own ETag; taken over (``If-Match`` on the old ETag) once the
    store's clock says it is ``LEASE_SECONDS`` old. A writer whose renewal fails has lost the run: its next
    commit raises :class:`RunLockedError` instead of writing.
    """

    def __init__(self, io: RemoteStoreIO, run: str) -> None:
        self._fs, self._run = _s3_fs(io, run), run
        self._bucket, self._key = _lease_key(io, run)
        self._where = io.root / run_key(run) / "writer.lock"
        self._body = json_bytes({"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex})
        self._etag = self._acquire()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lossledger-lease-{run}", daemon=True)
        self._thread.start()

    def _s3(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return sync(self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs))

    def _acquire(self) -> str:
        try:
            return self._s3("put_object", Body=self._body, IfNoneMatch="*")["ETag"]
        except FileExistsError:
            pass
        try:
            head = self._s3("head_object")
            age = _age_s(head)
            if age < LEASE_SECONDS:
                raise RunLockedError(
                    f"run {self._run!r} is being written by another writer (lock {self._where}, renewed {age:.0f} s "
                    f"ago); close that writer first, or log to a run of another name. A writer that was killed "
                    f"loses the lock {LEASE_SECONDS:.0f} s after its last renewal"
                )
            # Stale: take it over, unless someone else renewed or took it since we looked.
            return self._s3("put_object", Body=self._body, IfMatch=head["ETag"])["ETag"]
        except FileNotFoundError:  # released meanwhile: try once more
            try:
                return self._s3("put_object", Body=self._body, IfNoneMatch="*")["ETag"]
            except FileExistsError as err:
                raise self._taken_first() from err
        except RunLockedError:
            raise
        except OSError as err:
            raise self._taken_first() from err

    def _taken_first(self) -> RunLockedError:
        return RunLockedError(
            f"run {self._run!r}: another writer took the lock {self._where} first; close that writer first, or "
            "log to a run of another name"
        )

    def _renew(self) -> None:
        if self._lost is None:
            try:
                self._etag = self._s3("put_object", Body=self._body, IfMatch=self._etag)["ETag"]
            except OSError as err:
                self._lost = f"{type(err).__name__}: {err}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            self._renew()

    def check(self) -> None:
        """Renew the lease now; raise :class:`RunLockedError` if this writer lost it (nothing is written)."""
        self._renew()
        if self._lost is not None:
            raise RunLockedError(
                f"run {self._run!r}: this writer lost its lock {self._where} ({self._lost}): it was not renewed "
                f"for {LEASE_SECONDS:.0f} s and another writer took it; the tick was not committed"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._lost is None:
            try:
                self._s3("delete_object", IfMatch=self._etag)
            except OSError:
                pass  # lost meanwhile: the lock is another writer's now
            self._lost = "released"


def read_lease(io: RemoteStoreIO, run: str) -> dict[str, Any] | None:
    """The lease of ``run``'s writer as stored (``host``, ``pid``, ``token``), plus ``age_s``: seconds since its
    last renewal by the store's clock (a lease at least ``LEASE_SECONDS`` old belongs to a writer that is gone).
    None while no writer holds the run. One GET of a small object."""
    fs = _s3_fs(io, run)
    bucket, key = _lease_key(io, run)

    async def get() -> tuple[dict[str, Any], bytes]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return response, await body.read()

    try:
        response, data = sync(get())
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptLedgerError(f"{io.root / run_key(run) / 'writer.lock'} is not a writer's lease ({err})") from err
    if not isinstance(lease, dict) or not isinstance(lease.get("token"), str):
        raise CorruptLedgerError(f"{io.root / run_key(run) / 'writer.lock'} is not a writer's lease (no token)")
    return {**lease, "age_s": _age_s(response)}


def _s3_fs(io: RemoteStoreIO, run: str) -> Any:
    """The s3fs file system of ``io``, whose ``_call_s3`` makes the conditional requests of a run's lease."""
    fs = getattr(io.store, "fs", None)
    if not str(io.root).startswith("s3://") or fs is None or not hasattr(fs, "_call_s3"):
        raise ReadOnlyError(
            f"cannot write run {run!r} to {io.root}: a writer's lock needs conditional writes, implemented for "
            "s3:// (s3fs) only; write the run to a local folder or an s3:// URL (reading works anywhere)"
        )
    return fs


def _lease_key(io: RemoteStoreIO, run: str) -> tuple[str, str]:
    """The bucket and key of ``run``'s lease object."""
    bucket, _, key = f"{io.store_path}/{run_key(run)}/writer.lock".partition("/")
    return bucket, key


def _age_s(response: Mapping[str, Any]) -> float:
    """Seconds between an object's last write and the store's ``Date`` of the ``response`` that describes it."""
    now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    return float((now - response["LastModified"]).total_seconds())
