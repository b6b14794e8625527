"""Ledgers the analysis tests build from a plain loss matrix (imported by the test modules beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import lossledger as ll


def ledger_from_losses(path: Path, losses: np.ndarray, **samples: Any) -> ll.Ledger:
    """A ledger at ``path`` (replaced if there) whose run "r" holds ``losses`` (T, N), one tick per row; NaN
    entries are not logged. ``samples``: ``labels=``, ``splits=`` ... as for ``ll.create``."""
    ledger = ll.create(path, n_samples=losses.shape[1], overwrite=True, **samples)
    with ledger.run("r") as run:
        for row in losses:
            ids = np.flatnonzero(~np.isnan(row))
            run.log(ids, loss=row[ids])
            run.end_epoch()
    return ledger


def sgd_digits_ledger(path: Path, epochs: int, *, splits: bool = False) -> tuple[ll.Ledger, Any]:
    """The demo's digits with 20% of the train labels flipped (seed 0), and a ledger at ``path`` whose run "sgd"
    holds the log-loss of every sample after each of ``epochs`` passes of scikit-learn's SGD logistic
    regression over the train split (``splits``: store the split of each sample). Returns (ledger, data)."""
    from sklearn.linear_model import SGDClassifier

    from lossledger.demo_training import load_data

    data = load_data(noise=0.2, seed=0)
    train = np.flatnonzero(data.split == "train")
    ledger = ll.create(path, n_samples=len(data.labels), labels=data.labels,
                       splits=list(data.split) if splits else None)
    model = SGDClassifier(loss="log_loss", random_state=0)
    ids = np.arange(len(data.labels))
    with ledger.run("sgd") as run:
        for _ in range(epochs):
            model.partial_fit(data.x[train], data.labels[train], classes=np.arange(10))
            p = np.clip(model.predict_proba(data.x), 1e-12, 1.0)
            run.log(ids, loss=-np.log(p[ids, data.labels]))
            run.end_epoch()
    return ledger, data
