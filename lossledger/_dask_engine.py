"""``Ledger.scores(..., engine="dask")``: the score engine spread over a Dask cluster, one task per sample block.

The local engine (:func:`lossledger.scores.score_blocks` over :func:`lossledger._scan.scan`) walks a stream in
sample blocks (whole chunk columns) and, inside each block, in slabs of ticks. Here every block is one Dask task.
The client sends a small description (:class:`BlockJob`: where the ledger is, run, stream, tick positions, Δt,
ticks per slab, plus the block's sample rows); the task opens the ledger itself, reads and decodes only that
block's chunks, runs the same kernel (:class:`lossledger.scores._BlockMoments`) over the same slabs, and sends
back the block's per-sample statistics (~64 bytes per sample), never loss values. Same blocks, same slabs, same
tiles: the same floating-point operations in the same order, so the table is bit-identical to
``engine="local"`` where the workers run the same numpy build on the same kind of CPU (docs/scale-out.md).

Cache: the result over all ticks is the local engine's, bit for bit, so this engine shares its parquet cache
(:mod:`lossledger._scoring`): a valid cached table is returned without starting a task, and a computed one is
written there, so ``top``, ``export`` and the SQL views that follow reuse it. Windows are never cached.

Dask is optional (the ``[dask]`` extra) and is imported only here, only when this engine is asked for.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from . import _scan
from ._arrays import tick_positions
from ._commit import read_run_attrs, read_ticks
from ._samples import Samples
from ._scan import ChunkSource, _submit
from ._scoring import _CacheWriter, _read_cache, _stamp, _writable, cache_path, compute_scores
from ._store import StoreIO
from .errors import LedgerNotFoundError, MissingDependencyError, ShapeMismatchError
from .format import stream_key
from .scores import DT_MODES, _BlockMoments, block_table, null_to_nan, scores_schema, tick_durations

Engine = Literal["local", "dask"]
ENGINES: tuple[str, ...] = ("local", "dask")


def check_engine(engine: object, client: object) -> None:
    """Raise unless ``engine`` is one of :data:`ENGINES`, Dask is installed for ``"dask"``, and ``client`` is
    None or (with ``engine="dask"``) a ``distributed.Client``. Reads and writes nothing."""
    if engine not in ENGINES:
        raise ShapeMismatchError(
            f"engine must be one of {list(ENGINES)} (where scores are computed: this process, or a Dask "
            f"cluster), got {engine!r}"
        )
    if engine == "local":
        if client is not None:
            raise ShapeMismatchError(
                "client= is used only by engine='dask'; pass engine='dask' to compute on that cluster, or drop client"
            )
        return
    _import_dask()
    if client is not None and not _is_client(client):
        raise ShapeMismatchError(
            f"client must be a distributed.Client (or None for the current one), got {type(client).__name__}"
        )


def _import_dask() -> Any:
    try:
        import dask
    except ImportError as err:
        raise MissingDependencyError(
            'engine="dask" needs Dask: pip install "lossledger[dask]" (or use engine="local")'
        ) from err
    return dask


def _is_client(client: object) -> bool:
    try:
        from distributed import Client
    except ImportError:  # a client object cannot exist without the package
        return False
    return isinstance(client, Client)


def block_layout(n: int, per_chunk: int, element: tuple[int, ...], n_ticks: int, budget_bytes: int) -> tuple[int, int]:
    """(samples per block, ticks per slab) of :func:`lossledger._scan.scan`'s plan, a pure function of the
    stream's shape and the scan budget: blocks start at multiples of the first and slabs at multiples of the
    second (the last of each clipped). Slab values are float32 whatever the stored dtype, hence 4 bytes."""
    slab_bytes = max(1, budget_bytes // 2)
    element_bytes = 4 * int(np.prod(element, dtype=np.int64))
    chunks_per_block = max(1, slab_bytes // max(1, n_ticks * per_chunk * element_bytes))
    width = min(n, chunks_per_block * per_chunk)
    ticks_per_slab = int(max(1, min(n_ticks, slab_bytes // max(1, width * element_bytes))))
    return width, ticks_per_slab


@dataclass(frozen=True)
class BlockJob:
    """What a task needs besides its sample rows; built once per call and shipped once to each worker."""

    location: str  # absolute path of the ledger folder, which every worker must see
    created: Any  # the ledger's creation stamp: a worker that sees another ledger at ``location`` refuses
    run: str
    stream: str
    tick_index: np.ndarray  # (n,) int64 positions of the scanned ticks, sorted, unique
    dts: np.ndarray  # (1, n) float64 Δt of those ticks
    ticks_per_slab: int


def score_block(job: BlockJob, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Per-sample statistics of sample rows ``lo..hi`` (one block of the local plan), as the local engine
    computes them: ``action`` (1, hi - lo), the others (hi - lo,). Runs on a worker.

    Memory: one slab (at most half the scan budget, 32 MB, of float32), the block's state (~72 bytes per value
    of the block) and the result (~64 bytes per sample).
    """
    io = StoreIO(Path(job.location), read_only=True)
    _check_same_ledger(io, job)
    source = ChunkSource(io.open_array(stream_key(job.run, job.stream)))
    state = _BlockMoments((hi - lo, *source.element), job.dts.shape[0])
    n_ticks = job.tick_index.size
    spare: np.ndarray | None = None
    for start in range(0, n_ticks, job.ticks_per_slab):
        ticks = np.arange(start, min(n_ticks, start + job.ticks_per_slab))
        values, futures = _submit(source, job.tick_index, (lo, hi, start, int(ticks[-1]) + 1), spare)
        for future in futures:
            future.result()
        state.update(values, job.dts[:, ticks])  # indexed as score_blocks does: the same Δt arrays
        spare = values.base
    return state.per_sample()


def _check_same_ledger(io: StoreIO, job: BlockJob) -> None:
    """Refuse to score a ledger other than the client's (a path that is not shared, or a stale copy)."""
    root = io.group_attrs("")
    where = f"worker {socket.gethostname()} (pid {os.getpid()})"
    fix = "Dask workers must reach the ledger at the same path: put it on a shared file system (docs/scale-out.md)"
    if root is None or root.get("created") != job.created:
        seen = "no ledger" if root is None else f"another ledger (created {root.get('created')})"
        raise LedgerNotFoundError(f"{where} finds {seen} at {job.location}, not the client's; {fix}")
    committed = read_run_attrs(io, job.run)["commit"]["ticks"]
    if job.tick_index.size and committed <= int(job.tick_index[-1]):
        raise LedgerNotFoundError(
            f"{where} sees {committed} committed tick(s) of run {job.run!r} at {job.location}, fewer than the "
            f"client's; it reads a stale copy. {fix}"
        )


def dask_scores(
    io: StoreIO, samples: Samples, run: str, stream: str, dt: str, ticks: Any, *, client: Any = None
) -> pa.Table:
    """:func:`lossledger._scoring.compute_scores`, computed by Dask tasks (one per sample block) on ``client``
    (default: the current ``distributed`` client, else Dask's default scheduler). Bit-identical result.

    Memory on the client: the per-block results (~64 bytes per sample) turned one by one into the table
    (~80 bytes per sample); never loss values.
    """
    dask = _import_dask()
    if dt not in DT_MODES:
        raise ShapeMismatchError(f"dt must be one of {list(DT_MODES)} (Δt per tick), got {dt!r}")
    commit = read_run_attrs(io, run)["commit"]
    stamp = _stamp(commit)
    cache = cache_path(io.root, run, stream, dt)
    if ticks is None and (cached := _read_cache(cache, stamp)) is not None:
        return null_to_nan(cached)
    tick_index = np.unique(tick_positions(ticks, commit["ticks"]))  # a window counts each tick once
    if tick_index.size == 0:  # nothing to read: the local engine's all-NaN table
        return compute_scores(io, samples, run, stream, dt, ticks)
    rows = read_ticks(io, run, commit)
    array = io.open_array(stream_key(run, stream))
    n, element = int(array.shape[1]), tuple(int(d) for d in array.shape[2:])
    width, ticks_per_slab = block_layout(n, int(array.chunks[1]), element, tick_index.size, _scan.SCAN_BUDGET_BYTES)
    job = BlockJob(
        location=os.path.abspath(io.root),
        created=(io.group_attrs("") or {}).get("created"),
        run=run,
        stream=stream,
        tick_index=tick_index,
        dts=tick_durations(dt, rows["step"], rows["wall"])[tick_index][np.newaxis],
        ticks_per_slab=ticks_per_slab,
    )
    shared = dask.delayed(job)  # one graph key: sent to each worker once, not once per task
    starts = range(0, n, width)
    tasks = [dask.delayed(score_block)(shared, lo, min(n, lo + width)) for lo in starts]
    results: list[Any] = list(dask.compute(*tasks, scheduler=client))
    schema = scores_schema(samples.label is not None)
    batches = []
    for i, lo in enumerate(starts):
        stats, results[i] = results[i], None  # drop each block's result once it is in the table
        hi = lo + stats["n_obs"].shape[0]
        label = None if samples.label is None else samples.label[lo:hi]
        batches.append(block_table(schema, samples.sample_id[lo:hi], label, {**stats, "action": stats["action"][0]}))
    if ticks is None and _writable(cache.parent):
        writer = _CacheWriter(cache, schema, stamp)
        try:
            for batch in batches:
                writer.write(batch)
            writer.commit()
        finally:
            writer.discard()
    return null_to_nan(pa.Table.from_batches(batches, schema=schema))
