"""``lossledger demo``: train a real model on digits with flipped labels, log every epoch, find the flips.

Data: scikit-learn's bundled 8×8 digits (1,797 images, no download), or a user ``.npz`` with ``x`` (n, ...)
and ``y`` (n,) integer labels. 80% train / 20% validation (seeded); ``noise`` of the training labels are
flipped to another class (seeded). The model is a PyTorch MLP (or scikit-learn's ``MLPClassifier`` trained
with ``partial_fit`` when torch is not installed). After every epoch every sample, train and validation, is
evaluated (the paper's probe protocol; for torch by ``lossledger.adapters.torch.evaluate``) and its loss,
p(label), logit margin, correctness and class probabilities (``probs``, element shape (n_classes,)) are
logged; after the last epoch also its ``embedding``, the output of the last hidden layer (256,), the feature
space of :func:`lossledger.analysis.neighbours` (once: 1.8 MB a tick for digits, 100x that for every epoch).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ShapeMismatchError
from .ledger import Ledger, create
from .run import Run

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DemoData:
    """Features ``x`` (n, d) float32 in [0, 1], assigned (possibly flipped) ``labels`` (n,), the ``true``
    labels, ``flipped`` (n,) bool, ``split`` (n,) "train"/"val", and ``classes``."""

    x: np.ndarray
    labels: np.ndarray
    true: np.ndarray
    flipped: np.ndarray
    split: np.ndarray
    classes: list[str]


def load_data(dataset: str | Path | None = None, *, noise: float = 0.2, seed: int = 0) -> DemoData:
    """Digits (default) or a user ``.npz`` (keys ``x``, ``y``), split 80/20 and with ``noise`` labels flipped."""
    if not 0.0 <= noise < 1.0:
        raise ShapeMismatchError(f"noise must be a fraction in [0, 1), got {noise}")
    if dataset is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
    else:
        with np.load(dataset) as npz:
            if "x" not in npz or "y" not in npz:
                raise ShapeMismatchError(f"{dataset} must hold arrays 'x' (n, ...) and 'y' (n,) integer labels")
            x, y = npz["x"], npz["y"]
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    y = np.asarray(y).astype(np.int64)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ShapeMismatchError(f"x has {x.shape[0]} rows but y has shape {y.shape}; give one label per row")
    span = x.max(axis=0) - x.min(axis=0)
    x = (x - x.min(axis=0)) / np.where(span > 0, span, 1.0)
    rng = np.random.default_rng(seed)
    n, n_classes = len(y), int(y.max()) + 1
    split = np.where(rng.permutation(n) < round(0.8 * n), "train", "val")
    flipped = (split == "train") & (rng.random(n) < noise)
    labels = y.copy()
    labels[flipped] = (y[flipped] + rng.integers(1, n_classes, int(flipped.sum()))) % n_classes
    return DemoData(x, labels, y, flipped, split, [str(c) for c in range(n_classes)])


def train(
    data: DemoData, path: str | Path, *, epochs: int = 30, seed: int = 0, run: str = "mlp-s0",
    progress: Progress | None = None, overwrite: bool = True, model: Literal["auto", "torch", "sklearn"] = "auto",
) -> Ledger:
    """Create a ledger at ``path`` and log ``epochs`` epochs of a model trained on the train split.

    Streams of run ``run``, every sample every epoch: ``loss`` (cross-entropy, nats), ``prob`` (p(label)),
    ``margin``, ``correct`` (0/1), ``probs`` (n_classes,); at the last epoch only: ``embedding`` (256,), the
    last hidden layer (NaN at earlier ticks). A tick's ``step`` is the number of optimizer steps so far.
    ``model``: ``"torch"`` (the adapter's ``evaluate`` logs the probe), ``"sklearn"``, or ``"auto"`` (torch
    when installed)."""
    ledger = create(path, n_samples=len(data.labels), labels=data.labels, classes=data.classes,
                    splits=list(data.split), overwrite=overwrite)
    use_torch = model == "torch" or (model == "auto" and _has_torch())
    learner = _TorchMLP(data, seed) if use_torch else _SklearnMLP(data, seed)
    flipped_ids = np.flatnonzero(data.flipped).tolist()
    with learner.single_thread(), ledger.run(run, model=learner.name, epochs=epochs, seed=seed,
                                             flipped=flipped_ids) as writer:
        for epoch in range(epochs):
            learner.fit_epoch()
            learner.probe(writer, embedding=epoch == epochs - 1)
            if progress is not None:
                progress(epoch + 1, epochs)
    return ledger


def _probe_streams(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample loss (cross-entropy), prob (p(label)), margin (raw logits) and correct, from (n, C) logits."""
    z = logits.astype(np.float64)
    rows = np.arange(len(labels))
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    others = z.copy()
    others[rows, labels] = -np.inf
    return {
        "loss": -log_p[rows, labels],
        "prob": np.exp(log_p[rows, labels]),
        "margin": z[rows, labels] - others.max(axis=1),
        "correct": z.argmax(axis=1) == labels,
    }


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class _TorchMLP:
    """A 2-hidden-layer MLP (256 units) trained with Adam, minibatches of 64, on the train split."""

    name = "torch-mlp-256x2"

    def __init__(self, data: DemoData, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self._torch = torch
        self._x = torch.from_numpy(data.x)
        self._y = torch.from_numpy(data.labels)
        self._train = np.flatnonzero(data.split == "train")
        self._rng = np.random.default_rng(seed)
        width, n_classes = data.x.shape[1], len(data.classes)
        self._model = torch.nn.Sequential(
            torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, n_classes),
        )
        self._opt = torch.optim.Adam(self._model.parameters(), lr=1e-3)
        self.steps = 0  # optimizer steps so far

    @contextmanager
    def single_thread(self) -> Iterator[None]:
        """One intra-op thread while training: ~10x faster for a model this small on a busy 2-core machine."""
        threads = self._torch.get_num_threads()
        self._torch.set_num_threads(1)
        try:
            yield
        finally:
            self._torch.set_num_threads(threads)

    def fit_epoch(self) -> None:
        torch = self._torch
        self._model.train()
        order = self._rng.permutation(self._train)
        for lo in range(0, order.size, 64):
            batch = torch.from_numpy(order[lo : lo + 64])
            loss = torch.nn.functional.cross_entropy(self._model(self._x[batch]), self._y[batch])
            self._opt.zero_grad()
            loss.backward()
            self._opt.step()
            self.steps += 1

    def probe(self, run: Run, *, embedding: bool) -> None:
        """Log every sample's loss, prob, margin, correct and probs through the adapter's ``evaluate``, with
        ``embedding`` also the last hidden layer's output (``evaluate``'s forward hook); commit the tick."""
        from lossledger.adapters.torch import IndexedDataset, evaluate

        torch = self._torch
        loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(self._x, self._y)),
                                             batch_size=1024)  # in row order: the ids are 0..n-1
        evaluate(run, self._model, loader, torch.nn.CrossEntropyLoss(reduction="none"), margin=True, correct=True,
                 prob=True, probs=True, embedding="3" if embedding else None, commit=False)
        run.end_epoch(step=self.steps)


class _SklearnMLP:
    """scikit-learn's MLPClassifier (256 units), one ``partial_fit`` pass over the train split per epoch."""

    name = "sklearn-mlp-256"

    def __init__(self, data: DemoData, seed: int) -> None:
        from sklearn.neural_network import MLPClassifier

        self._data = data
        self._train = np.flatnonzero(data.split == "train")
        self._classes = np.arange(len(data.classes))
        self._model = MLPClassifier(hidden_layer_sizes=(256,), batch_size=64, random_state=seed)
        self.steps = 0  # optimizer steps so far

    def single_thread(self) -> AbstractContextManager[None]:
        return nullcontext()  # MLPClassifier's matrix products are small; nothing to pin

    def fit_epoch(self) -> None:
        self._model.partial_fit(self._data.x[self._train], self._data.labels[self._train], classes=self._classes)
        self.steps += -(-self._train.size // 64)  # one pass of minibatches of 64

    def probe(self, run: Run, *, embedding: bool) -> None:
        """Log every sample's loss, prob, margin (of log-probabilities), correct and probs (``predict_proba``),
        with ``embedding`` also the hidden layer's ReLU output; commit the tick."""
        x = self._data.x
        probs = self._model.predict_proba(x)
        # log-probabilities are logits up to a per-row constant: the margin is the log-odds margin.
        streams = _probe_streams(np.log(np.clip(probs, 1e-12, 1.0)), self._data.labels)
        streams["probs"] = probs
        if embedding:
            streams["embedding"] = np.maximum(x @ self._model.coefs_[0] + self._model.intercepts_[0], 0.0)
        run.log(np.arange(len(self._data.labels)), **streams)
        run.end_epoch(step=self.steps)


def progress_bar(stream: Any = None, label: str = "training") -> Progress | None:
    """A one-line progress bar on a terminal (None when ``stream`` is not a tty, e.g. a pipe or a log file)."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        return None
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        filled = int(30 * done / max(total, 1))
        out.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {time.monotonic() - start:.0f}s")
        if done >= total:
            out.write("\n")
        out.flush()

    return show
