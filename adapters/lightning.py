"""Lightning adapter: a callback that records the per-sample losses ``training_step`` returns.

The LightningModule returns, besides ``"loss"``, the per-sample losses and the batch's sample ids::

    def training_step(self, batch, batch_idx):
        ids, x, y = batch                                          # e.g. from lossledger.adapters.torch.IndexedDataset
        losses = F.cross_entropy(self(x), y, reduction="none")    # (B,)
        return {"loss": losses.mean(), "per_sample_loss": losses, "ids": ids}

    trainer = L.Trainer(max_epochs=10, callbacks=[LossLedgerCallback(run)])

Lightning detaches only ``outputs["loss"]``; the callback detaches the rest, so no autograd graph is kept.
One tick is committed per training epoch (``on_train_epoch_end``), with ``epoch = trainer.current_epoch`` and
``step = trainer.global_step``; values go through :class:`lossledger.adapters.torch.Recorder` (no host sync per
step; the commit runs in a writer thread and every checkpoint waits for it).

Resuming (``trainer.fit(..., ckpt_path=...)``): the run's ticks continue. At ``on_train_start`` the run's last
committed epoch ``L`` is compared with the epoch the trainer resumes at, ``E``. They agree when ``L == E - 1``
(a fresh fit: no tick and ``E == 0``). Otherwise, with ``on_mismatch="warn"`` (default) a ``LedgerWarning``
says which epochs differ and recording goes on: if the ledger is ahead (``L >= E``, e.g. resuming from an older
checkpoint), the ticks of epochs ``E..L`` stay and the new ticks are appended after them, so those epoch numbers
appear twice in ``ledger.ticks(run)`` (the later tick is the resumed trajectory); if it is behind (``L < E - 1``,
the ledger missed epochs), those epochs stay missing. ``on_mismatch="error"`` raises ``AdapterError`` instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl

import lossledger as ll
from lossledger.errors import LedgerWarning
from lossledger.run import Run

from .torch import AdapterError, Recorder, _committed_column

__all__ = ["LossLedgerCallback"]


class LossLedgerCallback(pl.Callback):
    """Log ``outputs[loss_key]`` of every training batch under the sample ids ``outputs[ids_key]``; one tick per epoch.

    ``run``: the run to write, or a function that opens it (called on global rank 0 only, at ``setup``: use that
    under DDP, where only rank 0 may hold the run; the callback then closes the run at ``teardown``).
    ``streams``: more output keys to record, each in the stream of the same name (a sequence), or mapped to
    stream names (``{"margin": "train_margin"}``); each is (B, ...) per sample. Per-sample losses are stored in
    stream ``"loss"``. ``background``: commit in a writer thread (see ``Recorder``). ``on_mismatch``: what a
    resume does when the run's ticks and the checkpoint's epoch disagree (module docstring).
    """

    def __init__(
        self,
        run: Run | Callable[[], Run],
        *,
        loss_key: str = "per_sample_loss",
        ids_key: str = "ids",
        streams: Sequence[str] | Mapping[str, str] = (),
        background: bool = True,
        on_mismatch: Literal["warn", "error"] = "warn",
    ) -> None:
        if on_mismatch not in ("warn", "error"):
            raise AdapterError(f"on_mismatch must be 'warn' or 'error', got {on_mismatch!r}")
        self._run_or_factory = run
        self.loss_key, self.ids_key = loss_key, ids_key
        self.streams = dict(streams) if isinstance(streams, Mapping) else {key: key for key in streams}
        self.background = background
        self.on_mismatch = on_mismatch
        self.recorder: Recorder | None = None
        self._owns_run = False

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], run: str, /, **kwargs: Any) -> LossLedgerCallback:
        """A callback that opens run ``run`` of the ledger at ``path`` on global rank 0 when ``fit`` starts.

        ``kwargs`` go to ``ledger.run`` (run attributes, ``on_duplicate`` ...) except the callback's own options
        (``loss_key``, ``ids_key``, ``streams``, ``background``, ``on_mismatch``). Unlike a lambda, the opener
        pickles, as ``strategy="ddp_spawn"`` requires.
        """
        own = {k: kwargs.pop(k) for k in ("loss_key", "ids_key", "streams", "background", "on_mismatch") if k in kwargs}
        return cls(_OpenRun(os.fspath(path), run, kwargs), **own)

    @property
    def run(self) -> Run | None:
        """The run being written (``None`` on ranks other than global rank 0, and before ``setup``)."""
        return self.recorder.run if self.recorder is not None else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.recorder is not None:
            return
        run = None
        if trainer.is_global_zero:
            if isinstance(self._run_or_factory, Run):
                run = self._run_or_factory
            else:
                run, self._owns_run = self._run_or_factory(), True
        self.recorder = Recorder(run, background=self.background, distributed=trainer.world_size > 1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run
        if run is None:
            return
        last, resumes = _committed_column(run, "epoch", -1), trainer.current_epoch
        if last == resumes - 1:
            return
        if last >= resumes:
            message = (
                f"run {run.name!r} already has ticks up to epoch {last}, but training starts at epoch {resumes}: "
                f"the ticks of epochs {resumes}..{last} came from training after this checkpoint; the new ticks are "
                "appended after them, so those epochs appear twice in ledger.ticks(run) (the later tick is this "
                "training). Resume from the latest checkpoint, or record into a new run, to avoid that"
            )
        else:
            message = (
                f"run {run.name!r} has ticks up to epoch {last}, but training resumes at epoch {resumes}: epochs "
                f"{last + 1}..{resumes - 1} were trained without being recorded and stay missing"
            )
        if self.on_mismatch == "error":
            raise AdapterError(message + " (on_mismatch='error'; pass on_mismatch='warn' to go on)")
        warnings.warn(message, LedgerWarning, stacklevel=2)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, Mapping) or self.loss_key not in outputs or self.ids_key not in outputs:
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise AdapterError(
                f"LossLedgerCallback needs training_step to return a dict with {self.loss_key!r} ((B,) per-sample "
                f"losses, reduction='none') and {self.ids_key!r} ((B,) sample ids) besides 'loss'; got {got}"
            )
        assert self.recorder is not None
        extra = {stream: outputs[key] for key, stream in self.streams.items()}
        self.recorder.log(outputs[self.ids_key], outputs[self.loss_key], **extra)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.recorder is not None
        self.recorder.end_epoch(epoch=trainer.current_epoch, step=trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint must never be ahead of the ledger: wait until the epoch's tick is committed.
        if self.recorder is not None:
            self.recorder.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown hooks when fit fails: release the run here; the epoch cut short is not committed.
        if self.recorder is not None:
            self.recorder._discard()
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.recorder is None:
            return
        rec, self.recorder = self.recorder, None
        try:
            rec.close()  # waits for the last commit
        finally:
            if self._owns_run and rec.run is not None:
                rec.run.close()


class _OpenRun:
    """Opens a run of a ledger on disk when called (a picklable run factory)."""

    def __init__(self, path: str, name: str, kwargs: dict[str, Any]) -> None:
        self.path, self.name, self.kwargs = path, name, kwargs

    def __call__(self) -> Run:
        return ll.open(self.path, "a").run(self.name, **self.kwargs)
