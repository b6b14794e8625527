"""``Ledger.scores(..., engine="dask")``: the score engine spread over a Dask cluster, one task per sample block.

The local engine (:func:`lossledger.scores.score_blocks` over :func:`lossledger._scan.scan`) walks a stream in
sample blocks (whole chunk columns) and, inside each block, in slabs of ticks. Here every block is one Dask task.
The client sends a small description (:class:`BlockJob`: the ledger's path or URL, run, stream, tick positions,
Δt, the scan budget, plus the block's sample rows); the task opens the ledger itself, reads and decodes only that
block's chunks, runs the same kernel (:class:`lossledger.scores._BlockMoments`) over the same slabs, and sends
back the block's per-sample statistics (~64 bytes per sample), never loss values. Same blocks, same slabs, same
tiles: the same floating-point operations in the same order, so the table is bit-identical to
``engine="local"`` where the workers run the same numpy build on the same kind of CPU (docs/scale-out.md).

Everything but the blocks' statistics is the local engine's (:func:`lossledger._scoring.compute_scores`, which
takes this engine as its block source): the plan (the same scan budget), the cache file (a valid one is returned
without starting a task; a computed result is written there batch by batch as the blocks come back, or to a
temp file for a window), the memory-mapped result that ``top``, ``export`` and the SQL views reuse.

Dask is optional (the ``[dask]`` extra) and is imported only here, only when this engine is asked for.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from ._commit import read_run_attrs
from ._remote import store_io
from ._samples import Samples
from ._scan import block_layout
from ._scoring import compute_scores
from ._store import StoreIO
from .errors import LedgerNotFoundError, MissingDependencyError, ShapeMismatchError
from .format import stream_key
from .scores import score_blocks

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


@dataclass(frozen=True)
class BlockJob:
    """What a task needs besides its sample rows; built once per call and shipped once to each worker."""

    location: str  # the ledger's absolute path (which every worker must see) or its URL
    created: Any  # the ledger's creation stamp: a worker that sees another ledger at ``location`` refuses
    run: str
    stream: str
    tick_index: np.ndarray  # (n,) int64 positions of the scanned ticks, sorted, unique
    dts: np.ndarray  # (1, n) float64 Δt of those ticks
    budget_bytes: int  # the client's scan budget: the same blocks and slabs as its local engine
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of a URL (credentials too)


def score_block(job: BlockJob, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Per-sample statistics of sample rows ``lo..hi`` (one block of the local plan), as the local engine
    computes them: ``action`` (1, hi - lo), the others (hi - lo,). Runs on a worker.

    Memory: the scan's two slabs (the client's scan budget, 64 MB, of float32), the block's state (~72 bytes
    per value of the block) and the result (~64 bytes per sample).
    """
    io = store_io(job.location, read_only=True, storage_options=job.storage_options or None)
    _check_same_ledger(io, job)
    array = io.open_array(stream_key(job.run, job.stream))
    for _, _, stats in score_blocks(array, job.tick_index, job.dts, budget_bytes=job.budget_bytes, rows=(lo, hi)):
        return stats
    raise AssertionError(f"rows {lo}..{hi} hold no block")  # the client sends only blocks of the plan


def _check_same_ledger(io: StoreIO, job: BlockJob) -> None:
    """Refuse to score a ledger other than the client's (a path that is not shared, or a stale copy)."""
    try:
        root = io.group_attrs("")
    except FileNotFoundError:  # no folder at the path on this worker
        root = None
    where = f"worker {socket.gethostname()} (pid {os.getpid()})"
    fix = (
        "Dask workers must reach the ledger at the same path: put it on a shared file system or an object store "
        "(docs/scale-out.md)"
    )
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
    """:func:`lossledger._scoring.compute_scores` with the blocks computed by Dask tasks (one per sample block) on
    ``client`` (default: the current ``distributed`` client, else Dask's default scheduler). The same plan, cache
    and files as the local engine: a valid cache is returned without starting a task.

    Memory on the client: the results of a few blocks at a time (~64 bytes per sample of a block), written to
    the file as they come; never loss values.
    """
    dask = _import_dask()
    location = os.path.abspath(io.root) if io.local else str(io.root)
    job = partial(
        BlockJob, location=location, storage_options=dict(getattr(io, "storage_options", {})),
        created=(io.group_attrs("") or {}).get("created"), run=run, stream=stream,
    )
    return compute_scores(io, samples, run, stream, dt, ticks, blocks=partial(_task_blocks, dask, client, job))


def _task_blocks(
    dask: Any, client: Any, job: Callable[..., BlockJob], array: Any, tick_index: np.ndarray, dts: np.ndarray, *,
    budget_bytes: int,
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """:func:`lossledger.scores.score_blocks`'s blocks of ``array``, each scored by a Dask task on a worker."""
    n, element = int(array.shape[1]), tuple(int(d) for d in array.shape[2:])
    width, _ = block_layout(n, int(array.chunks[1]), element, tick_index.size, budget_bytes)
    shared = dask.delayed(job(tick_index=tick_index, dts=dts, budget_bytes=budget_bytes))  # sent once per worker
    starts = range(0, n, width)
    tasks = [dask.delayed(score_block)(shared, lo, min(n, lo + width)) for lo in starts]
    for lo, stats in zip(starts, _in_order(dask, tasks, client)):
        yield lo, min(n, lo + width), stats


def _in_order(dask: Any, tasks: list[Any], client: Any) -> Iterator[dict[str, np.ndarray]]:
    """The tasks' results in order. On a ``distributed`` cluster all are submitted at once and each result is
    let go once taken; with Dask's other schedulers they run in waves of two per core."""
    client = client if client is not None else _current_client()
    if client is not None:
        futures = client.compute(tasks)
        for i in range(len(futures)):
            future, futures[i] = futures[i], None  # released on the cluster once its result is here
            yield future.result()
        return
    wave = 2 * (os.cpu_count() or 1)
    for start in range(0, len(tasks), wave):
        yield from dask.compute(*tasks[start : start + wave])


def _current_client() -> Any:
    """The ``distributed`` client Dask would use now (``as_current``, else the default one), or None."""
    try:
        from distributed import Client
    except ImportError:
        return None
    try:
        return Client.current(allow_global=True)
    except ValueError:  # no client
        return None
