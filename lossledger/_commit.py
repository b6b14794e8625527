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

import datetime as _dt
import warnings
from typing import Any

import numpy as np

from ._store import StoreIO
from .errors import CorruptLedgerError, LedgerWarning, UnknownRunError
from .format import TICK_COLUMNS, TICKS_CHUNK, run_key, stream_key, ticks_key


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def read_run_attrs(io: StoreIO, run: str) -> dict[str, Any]:
    """The run group's attributes (commit record, user attrs, created); raises if there is no such run."""
    attrs = io.group_attrs(run_key(run))
    if attrs is None:
        raise UnknownRunError(f"no run named {run!r} in {io.root}; existing runs: {list_runs(io)}")
    commit = attrs.get("commit")
    if not isinstance(commit, dict) or not isinstance(commit.get("ticks"), int) or not isinstance(
        commit.get("streams"), dict
    ):
        raise CorruptLedgerError(f"run {run!r} in {io.root} has no valid commit record; the ledger is damaged")
    return attrs


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
    the rows still pending in the commit record. Memory O(T)."""
    n = commit["ticks"]
    pending = commit.get("pending_ticks", {})
    out = {}
    for column, (dtype, _) in TICK_COLUMNS.items():
        tail = np.asarray(pending.get(column, []), dtype=dtype)
        flushed = n - tail.size
        if tail.ndim != 1 or flushed < 0:
            raise CorruptLedgerError(f"run {run!r} in {io.root} has a bad commit record (pending_ticks); the ledger is damaged")
        # A run killed while being created has no tick arrays yet: with nothing flushed there is nothing to read.
        head = np.asarray(io.open_array(ticks_key(run, column))[:flushed]) if flushed else np.zeros(0, dtype)
        out[column] = np.concatenate([head, tail])
    return out


def ensure_tick_arrays(io: StoreIO, run: str) -> None:
    """Create the run's ``ticks/`` arrays if missing (a writer killed while creating the run leaves none)."""
    for column, (dtype, fill) in TICK_COLUMNS.items():
        if not io.exists(f"{ticks_key(run, column)}/zarr.json"):
            io.create_array(ticks_key(run, column), shape=(0,), chunks=(TICKS_CHUNK,), dtype=dtype, fill_value=fill)


def recover(io: StoreIO, run: str, commit: dict[str, Any]) -> int:
    """Remove what a killed writer left past the commit record; return how many objects were removed.

    Call after :func:`ensure_tick_arrays`. Deletes ``*.partial`` temp files, streams the record does not
    list, and chunks at ticks ``>= committed``. Array shapes are capacities (at least ``committed``) and stay.
    """
    committed, streams, flushed = commit["ticks"], commit["streams"], flushed_ticks(commit)
    removed = io.remove_partial_files(run_key(run))
    # Zarr creates missing parent groups through temp files too: a kill then can leave them one level up.
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
    needed = {stream_key(run, name): committed for name in streams}
    needed.update({ticks_key(run, column): flushed for column in TICK_COLUMNS})
    for key, n in needed.items():
        meta = io.get_json(f"{key}/zarr.json")
        if meta is None:
            raise CorruptLedgerError(f"array {key} listed in the commit record is missing; the ledger is damaged")
        if meta["shape"][0] < n:
            raise CorruptLedgerError(f"array {key} holds {meta['shape'][0]} ticks, not {n}; the ledger is damaged")
    if removed:
        warnings.warn(
            f"run {run!r}: removed {removed} leftover object(s) of an uncommitted tick (a writer stopped before "
            f"end_epoch()); the run resumes after its {committed} committed tick(s)",
            LedgerWarning,
            stacklevel=3,
        )
    return removed
