"""Hugging Face Trainer adapter: every training sample's loss, as the Trainer computes it, at every epoch.

    from lossledger.adapters.transformers import IndexedDataset, LossLedgerTrainer

    with ledger.run("bert-s0") as run:
        trainer = LossLedgerTrainer(model=model, args=args, train_dataset=IndexedDataset(train_ds), run=run)
        trainer.train()

The Trainer computes and back-propagates its loss as usual; the per-sample losses are computed from the
same forward pass (the model's logits, no second pass), detached, and kept on the device until the epoch
ends, so logging adds no host sync per step: one copy to the host per epoch (N float32 values and int64
ids on the device at most). At the end of each epoch they are logged with the batch's sample ids and the
tick is committed with the epoch index and the Trainer's global step, before any checkpoint of that epoch
is saved.

Batches carry their sample ids under ``id_key`` (default ``"sample_id"``): wrap the dataset in
:class:`IndexedDataset`, or add the column yourself. The id column is kept by ``remove_unused_columns``
and removed before the model's forward. Several processes (DDP): every rank passes its Trainer the same
arguments except ``run``, which only rank 0 holds (``run=None`` elsewhere); the losses are gathered to rank 0
once per epoch, and samples the distributed sampler repeated to even out the ranks are stored once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lossledger.errors import ShapeMismatchError

if TYPE_CHECKING:
    from lossledger.run import Run

    _TrainerBase = Trainer  # the mixin is used with a Trainer; lets type checkers see its members
else:
    _TrainerBase = object

__all__ = ["IndexedDataset", "LossLedgerMixin", "LossLedgerTrainer", "classification_losses", "token_losses"]

PerSampleLoss = Callable[[Any, torch.Tensor], torch.Tensor]  # (model outputs, labels) -> (B,) losses
LossKind = Literal["auto", "classification", "token", "causal_lm"]


class IndexedDataset(Dataset):
    """A dataset of dict items whose items also carry their sample id under ``key``.

    ``ids``: (len(dataset),) ledger ids; default: the item's index. ``dataset[i]`` must be a dict (the
    format the Trainer's collators take); ``IndexedDataset(ds)[i] == {**ds[i], key: ids[i]}``.
    """

    def __init__(self, dataset: Any, ids: Sequence[int] | np.ndarray | None = None, *, key: str = "sample_id"):
        self.dataset, self.key = dataset, key
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        if self.ids is not None and self.ids.shape != (len(dataset),):
            raise ShapeMismatchError(
                f"ids has shape {self.ids.shape} for a dataset of {len(dataset)} items; pass one id per item"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise ShapeMismatchError(
                f"IndexedDataset needs dict items (as Trainer collators do), got {type(item).__name__}"
            )
        return {**item, self.key: int(index if self.ids is None else self.ids[index])}


def classification_losses(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None = None
) -> torch.Tensor:
    """(B,) float32 losses of a sequence classification head, as ``*ForSequenceClassification`` computes them.

    ``problem_type`` as in the model config; ``None`` infers it like Transformers does: 1 label means
    regression (squared error), integer labels single-label cross-entropy, else multi-label BCE (mean
    over labels).
    """
    logits = logits.float()
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return (logits - labels.float().reshape(logits.shape)).pow(2).reshape(len(logits), -1).mean(1)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").reshape(len(logits), -1).mean(1)


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, ignore_index: int = -100
) -> torch.Tensor:
    """(B,) float32 mean cross-entropy over each sequence's labelled tokens; NaN where a sequence has none.

    ``logits`` (B, T, V), ``labels`` (B, T) with ``ignore_index`` for unlabelled tokens. ``shift=True`` for
    causal language models (token t predicts label t + 1, as their loss does).
    """
    logits = logits.float()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(labels.shape)
    counted = (labels != ignore_index).sum(dim=1)
    return per_token.sum(dim=1) / counted  # 0 / 0 = NaN: dropped before logging, never stored as 0


class LossLedgerMixin(_TrainerBase):
    """Adds per-sample loss logging to a ``transformers.Trainer`` subclass: ``class T(LossLedgerMixin, X)``.

    Keyword arguments (the others go to the Trainer):

    - ``run``: the :class:`lossledger.Run` to write (``None`` on DDP ranks other than 0).
    - ``id_key``: the batch key holding the sample ids.
    - ``per_sample_loss``: ``"auto"`` (2-D logits: :func:`classification_losses`; 3-D logits:
      :func:`token_losses`, shifted for the model classes Transformers treats as causal LMs), ``"classification"``,
      ``"token"``, ``"causal_lm"``, or ``fn(outputs, labels) -> (B,)``. Label smoothing is not applied.
    - ``stream``: stream name (default ``"loss"``).
    - ``log_eval``: also log the per-sample losses of the evaluation run after each epoch (needs
      ``eval_strategy="epoch"``; eval ids must differ from training ids); the tick is then committed after
      that evaluation.
    """

    def __init__(
        self,
        *args: Any,
        run: Run | None,
        id_key: str = "sample_id",
        per_sample_loss: LossKind | PerSampleLoss = "auto",
        stream: str = "loss",
        log_eval: bool = False,
        **kwargs: Any,
    ) -> None:
        self.ledger_run, self.id_key, self.stream = run, id_key, stream
        self.per_sample_loss, self.log_eval = per_sample_loss, log_eval
        self._ledger_ids: list[torch.Tensor] = []
        self._ledger_losses: list[torch.Tensor] = []
        self._ledger_eval_open = False  # an evaluation that belongs to the pending tick may log
        self._ledger_pending: tuple[int, int] | None = None  # (epoch, step) of an epoch ended, not committed
        self._ledger_epoch = 0
        self._ledger_batch_ids: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if log_eval and str(getattr(self.args.eval_strategy, "value", self.args.eval_strategy)) != "epoch":
            raise ShapeMismatchError(
                f"log_eval=True needs TrainingArguments(eval_strategy='epoch'), got {self.args.eval_strategy!r}: "
                "each evaluation must belong to exactly one epoch's tick"
            )
        self.add_callback(_LedgerCallback(self))

    # --- Trainer hooks ----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        # The id column must survive remove_unused_columns, which keeps only the forward's arguments.
        super()._set_signature_columns_if_needed()
        columns: list[str] = list(self._signature_columns or [])
        if self.id_key not in columns:
            self._signature_columns = [*columns, self.id_key]  # type: ignore[assignment]

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        inputs = dict(inputs)
        self._ledger_batch_ids = inputs.pop(self.id_key, None)  # for compute_loss; never passed to forward
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._ledger_batch_ids = None

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        ids = inputs.pop(self.id_key, None)
        if ids is None:
            ids = self._ledger_batch_ids
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training or (self.log_eval and self._ledger_eval_open):
            if ids is None:
                raise ShapeMismatchError(
                    f"the batch has no {self.id_key!r} sample ids; wrap the dataset in "
                    "lossledger.adapters.transformers.IndexedDataset, or add the column (id_key=...)"
                )
            if labels is None:
                raise ShapeMismatchError("the batch has no 'labels'; per-sample losses need the labels")
            with torch.no_grad():
                values = self._per_sample(model, outputs, labels)
            if values.shape != (len(ids),):
                raise ShapeMismatchError(
                    f"per_sample_loss returned shape {tuple(values.shape)} for {len(ids)} samples; return (B,)"
                )
            self._ledger_ids.append(torch.as_tensor(ids).detach().reshape(-1))
            self._ledger_losses.append(values.detach().float())
        return (loss, outputs) if return_outputs else loss

    # --- internals --------------------------------------------------------------------------------------
    def _per_sample(self, model: torch.nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        kind = self.per_sample_loss
        if callable(kind):
            return kind(outputs, labels)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        if kind == "auto":
            kind = "classification" if logits.ndim == 2 else "token"
            name = self.accelerator.unwrap_model(model)._get_name()  # type: ignore[attr-defined]
            if kind == "token" and name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                kind = "causal_lm"
        if kind == "classification":
            config = getattr(self.accelerator.unwrap_model(model), "config", None)  # type: ignore[attr-defined]
            return classification_losses(logits, labels, getattr(config, "problem_type", None))
        if kind in ("token", "causal_lm"):
            return token_losses(logits, labels, shift=kind == "causal_lm")
        raise ShapeMismatchError(
            f"per_sample_loss must be 'auto', 'classification', 'token', 'causal_lm' or a function, got {kind!r}"
        )

    def _ledger_commit(self) -> None:
        """Hand the epoch's values to the run (gathered to rank 0 first) and commit the pending tick."""
        if self._ledger_pending is None:
            return
        epoch, step = self._ledger_pending
        self._ledger_pending, self._ledger_eval_open = None, False
        ids = torch.cat(self._ledger_ids) if self._ledger_ids else torch.zeros(0, dtype=torch.long)
        losses = torch.cat(self._ledger_losses) if self._ledger_losses else torch.zeros(0)
        self._ledger_ids, self._ledger_losses = [], []
        host_ids, host_losses = ids.cpu().numpy().astype(np.int64), losses.cpu().numpy()  # one sync per epoch
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (host_ids, host_losses))
            host_ids = np.concatenate([g[0] for g in gathered])
            host_losses = np.concatenate([g[1] for g in gathered])
            # Distributed samplers repeat a few samples so every rank gets equal batches: keep the first.
            host_ids, first = np.unique(host_ids, return_index=True)
            host_losses = host_losses[first]
        if self.ledger_run is None:
            return
        labelled = ~np.isnan(host_losses)  # sequences without a labelled token have no loss: not logged
        if labelled.any():
            self.ledger_run.log(host_ids[labelled], **{self.stream: host_losses[labelled]})
        self.ledger_run.end_epoch(epoch=epoch, step=step)


class LossLedgerTrainer(LossLedgerMixin, Trainer):
    """``transformers.Trainer`` that logs every training sample's loss per epoch; see :class:`LossLedgerMixin`."""


class _LedgerCallback(TrainerCallback):
    """Commits ticks at the right moments of the Trainer's loop (after the epoch, or after its evaluation)."""

    def __init__(self, trainer: LossLedgerMixin) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._ledger_commit()  # an epoch whose evaluation did not run
        # state.epoch is epoch + fraction done (exact at boundaries; fractional when resumed mid-epoch).
        self.trainer._ledger_epoch = math.floor(state.epoch + 1e-6)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer._ledger_pending = (trainer._ledger_epoch, int(state.global_step))
        if trainer.log_eval and control.should_evaluate:
            trainer._ledger_eval_open = True  # the evaluation right after this epoch joins its tick
        else:
            trainer._ledger_commit()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._ledger_eval_open:
            self.trainer._ledger_commit()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._ledger_commit()
