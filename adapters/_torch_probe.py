"""The probe protocol of the PyTorch adapter: per-sample losses (and margins, ...) of a probe set, as one tick.

:func:`evaluate` is exported by :mod:`lossledger.adapters.torch`, whose :class:`Recorder` it logs through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from lossledger.errors import AdapterError, InvalidDTypeError, ShapeMismatchError
from lossledger.run import Run

if TYPE_CHECKING:
    from .torch import Recorder


def evaluate(
    target: Run | Recorder | None,
    model: torch.nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    prefix: str = "",
    margin: bool = False,
    correct: bool = False,
    prob: bool = False,
    probs: bool = False,
    embedding: str | None = None,
    device: torch.device | str | None = None,
    batch: Callable[[Any], tuple[Any, Any, Any]] | None = None,
    commit: bool = True,
    epoch: int | None = None,
) -> int | None:
    """Per-sample losses of a probe set under ``torch.no_grad()`` (model in eval mode), logged as one tick.

    ``loader`` yields ``(ids, inputs, targets)`` (as from :class:`IndexedDataset`; ``batch`` maps another layout to
    that); inputs and targets are moved to ``device`` (default: the model's). ``loss_fn(logits, targets)`` must
    return (B,) (``reduction="none"``). Streams, each (B,) float32 unless said: ``{prefix}loss``; with
    ``margin``, logit of the true class minus the largest other logit (raw logits, as in AUM); ``correct``
    (1.0/0.0, argmax); ``prob``, softmax probability of the true class; ``probs``, the whole softmax (B, classes)
(for ``ll.analysis.entropy_vs_action``); ``embedding="layer.name"``, that module's
    output flattened to (B, D), captured by a forward hook. ``target`` is the run, or the training ``Recorder`` so
    that the probe joins its tick; probe batches do not count as optimizer steps. ``commit=False`` logs without
    committing. Returns the tick index when committed (``None`` on ranks that do not write).

    >>> evaluate(rec, model, DataLoader(IndexedDataset(test_set), batch_size=256), F.cross_entropy, margin=True)
    """
    if getattr(loss_fn, "reduction", "none") != "none":
        raise ShapeMismatchError(
            f"loss_fn has reduction={loss_fn.reduction!r}; evaluate needs one loss per sample: pass "  # type: ignore[attr-defined]
            f"{type(loss_fn).__name__}(reduction='none')"
        )
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = dict(model.named_modules())
    if embedding is not None and embedding not in modules:
        names = [n for n in modules if n][:8]
        raise AdapterError(f"model has no layer {embedding!r}; its named layers include {names}")
    captured: list[torch.Tensor] = []
    hook = None
    from .torch import _recorder_for  # here: the torch module imports this one

    rec, owned = _recorder_for(target)
    was_training = model.training
    try:
        if embedding is not None:
            hook = modules[embedding].register_forward_hook(lambda _m, _i, out: captured.append(_first(out)))
        model.eval()
        with torch.no_grad():
            for item in loader:
                ids, inputs, targets = batch(item) if batch is not None else item
                inputs, targets = _move(inputs, device), _move(targets, device)
                captured.clear()
                logits = model(inputs)
                if not isinstance(logits, torch.Tensor):
                    raise InvalidDTypeError(
                        f"model returned {type(logits).__name__}, not a logits tensor; wrap the model so that it "
                        "returns (B, classes) logits"
                    )
                streams = {f"{prefix}loss": loss_fn(logits, targets)}
                streams.update(_class_streams(logits, targets, prefix, margin=margin, correct=correct, prob=prob))
                if probs:
                    streams[f"{prefix}probs"] = _softmax(logits)
                if embedding is not None:
                    streams[f"{prefix}embedding"] = captured[-1].reshape(captured[-1].shape[0], -1)
                rec._add(ids, streams, count_step=False)
        if not commit:
            rec.flush()
            return None
        return rec.end_epoch(epoch=epoch)
    except BaseException:
        if owned:
            rec._discard()  # the error is what the caller needs to see, not a warning about discarded values
        raise
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
        if owned:
            rec.close()


def _class_streams(
    logits: torch.Tensor, targets: Any, prefix: str, *, margin: bool, correct: bool, prob: bool
) -> dict[str, torch.Tensor]:
    """Per-sample margin, correct and prob streams of (B, classes) logits and (B,) class targets, float32."""
    if not (margin or correct or prob):
        return {}
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or logits.ndim != 2:
        raise ShapeMismatchError(
            "margin, correct and prob need (B, classes) logits and (B,) integer class targets; got logits of shape "
            f"{tuple(logits.shape)} and targets {type(targets).__name__}"
        )
    logits = logits.float()
    target = targets.long()[:, None]
    out = {}
    if margin:
        others = logits.scatter(1, target, float("-inf"))
        out[f"{prefix}margin"] = logits.gather(1, target)[:, 0] - others.max(1).values
    if correct:
        out[f"{prefix}correct"] = (logits.argmax(1) == target[:, 0]).float()
    if prob:
        out[f"{prefix}prob"] = _softmax(logits).gather(1, target)[:, 0]
    return out


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of (B, classes) logits, float32."""
    if logits.ndim != 2:
        raise ShapeMismatchError(f"probs needs (B, classes) logits; got logits of shape {tuple(logits.shape)}")
    return torch.softmax(logits.float(), 1)


def _first(out: Any) -> torch.Tensor:
    """A module's output tensor (the first element of a tuple output)."""
    return out[0] if isinstance(out, tuple | list) else out


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj
