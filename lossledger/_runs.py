"""Open a run's writer: create the run, or resume it after removing what a killed writer left."""

from __future__ import annotations

import warnings
from typing import Any

from ._commit import (
    DAMAGED,
    column_meta,
    ensure_tick_arrays,
    flushed_ticks,
    now_iso,
    read_run_attrs,
    read_ticks,
    recover,
    stream_meta,
    write_run_attrs,
)
from ._samples import SampleIndex
from ._store import StoreIO, WriterLock
from .errors import CorruptLedgerError, LedgerWarning
from .format import TICK_COLUMNS, OnDuplicate, run_key, ticks_key
from .run import Run, _Stream


def open_writer(
    io: StoreIO, index: SampleIndex, name: str, lock: WriterLock, attrs: dict[str, Any], *,
    on_duplicate: OnDuplicate, allow_nonfinite: bool, stream_dtypes: dict[str, str],
) -> Run:
    """The writer of run ``name`` (its ``lock`` held by the caller), created or resumed.

    A resumed run continues after its last committed tick; ``attrs`` are merged into its user attributes
    (a changed value warns).
    """
    if io.exists(f"{run_key(name)}/zarr.json"):
        run_attrs = read_run_attrs(io, name)
        commit = run_attrs["commit"]
        if commit["ticks"] == 0:
            ensure_tick_arrays(io, name)
        recover(io, name, commit, index.n)
        changed = {k: v for k, v in attrs.items() if k in run_attrs["attrs"] and run_attrs["attrs"][k] != v}
        if changed:
            warnings.warn(
                f"run {name!r}: resuming with changed attributes {sorted(changed)} (stored values replaced)",
                LedgerWarning,
                stacklevel=3,
            )
        if attrs:
            run_attrs = {**run_attrs, "attrs": {**run_attrs["attrs"], **attrs}}
            write_run_attrs(io, name, run_attrs)
    else:
        # A run whose group metadata is missing was never created, or its creation was killed before the metadata
        # was written (it goes first, before any array): then there is nothing to clean. Arrays without it are
        # a damaged run's data, never deleted here.
        if any(io.exists(f"{run_key(name)}/{leftover}/zarr.json") for leftover in ("streams", "ticks")):
            raise CorruptLedgerError(
                f"run {name!r}: {io.root / run_key(name) / 'zarr.json'} is missing but the run holds arrays; "
                f"{DAMAGED} (or delete the folder {io.root / run_key(name)} to start the run afresh)"
            )
        created = now_iso()
        run_attrs = {"commit": {"ticks": 0, "streams": {}, "updated": created}, "created": created, "attrs": attrs}
        # The group metadata goes first: Zarr would otherwise make an attribute-less group for the arrays.
        write_run_attrs(io, name, run_attrs)
        ensure_tick_arrays(io, name)
    tick_meta = {c: column_meta(io, ticks_key(name, c), TICK_COLUMNS[c][0], None) for c in TICK_COLUMNS}
    ticks = read_ticks(io, name, run_attrs["commit"])
    flushed = flushed_ticks(run_attrs["commit"])
    streams = {}
    for stream, record in run_attrs["commit"]["streams"].items():
        meta = stream_meta(io, name, stream, run_attrs["commit"], index.n)
        streams[stream] = _Stream(
            stream, record["dtype"], tuple(record["element_shape"]), record["since"],
            per_chunk=int(meta["chunk_grid"]["configuration"]["chunk_shape"][1]), meta=meta,
        )
    return Run(
        io=io, name=name, index=index, lock=lock, attrs=run_attrs, ticks=ticks, flushed=flushed,
        tick_meta=tick_meta, streams=streams, on_duplicate=on_duplicate, allow_nonfinite=allow_nonfinite,
        stream_dtypes=stream_dtypes,
    )

