"""Per-pixel streams of the PyTorch Recorder that every rank writes itself (``Recorder(pixel_streams=...)``).

Nothing of these streams is gathered: each rank encodes and writes the chunks of its own samples through a
:class:`lossledger.shards.ShardWriter`, one sample per chunk, in a background thread as its copies finish. For the
open tick ``t``:

- the recorder's construction (a collective): rank 0 declares the streams in its run and broadcasts where the
  run is (a folder, or an ``s3://`` URL and its storage options) and its open tick; every rank opens its shard
  writer;
- during the epoch each rank writes tick ``t``'s chunks of the samples it logged, leaving out the samples its
  ``DistributedSampler`` repeats only to pad the ranks (another rank holds the original);
- ``end_epoch``: every rank finishes its writes and all exchange their status (a collective, so also the barrier);
  rank 0 commits ``t`` only if every rank succeeded, then broadcasts the new open tick, so that no rank writes
  tick ``t + 1`` before ``t`` is committed. On any failure every rank deletes its chunks of ``t``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch.distributed as dist

from lossledger.errors import AdapterError
from lossledger.run import Run
from lossledger.shards import ShardWriter

from ._torch_dist import broadcast_from_first
from ._torch_host import Entry

#: Batches handed to the writer thread and not yet written, at most: when training logs faster than the chunks
#: are written, ``log`` waits for the oldest, so host memory stays a few batches, not an epoch.
WRITES_IN_FLIGHT = 4


def open_sharded(
    run: Run | None, shapes: dict[str, tuple[int, ...]], *, group: Any, rank: int, distributed: bool, sampler: Any
) -> ShardedStreams:
    """Rank 0 declares the streams in ``run`` and tells the other ranks where the run is (distributed: a collective,
    so that no rank opens its shard writer before the streams exist); every rank opens its shard writer."""
    where: Any = None
    if rank == 0:
        assert run is not None  # the Recorder refuses run=None on rank 0
        try:
            for name, shape in shapes.items():
                run.declare_stream(name, tuple(shape))
            # An object store's options travel with its URL.
            options = run.storage_options or None
            where = (str(run.ledger_path), run.name, run.ticks, run.allow_nonfinite, options)
        except Exception as err:
            if distributed:  # the other ranks must learn of it, or they would wait in the broadcast forever
                broadcast_from_first(f"{type(err).__name__}: {err}", group)
            raise
    if distributed:
        where = broadcast_from_first(where, group)
    if isinstance(where, str):
        raise AdapterError(f"rank 0 could not declare the pixel streams {sorted(shapes)}: {where}")
    shards, error = None, None
    try:  # e.g. a rank on a node that does not see the ledger's folder
        shards = ShardedStreams(where, frozenset(shapes), group=group, distributed=distributed, sampler=sampler)
    except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
        error = err
    raise_if_any_failed(error, group=group, distributed=distributed, what=f"could not open the ledger {where[0]}")
    assert shards is not None
    return shards


class ShardedStreams:
    """The streams of one recorder that this rank writes itself: a queue of logged values and a writer thread.

    Host memory: the batches whose device copies still run, plus at most ``WRITES_IN_FLIGHT`` batches being written.
    """

    def __init__(
        self,
        where: tuple[str, str, int, bool, dict[str, Any] | None],
        names: frozenset[str],
        *,
        group: Any,
        distributed: bool,
        sampler: Any,
    ) -> None:
        path, run_name, self.tick, allow_nonfinite, options = where
        self.names = names
        self._group, self._distributed, self._sampler = group, distributed, sampler
        self._writer = ShardWriter(path, run_name, allow_nonfinite=allow_nonfinite, storage_options=options)
        self._queue: deque[tuple[Entry, np.ndarray | None]] = deque()  # logged values and the ids to leave out
        self._jobs: deque[Future[int]] = deque()  # writes handed to the thread, oldest first (done in that order)
        self._error: BaseException | None = None  # the first write of the open tick that failed
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lossledger-shards")
        self._padding: np.ndarray | None = None  # this rank's padding repeats in the open tick's epoch
        self.logged = 0  # values logged in the open tick (for the warning when they are discarded)

    # --- logging --------------------------------------------------------------------------------------
    def add(self, entry: Entry, *, training: bool) -> None:
        """Queue ``entry``'s values (its copies may still run); in training calls drop the sampler's padding."""
        drop = None
        if training and self._sampler is not None:
            if self._padding is None:
                self._padding = padding_ids(self._sampler)
            drop = self._padding
        self._queue.append((entry, drop))
        self.logged += int(entry.ids.shape[0])
        self.pump()

    def pump(self) -> None:
        """Hand the queued values whose copies are done to the writer thread, in logging order; waits for the oldest
        write only while ``WRITES_IN_FLIGHT`` are under way (never for the device)."""
        while self._queue and self._queue[0][0].ready():
            self._reap(block=len(self._jobs) >= WRITES_IN_FLIGHT)
            entry, drop = self._queue.popleft()
            self._jobs.append(self._thread.submit(self._write, self.tick, entry, drop))
        self._reap(block=False)

    def _reap(self, *, block: bool) -> None:
        """Forget the writes that are done, keeping the first error; with ``block``, wait for the oldest first."""
        if block:
            self._jobs[0].exception()
        while self._jobs and self._jobs[0].done():
            error = self._jobs.popleft().exception()
            self._error = self._error or error

    def _write(self, tick: int, entry: Entry, drop: np.ndarray | None) -> int:
        ids = entry.ids.numpy()
        values = {name: t.numpy() for name, t in entry.streams.items()}
        if drop is not None and drop.size:
            keep = ~np.isin(ids, drop)
            ids, values = ids[keep], {name: v[keep] for name, v in values.items()}
        return self._writer.write(tick, ids, **values) if ids.size else 0

    # --- the tick -------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Write everything queued and wait for it; then (distributed: a collective, also the barrier) raise if any
        rank failed, after every rank deleted its chunks of the tick."""
        for entry, _ in self._queue:
            entry.wait()
        self.pump()
        while self._jobs:
            self._reap(block=True)
        error, self._error = self._error, None
        try:
            what = f"could not write its chunks of tick {self.tick}: the tick is not committed, its chunks are deleted"
            raise_if_any_failed(error, group=self._group, distributed=self._distributed, what=what)
        except BaseException:
            self.discard()
            raise

    def committed(self, open_tick: int | str | None) -> None:
        """After rank 0's commit of the tick: its new open tick, or why it failed (distributed: a collective in which
        the other ranks pass None and receive rank 0's value)."""
        if self._distributed:
            open_tick = broadcast_from_first(open_tick, self._group)
        if open_tick == self.tick + 1:
            self.tick, self._padding, self.logged = self.tick + 1, None, 0
            return
        self.discard()
        raise AdapterError(f"rank 0 could not commit tick {self.tick} ({open_tick}); every rank deleted its chunks "
                           "of it")

    def discard(self) -> int:
        """Forget the values queued and delete the chunks written in the open tick; return how many were logged."""
        for job in self._jobs:
            job.exception()  # wait: a write in progress must land before its chunks are deleted
        self._queue, self._jobs, self._error = deque(), deque(), None
        self._writer.discard()
        logged, self.logged, self._padding = self.logged, 0, None
        return logged

    def close(self) -> None:
        self._thread.shutdown()


def padding_ids(sampler: Any) -> np.ndarray:
    """The sample ids that ``sampler`` (a ``DistributedSampler``) gives this rank only to pad the ranks, this epoch.

    ``DistributedSampler`` appends repeats of the first indices so that every rank gets ``ceil(N / ranks)``; rank
    ``r``'s ``k``-th index sits at position ``r + k * ranks`` of that list, a repeat when the position is ``>= N``
    (the original sits on a lower rank). Ids are the dataset's ``sample_ids`` (an ``IndexedDataset``), else the
    indices. Costs one pass over this rank's indices of the epoch (set by ``sampler.set_epoch``).
    """
    needed = ("num_replicas", "rank", "drop_last", "dataset")
    if not all(hasattr(sampler, attr) for attr in needed):
        raise AdapterError(
            f"sampler= must be a torch.utils.data.DistributedSampler (with {', '.join(needed)}), got "
            f"{type(sampler).__name__}"
        )
    n, ranks, rank = len(sampler.dataset), int(sampler.num_replicas), int(sampler.rank)
    if sampler.drop_last or n % ranks == 0:
        return np.empty(0, dtype=np.int64)
    first = -(-(n - rank) // ranks)
    indices = np.fromiter(iter(sampler), dtype=np.int64)[max(first, 0) :]
    sample_ids = getattr(sampler.dataset, "sample_ids", None)
    return indices if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)[indices]


def raise_if_any_failed(error: BaseException | None, *, group: Any, distributed: bool, what: str) -> None:
    """Raise ``error`` on the rank that had it, and on the others an :class:`AdapterError` saying which rank ``what``;
    distributed, a collective that every rank calls, failed or not (so that none is left waiting in the next one)."""
    failed = []
    if distributed:
        statuses: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}", group)
        failed = [(rank, status) for rank, status in enumerate(statuses) if status is not None]
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise AdapterError(f"rank {rank} {what} ({message})")
