"""Keras 3 adapter: per-sample losses of a probe set at the end of every epoch (any Keras backend).

This is the protocol of the action-score paper: after each training epoch, evaluate the per-sample losses
of a probe set (the test split, and optionally the training set) with the current weights, and commit them
as one tick. Unlike the paper's own Keras code, the last batch is never padded (no rows for padded zero
images are stored), and epochs that do not run (early stopping) are simply not committed, never stored as 0.

    import keras, lossledger as ll
    from lossledger.adapters.keras import LossLedgerCallback

    ledger = ll.create("digits.ll", sample_ids=ids, labels=y)
    with ledger.run("mlp-s0") as run:
        model.fit(x_train, y_train, epochs=10,
                  callbacks=[LossLedgerCallback(run, probe=(x_test, y_test, ids_test))])
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops, tree

from lossledger.errors import ShapeMismatchError

if TYPE_CHECKING:
    from lossledger.run import Run

__all__ = ["LossLedgerCallback", "probe_losses"]

Probe = tuple[Any, Any, Any]  # (x, y, ids): inputs, targets, (N,) sample ids, all with N rows
StreamFn = Callable[[Any, Any], Any]  # (y_true batch, y_pred batch) -> (B, ...) values


def probe_losses(
    model: keras.Model,
    x: Any,
    y: Any,
    *,
    loss: Any = None,
    loss_weights: Any = None,
    streams: Mapping[str, StreamFn] | None = None,
    batch_size: int = 256,
    per_element: bool = False,
) -> dict[str, np.ndarray]:
    """Per-sample losses of ``model`` on ``(x, y)``, evaluated in batches with the current weights.

    ``x``, ``y``: arrays with N rows, or lists/dicts of them for multi-input/-output models. Batches are
    slices of at most ``batch_size`` rows; the last one is shorter, never padded. ``loss``: a Keras loss
    (name, function or ``keras.losses.Loss``), or a list/dict of them per output; default: the loss the
    model was compiled with. It is applied without reduction (``Loss.call``), so the mean of the result over
    the samples is the model's loss on ``(x, y)`` (without regularisation terms and sample weights).

    Returns float32 arrays of N rows in probe order: ``"loss"`` for a single-output model; for several
    outputs ``"loss_<output>"`` per output and ``"loss"`` = Σ weight × per-output loss, with
    ``loss_weights`` (default: those given to ``compile``). Losses with more than one value per sample
    (per timestep, per pixel) are averaged per sample, or kept whole with ``per_element=True`` (then no
    total is formed). ``streams``: extra named values, ``fn(y_true, y_pred) -> (B, ...)`` on each batch
    (numpy inputs, structured like ``y`` and the model output), e.g. loss components or correctness.
    Memory: one batch of predictions plus the N-row results.
    """
    spec = model.loss if loss is None else loss
    if spec is None:
        raise ShapeMismatchError(
            "the model was compiled without a loss; pass loss=... (e.g. 'sparse_categorical_crossentropy')"
        )
    if batch_size < 1:
        raise ShapeMismatchError(f"batch_size must be at least 1, got {batch_size}")
    weights = _compiled_loss_weights(model) if loss_weights is None else loss_weights
    n = _rows("x", x)
    if _rows("y", y) != n:
        raise ShapeMismatchError(f"x has {n} rows but y has {_rows('y', y)}; pass one target per input row")
    parts: dict[str, list[np.ndarray]] = {}
    for lo in range(0, n, batch_size):
        rows = slice(lo, lo + batch_size)
        xb, yb = (tree.map_structure(lambda a, rows=rows: a[rows], v) for v in (x, y))
        pred = model.predict_on_batch(xb)
        for name, values in _batch_values(model, yb, pred, spec, weights, streams or {}, per_element).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


class LossLedgerCallback(keras.callbacks.Callback):
    """Logs per-sample probe losses into ``run`` at each ``on_epoch_end`` and commits the tick.

    ``probe=(x, y, ids)``: inputs, targets and (N,) sample ids (ledger ids, any order); ``train_probe``:
    optionally a second one, e.g. the training set (its ids must differ from the probe's: they share
    streams). ``loss``, ``loss_weights``, ``streams``, ``batch_size``, ``per_element``: as in
    :func:`probe_losses`. The tick records the Keras epoch index (so ``fit(initial_epoch=k)`` continues a
    resumed run) and the optimizer's step count. ``commit=False`` only logs, for when something else
    commits the tick.

    Cost: one forward pass over each probe per epoch; synchronous (the next epoch starts after the commit).
    """

    def __init__(
        self,
        run: Run,
        probe: Probe,
        *,
        loss: Any = None,
        loss_weights: Any = None,
        train_probe: Probe | None = None,
        streams: Mapping[str, StreamFn] | None = None,
        batch_size: int = 256,
        per_element: bool = False,
        commit: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ShapeMismatchError(f"batch_size must be at least 1, got {batch_size}")
        self.run = run
        self.probes = [_check_probe("probe", probe)]
        if train_probe is not None:
            self.probes.append(_check_probe("train_probe", train_probe))
        self.loss, self.loss_weights, self.streams = loss, loss_weights, dict(streams or {})
        self.batch_size, self.per_element, self.commit = batch_size, per_element, commit

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for x, y, ids in self.probes:
            values = probe_losses(
                self.model, x, y, loss=self.loss, loss_weights=self.loss_weights, streams=self.streams,
                batch_size=self.batch_size, per_element=self.per_element,
            )
            self.run.log(ids, **values)
        if self.commit:
            self.run.end_epoch(epoch=epoch, step=_optimizer_steps(self.model))


# --- helpers ---------------------------------------------------------------------------------------------


def _rows(what: str, data: Any) -> int:
    counts = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in tree.flatten(data)}
    if len(counts) != 1 or -1 in counts:
        raise ShapeMismatchError(
            f"{what} must be an array with one row per sample (or a list/dict of such arrays of equal length); "
            f"got row counts {sorted(counts)}"
        )
    return counts.pop()


def _check_probe(what: str, probe: Probe) -> Probe:
    if not isinstance(probe, (tuple, list)) or len(probe) != 3:
        raise ShapeMismatchError(f"{what} must be a tuple (x, y, ids), got {type(probe).__name__}")
    x, y, ids = probe
    ids = np.asarray(ids)
    n = _rows(f"{what} x", x)
    if ids.shape != (n,) or _rows(f"{what} y", y) != n:
        raise ShapeMismatchError(
            f"{what}: x has {n} rows, y has {_rows(f'{what} y', y)} and ids has shape {ids.shape}; pass (x, y, ids) "
            "with one target and one sample id per input row"
        )
    return x, y, ids


def _compiled_loss_weights(model: keras.Model) -> Any:
    # Keras keeps the compile() arguments in _compile_config; no public accessor returns them unserialised.
    config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
    return config.get("loss_weights")


def _optimizer_steps(model: keras.Model) -> int | None:
    optimizer = getattr(model, "optimizer", None)
    return None if optimizer is None else int(ops.convert_to_numpy(optimizer.iterations))


def _named(model: keras.Model, pred: Any) -> list[tuple[str, Any]]:
    """The model's outputs as (name, array) pairs: dict keys, else ``model.output_names``, else positions."""
    if isinstance(pred, Mapping):
        return list(pred.items())
    if isinstance(pred, (list, tuple)):
        names = list(getattr(model, "output_names", None) or [])
        if len(names) != len(pred):
            names = [f"output_{i}" for i in range(len(pred))]
        return list(zip(names, pred))
    return [("", pred)]


def _per_output(spec: Any, names: list[str], what: str) -> list[Any]:
    """Spread a loss (or weight) spec over the outputs: one for all, a list by position, a dict by name."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(names))
        if unknown and names != [""]:
            raise ShapeMismatchError(f"{what} names outputs {unknown} that the model does not have; outputs: {names}")
        return [spec.get(name) for name in names] if names != [""] else [next(iter(spec.values()), None)]
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(names):
            raise ShapeMismatchError(f"{what} has {len(spec)} entries for {len(names)} model outputs {names}")
        return list(spec)
    return [spec] * len(names)


def _targets(y: Any, names: list[str]) -> list[Any]:
    if isinstance(y, Mapping):
        missing = [name for name in names if name not in y]
        if missing:
            raise ShapeMismatchError(f"y has no targets for outputs {missing}; its keys are {sorted(y)}")
        return [y[name] for name in names]
    if isinstance(y, (list, tuple)):  # a structure of arrays (a list of numbers is refused by _rows before)
        if len(y) != len(names):
            outputs = "a single-output model" if names == [""] else f"{len(names)} model outputs {names}"
            raise ShapeMismatchError(f"y has {len(y)} targets for {outputs}; pass one target per output")
        return list(y)
    if len(names) > 1:
        raise ShapeMismatchError(f"the model has outputs {names}; pass y as a list or dict with one target each")
    return [y]


def _unreduced(loss: Any, y_true: Any, y_pred: Any) -> Any:
    """The loss before any reduction over the batch (what ``Loss.__call__`` computes before reducing)."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        dtype = loss.dtype
        return loss.call(ops.convert_to_tensor(y_true, dtype=dtype), ops.convert_to_tensor(y_pred, dtype=dtype))
    if callable(loss):
        floatx = keras.backend.floatx()
        return loss(ops.convert_to_tensor(y_true, dtype=floatx), ops.convert_to_tensor(y_pred, dtype=floatx))
    raise ShapeMismatchError(f"loss must be a Keras loss name, function or keras.losses.Loss, got {loss!r}")


def _host(values: Any, what: str, batch: int, per_element: bool) -> np.ndarray:
    host = np.asarray(ops.convert_to_numpy(values))
    if host.ndim == 0 or host.shape[0] != batch:
        raise ShapeMismatchError(
            f"{what} gave shape {host.shape} for a batch of {batch}; it must return one value per sample (a "
            "loss reduced over the batch cannot be used: pass the loss function or a Loss with reduction=None)"
        )
    if host.ndim > 1 and not per_element:
        host = host.reshape(batch, -1).mean(axis=1)
    return host.astype(np.float32, copy=False) if host.dtype.kind == "f" else host


def _stream_name(output: str) -> str:
    name = "loss_" + re.sub(r"\W", "_", output)
    return name[:64]


def _batch_values(
    model: keras.Model, y: Any, pred: Any, spec: Any, weights: Any, streams: Mapping[str, StreamFn],
    per_element: bool,
) -> dict[str, np.ndarray]:
    outputs = _named(model, pred)
    names = [name for name, _ in outputs]
    losses = _per_output(spec, names, "loss")
    factors = [1.0 if w is None else float(w) for w in _per_output(weights, names, "loss_weights")]
    batch = _rows("y", y)
    result: dict[str, np.ndarray] = {}
    total: np.ndarray | None = None
    for (name, y_pred), y_true, loss, factor in zip(outputs, _targets(y, names), losses, factors):
        if loss is None:
            continue  # an output trained without a loss (a dict loss that leaves it out)
        values = _host(_unreduced(loss, y_true, y_pred), f"the loss of output {name or 0!r}", batch, per_element)
        if len(outputs) == 1:
            result["loss"] = values
            continue
        result[_stream_name(name)] = values
        if not per_element:
            total = factor * values if total is None else total + factor * values
    if total is not None:
        result["loss"] = total
    for stream, fn in streams.items():
        if stream in result:
            raise ShapeMismatchError(f"stream name {stream!r} is taken by a loss stream; choose another name")
        result[stream] = _host(fn(y, pred), f"stream {stream!r}", batch, per_element=True)
    return result
