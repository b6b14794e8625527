"""Write a new ledger: to a local folder (built beside it, renamed into place) or to an object store."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._commit import now_iso
from ._remote import URL, check_no_options, is_url, store_io
from ._samples import Samples, write_samples
from ._store import StoreIO
from .errors import LedgerError, LedgerExistsError, LedgerNotFoundError
from .format import FORMAT_NAME, FORMAT_VERSION


def write_ledger(
    path: str | os.PathLike[str], samples: Samples, *, overwrite: bool, storage_options: Mapping[str, Any] | None
) -> Path | URL:
    """Write a new ledger holding ``samples`` at ``path`` and return where it is (see ``lossledger.create``)."""
    if is_url(path):
        return _write_remote(URL(str(path)), samples, overwrite, storage_options)
    check_no_options(path, storage_options)
    target = Path(path)
    existing = _existing(target, overwrite)
    staging = target.with_name(f".{target.name}.creating-{uuid.uuid4().hex[:8]}")
    try:
        _write_nodes(StoreIO(staging, read_only=False), samples)
        if existing:
            trash = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
            target.rename(trash)
            staging.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_nodes(io: StoreIO, samples: Samples) -> None:
    """Write a new ledger's nodes; the root group's metadata, which makes it a ledger, goes last."""
    write_samples(io, samples)
    io.create_group("runs")
    io.create_group("", {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": now_iso()})


def _write_remote(url: URL, samples: Samples, overwrite: bool, storage_options: Mapping[str, Any] | None) -> URL:
    io = store_io(url, read_only=False, storage_options=storage_options)
    if io.list_dir(""):
        if _ledger_format(io) != FORMAT_NAME:
            raise LedgerExistsError(
                f"{url} already holds objects and is not a ledger; lossledger never deletes other files: choose "
                "another URL"
            )
        if not overwrite:
            raise LedgerExistsError(
                f"a ledger already exists at {url}; open it with lossledger.open({str(url)!r}, mode='a'), or pass "
                "overwrite=True to replace it"
            )
        io.delete_many(["zarr.json"])  # first: a ledger half deleted is then no ledger, never a damaged one
        io.delete_dir("")
    _write_nodes(io, samples)
    return url


def _existing(target: Path, overwrite: bool) -> bool:
    """Whether a ledger is at ``target`` that may be replaced; raise if the path cannot be created."""
    if not target.exists():
        if not target.parent.is_dir():
            raise LedgerNotFoundError(f"cannot create {target}: folder {target.parent} does not exist; create it first")
        return False
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        return False
    if not target.is_dir() or _ledger_format(StoreIO(target, read_only=True)) != FORMAT_NAME:
        raise LedgerExistsError(
            f"{target} already exists and is not a ledger; lossledger never deletes other files: choose another path"
        )
    if not overwrite:
        raise LedgerExistsError(
            f"a ledger already exists at {target}; open it with lossledger.open({str(target)!r}, mode='a'), "
            "or pass overwrite=True to replace it"
        )
    return True


def _ledger_format(io: StoreIO) -> Any:
    """The ``format`` attribute of the root group at ``io`` (None when there is none or it is unreadable)."""
    try:
        return (io.group_attrs("") or {}).get("format")
    except LedgerError:
        return None
