"""PyTorch adapter: sample ids in every batch, a recorder that adds no host sync per step, the probe protocol.

Example (CPU or GPU; the loss must be per sample, ``reduction="none"``)::

    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from lossledger.adapters.torch import IndexedDataset, Recorder, evaluate

    loader = DataLoader(IndexedDataset(train_set), batch_size=64, shuffle=True)   # yields (ids, x, y)
    with ledger.run("cnn-s0") as run, Recorder(run) as rec:
        for epoch in range(10):
            for ids, x, y in loader:
                losses = F.cross_entropy(model(x.to(dev)), y.to(dev), reduction="none")   # (B,)
                rec.log(ids, losses)                # no host sync: copied to the host in the background
                losses.mean().backward(); opt.step(); opt.zero_grad()
            rec.end_epoch()                         # waits for the copies, logs them, commits the tick

``Recorder`` also works under ``DistributedDataParallel``: every rank logs its own samples, ``end_epoch`` gathers
them on rank 0, drops the samples that ``DistributedSampler`` repeats to pad the ranks, and only rank 0 writes.
Per-pixel streams (``pixel_streams=``) are never gathered: each rank writes its own samples' chunks.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from lossledger.errors import (
    AdapterError,
    InvalidDTypeError,
    LedgerWarning,
    RunClosedError,
    ShapeMismatchError,
)
from lossledger.format import check_stream_name
from lossledger.run import Run

from ._torch_dist import Group, gather_groups
from ._torch_host import Entry, as_tensor, concat, to_host
from ._torch_probe import evaluate
from ._torch_shards import ShardedStreams, open_sharded

__all__ = ["AdapterError", "IndexedDataset", "Recorder", "evaluate"]

#: The open Recorder of each run: evaluate(run, ...) logs through it, and run.close() waits for its commit.
_ACTIVE: weakref.WeakKeyDictionary[Run, weakref.ref[Recorder]] = weakref.WeakKeyDictionary()

#: Log calls after which the pending entries whose copies are done are merged (a few blocks, not one per call).
_COMPACT_EVERY = 128

_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32})


class IndexedDataset(Dataset):
    """A map-style dataset whose items also carry their sample id: ``item`` becomes ``(sample_id, *item)``.

    ``sample_ids``: optional (len(dataset),) ids of the ledger (default: the index ``i``). Tuple items gain the id
    in front (``(x, y)`` -> ``(id, x, y)``), dict items gain a ``"sample_id"`` key, other items become
    ``(id, item)``. The default ``DataLoader`` collate turns the ids into a (B,) int64 tensor.

    >>> ids, x, y = next(iter(DataLoader(IndexedDataset(TensorDataset(X, Y)), batch_size=32)))
    """

    def __init__(self, dataset: Any, sample_ids: Sequence[int] | np.ndarray | None = None) -> None:
        self.dataset = dataset
        self.sample_ids = None if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        if self.sample_ids is not None and len(self.sample_ids) != len(dataset):
            raise ShapeMismatchError(
                f"IndexedDataset got {len(self.sample_ids)} sample_ids for a dataset of {len(dataset)} items; "
                "pass one id per item, in dataset order"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        sample_id = int(index) if self.sample_ids is None else int(self.sample_ids[index])
        if isinstance(item, tuple | list):
            return (sample_id, *item)
        if isinstance(item, dict):
            return {"sample_id": sample_id, **item}
        return (sample_id, item)


class Recorder:
    """Per-sample values of a training loop, logged into ``run`` without a host sync per step.

    ``log`` detaches the tensors, casts floating values to float32 (AMP half/bfloat16 losses are stored as float32)
    and, for tensors on an accelerator, queues a ``non_blocking`` copy into pinned host memory followed by an event:
    no call waits for the device. ``end_epoch`` waits for those copies and hands the epoch to a writer thread that
    logs it (one ``run.log`` call per set of streams) and commits the tick while training goes on; the next
    ``end_epoch``, ``flush``, ``wait`` or ``close`` (and ``run.close()``) first waits for that commit.
    ``background=False`` commits in ``end_epoch`` itself. Host memory: the epoch's values (int64 ids + float32
    values) until the commit, as much as ``run.log``'s tick buffer holds. Errors about the values (unknown or
    repeated ids, NaN) come from the run when the tick is logged, so they are raised by the next call of the
    recorder rather than by ``log``; a refused tick records nothing.

    Distributed (``torch.distributed`` initialised with world size > 1 in ``group``, or ``distributed=True``): every
    rank calls ``log`` with its own samples, and ``flush``/``end_epoch`` together (they are collectives); rank 0 of
    the group gathers, keeps one value per sample (the lowest rank's, so the ids ``DistributedSampler`` repeats to
    pad the ranks are stored once), and writes. Other ranks may pass ``run=None``.

    ``pixel_streams={"pixel": (H, W)}``: streams of per-pixel (element) values that are never gathered nor buffered
    for the epoch: rank 0 declares them in its run (:meth:`lossledger.Run.declare_stream`, one sample per chunk file)
    and every rank writes the chunks of its own samples in a background thread as their copies finish; making the
    recorder is then a collective too, and ``end_epoch`` commits before it returns. ``sampler``: the training
    ``DistributedSampler``, whose padding repeats (another rank holds the original) are left out of those streams.

    The tick's ``step`` is the previous step plus the number of ``log`` calls of this rank (those made by
    :func:`evaluate` do not count), unless ``end_epoch(step=...)`` says otherwise. Keep the tensors given to ``log``
    unchanged until ``end_epoch``: float32 host tensors are held as they are, not copied.
    """

    def __init__(
        self,
        run: Run | None,
        *,
        background: bool = True,
        group: Any = None,
        distributed: bool | None = None,
        pixel_streams: Mapping[str, Sequence[int]] | None = None,
        sampler: Any = None,
    ) -> None:
        self._pending: list[Entry] = []
        self._merged = 0  # leading entries of _pending that are merged blocks
        self._shapes: dict[str, torch.Size] = {}  # element shape of each stream logged (names already checked)
        self._steps = 0  # log calls in this tick that count as optimizer steps
        self._closed = False
        self._writer: ThreadPoolExecutor | None = None
        self._job: Future[int] | None = None
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.distributed = bool(distributed)
        self._group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        if run is None and self.rank == 0:
            where = "rank 0 of the process group" if self.distributed else "a single process"
            raise AdapterError(
                f"Recorder got run=None on {where}, which writes the ledger; pass the run opened with "
                "ledger.run(name) (other ranks may pass None)"
            )
        self.run = run if self.rank == 0 else None
        if self.run is not None and _active(self.run) is not None:
            raise AdapterError(
                f"run {self.run.name!r} already has an open Recorder; log through that one (evaluate() accepts it "
                "too), or close it first"
            )
        self._shards: ShardedStreams | None = None
        if pixel_streams:
            shapes = {check_stream_name(name): tuple(int(d) for d in shape) for name, shape in pixel_streams.items()}
            self._shards = open_sharded(
                self.run, shapes, group=group, rank=self.rank, distributed=self.distributed, sampler=sampler
            )
            self._shapes.update({name: torch.Size(shape) for name, shape in shapes.items()})
        if self.run is not None:
            _ACTIVE[self.run] = weakref.ref(self)
            _wait_before_close(self.run)
            # Sharded streams commit in end_epoch itself: the ranks' next chunks belong to the next tick.
            if background and self._shards is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="lossledger-commit")

    # --- public API -----------------------------------------------------------------------------------
    def log(self, ids: Any, loss: Any = None, /, **streams: Any) -> None:
        """Record per-sample values for the current tick; returns at once, without waiting for the device.

        ``ids``: (B,) integer sample ids (tensor on any device, numpy or a sequence). ``loss``: (B,) per-sample
        losses, stored in stream ``"loss"``; each keyword is another stream of (B, *element_shape) values.
        Counts as one optimizer step.
        """
        if loss is not None:
            if "loss" in streams:
                raise ShapeMismatchError("log() got the loss both positionally and as loss=...; pass it once")
            streams = {"loss": loss, **streams}
        self._add(ids, streams, count_step=True)

    def flush(self) -> None:
        """Wait for the pending copies and log them into the run now, without committing.

        Distributed: a collective (every rank calls it); rank 0 logs the gathered values. Pixel streams: every rank's
        chunks are written (not committed).
        """
        self._check_open()
        self.wait()
        self._settle()
        groups = self._collect()
        if self.run is not None:
            _log_groups(self.run, groups)

    def end_epoch(self, *, epoch: int | None = None, step: int | None = None) -> int | None:
        """Commit the tick: its values are logged and committed by the writer thread (see the class docstring).

        Returns the index the tick gets (``None`` on ranks that do not write); it is readable once ``wait()``
        returns. ``epoch`` defaults to the previous + 1, ``step`` to the previous + this tick's ``log`` calls.
        Distributed: a collective.
        """
        self._check_open()
        self.wait()
        steps, self._steps = self._steps, 0
        self._settle()
        groups = self._collect()
        if self._shards is not None:
            return self._commit_sharded(groups, epoch, step, steps)
        if self.run is None:
            return None
        tick = self.run.ticks
        if self._writer is None:
            _commit(self.run, groups, epoch, step, steps)
        else:
            self._job = self._writer.submit(_commit, self.run, groups, epoch, step, steps)
        return tick

    def wait(self) -> None:
        """Block until the tick handed to the writer thread is committed; re-raise its error if it failed."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the last commit and stop; values logged since the last ``end_epoch`` are discarded (warned).

        Does not close the run: whoever opened it closes it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
            if self.run is not None and _active(self.run) is self:
                del _ACTIVE[self.run]
        n = sum(int(e.ids.shape[0]) for e in self._pending) + (self._shards.logged if self._shards else 0)
        self._discard()
        if self._shards is not None:
            self._shards.close()
        if n:
            warnings.warn(
                f"Recorder: {n} value(s) logged since the last end_epoch() were discarded on close; call "
                "rec.end_epoch() before closing to keep them",
                LedgerWarning,
                stacklevel=2,
            )

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" rank={self.rank}" if self.distributed else ""
        name = getattr(self.run, "name", None)
        return f"<lossledger.adapters.torch.Recorder run={name!r}{where} pending={len(self._pending)}>"

    # --- logging --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RunClosedError("this Recorder is closed; create a new Recorder(run) to log again")

    def _add(self, ids: Any, streams: dict[str, Any], *, count_step: bool) -> None:
        # Called every training step: checks only what needs no values (values are the run's to check).
        self._check_open()
        if not streams:
            raise ShapeMismatchError("log() got ids but no values; pass per-sample losses, e.g. rec.log(ids, losses)")
        ids_t = ids if isinstance(ids, torch.Tensor) else as_tensor(ids, "ids")
        if ids_t.ndim != 1:
            raise ShapeMismatchError(f"ids must be 1-D, got shape {tuple(ids_t.shape)}; pass one id per sample")
        if ids_t.dtype not in _INT_DTYPES:
            raise InvalidDTypeError(f"ids must be integers, got {ids_t.dtype}; pass dataset indices (int64)")
        n = ids_t.shape[0]
        values: dict[str, torch.Tensor] = {}
        for name, raw in streams.items():
            t = raw if isinstance(raw, torch.Tensor) else as_tensor(raw, f"stream {name!r}")
            if t.ndim == 0 or t.shape[0] != n:
                got = "a scalar" if t.ndim == 0 else f"shape {tuple(t.shape)}"
                raise ShapeMismatchError(
                    f"stream {name!r} got {got} for {n} ids; log one value per sample "
                    "(a per-sample loss uses reduction='none')"
                )
            element = self._shapes.get(name)
            if element is None:
                self._shapes[check_stream_name(name)] = element = t.shape[1:]
            if t.shape[1:] != element:
                raise ShapeMismatchError(
                    f"stream {name!r} has element shape {tuple(element)} but got {tuple(t.shape[1:])}; keep one "
                    "element shape per stream (log other shapes to a new stream name)"
                )
            if t.is_complex():
                raise InvalidDTypeError(f"stream {name!r} got complex values; log real numbers")
            if t.requires_grad:
                t = t.detach()
            values[name] = t if t.dtype == torch.float32 else t.to(torch.float32)
        if ids_t.dtype != torch.int64:
            ids_t = ids_t.to(torch.int64)
        if ids_t.is_cpu and all(t.is_cpu for t in values.values()):
            entry = Entry(ids_t, values)
        else:
            host, event = to_host([ids_t, *values.values()])
            entry = Entry(host[0], dict(zip(values, host[1:], strict=True)), event)
        sharded = self._shards.names.intersection(values) if self._shards is not None else ()
        if sharded:
            assert self._shards is not None
            own = {name: entry.streams.pop(name) for name in sharded}
            self._shards.add(Entry(entry.ids, own, entry.event), training=count_step)
        if entry.streams:
            self._pending.append(entry)
        if count_step:
            self._steps += 1
        if len(self._pending) - self._merged >= _COMPACT_EVERY:
            self._compact()

    def _settle(self) -> None:
        """Every rank's chunks of the tick are written (a barrier when distributed); if any rank failed, the tick is
        dropped everywhere (its values and chunks) and the error raised."""
        if self._shards is None:
            return
        try:
            self._shards.settle()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Drop the values logged since the last end_epoch (the tick will not be committed), and delete the chunks
        this rank wrote of it."""
        self._pending, self._merged, self._steps = [], 0, 0
        if self._shards is not None:
            self._shards.discard()

    def _compact(self) -> None:
        """Merge the entries logged since the last merge whose copies are done: memory stays in a few blocks.

        Each entry is merged once (blocks of about ``_COMPACT_EVERY`` calls), so the work is linear in the epoch.
        """
        done = self._merged
        while done < len(self._pending) and self._pending[done].ready():
            done += 1
        if done - self._merged > 1:  # merged entries hold disjoint streams, so each stream keeps its logging order
            merged = [Entry(ids, values) for ids, values in concat(self._pending[self._merged : done])]
            self._pending[self._merged : done] = merged
            self._merged += len(merged)

    def _collect(self) -> list[Group]:
        """All pending values, one (ids, streams) group per set of streams in logging order; gathered on rank 0."""
        for entry in self._pending:
            entry.wait()
        groups: list[Group] = list(concat(self._pending))
        self._pending, self._merged = [], 0
        return gather_groups(groups, self._group, self.rank) if self.distributed else groups

    def _commit_sharded(self, groups: list[Group], epoch: int | None, step: int | None, steps: int) -> int | None:
        """Rank 0 commits the tick now (every rank's chunks of it are written); then every rank learns the new open
        tick, or that the commit failed, and then deletes its chunks of the tick."""
        assert self._shards is not None
        tick = self._shards.tick
        outcome: int | str | None = None  # what rank 0 tells the others
        error = None
        if self.run is not None:
            try:
                _commit(self.run, groups, epoch, step, steps)
            except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
                error = err
            outcome = tick + 1 if self.run.ticks == tick + 1 else f"{type(error).__name__}: {error}"
        try:
            self._shards.committed(outcome)
        except AdapterError:
            if error is None:
                raise
        if error is not None:
            raise error
        return tick if self.run is not None else None


def _log_groups(run: Run, groups: list[tuple[Any, dict[str, Any]]]) -> None:
    for ids, values in groups:
        run.log(ids, **values)


def _commit(run: Run, groups: list[tuple[Any, dict[str, Any]]], epoch: int | None, step: int | None, steps: int) -> int:
    """Log one tick's groups and commit it (in the writer thread, or in the caller's); a refused tick records nothing."""
    try:
        _log_groups(run, groups)
    except BaseException:
        run.discard()  # the groups logged before the refused one would otherwise join the next tick
        raise
    if step is None:
        step = _committed_column(run, "step", 0) + steps
    return run.end_epoch(epoch=epoch, step=step)


def _wait_before_close(run: Run) -> None:
    """Make ``run.close()`` wait for the commit of the run's recorder first (also via ``with run`` and ledger.close).

    A Run has no close hook (asked of the core); without this, closing the run while the writer thread commits
    would discard the tick.
    """
    if getattr(run.close, "_lossledger_waits", False):
        return
    close = run.close

    def close_after_commit() -> None:
        active = _active(run)
        if active is not None:
            active.wait()
        close()

    close_after_commit._lossledger_waits = True  # type: ignore[attr-defined]
    run.close = close_after_commit  # type: ignore[method-assign]


def _committed_column(run: Run, column: str, default: int) -> int:
    """The last committed value of a tick column (``step``/``epoch``) of ``run``; ``default`` before any tick."""
    # Run has no public accessor for its committed tick rows (asked of the core as Run.last_tick); they are O(T).
    values = run._ticks[column]
    return int(values[-1]) if len(values) else default


def _active(run: Run | None) -> Recorder | None:
    """The open Recorder of ``run``, if any."""
    ref = _ACTIVE.get(run) if run is not None else None
    rec = ref() if ref is not None else None
    return rec if rec is not None and not rec._closed else None


def _recorder_for(target: Run | Recorder | None) -> tuple[Recorder, bool]:
    """The recorder to log through, and whether it was made here (and must be closed here)."""
    if isinstance(target, Recorder):
        return target, False
    active = _active(target)
    if active is not None:
        return active, False
    return Recorder(target, background=False), True
