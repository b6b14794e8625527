"""Train softmax regression (plain numpy, SGD) on noisy synthetic data, log every sample's loss at every
epoch into a ledger, and find the flipped labels by their action (loss summed over epochs).

    python examples/quickstart.py [--out quickstart.ll]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import lossledger as ll


def make_data(rng: np.random.Generator, n: int = 2000, classes: int = 4, flip: float = 0.1):
    centers = rng.normal(0, 3.0, size=(classes, 8))
    y_true = rng.integers(0, classes, n)
    x = centers[y_true] + rng.normal(0, 1.5, size=(n, 8))
    flipped = rng.random(n) < flip
    y = np.where(flipped, (y_true + rng.integers(1, classes, n)) % classes, y_true)
    return x.astype(np.float32), y, flipped


def per_sample_cross_entropy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y], np.exp(log_p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "quickstart.ll")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x, y, flipped = make_data(rng)
    ledger = ll.create(args.out, n_samples=len(y), labels=y, classes=["a", "b", "c", "d"], overwrite=True)
    w = np.zeros((x.shape[1], 4), np.float32)
    with ledger.run("softmax-s0", model="softmax-regression", lr=0.05, seed=0) as run:
        for _ in range(args.epochs):
            for ids in np.array_split(rng.permutation(len(y)), len(y) // 64):
                loss, p = per_sample_cross_entropy(w, x[ids], y[ids])
                run.log(ids, loss=loss)  # per-sample losses of this batch, before the update
                p[np.arange(len(ids)), y[ids]] -= 1.0
                w -= 0.05 * x[ids].T @ p / len(ids)
            run.end_epoch()

    losses = ledger.trajectories("softmax-s0")  # (samples, epochs)
    action = np.nansum(losses, axis=1)
    hardest = np.argsort(-action)[:10]
    print(ledger.info())
    print("\n10 hardest samples (id, label, action, flipped?):")
    for i in hardest:
        print(f"  {i:5d}  {y[i]}  {action[i]:7.2f}  {'flipped' if flipped[i] else ''}")
    k = int(flipped.sum())
    top_k = np.argsort(-action)[:k]
    print(f"\n{flipped[top_k].mean():.0%} of the {k} highest-action samples have flipped labels "
          f"({flipped.mean():.0%} of all samples do).")


if __name__ == "__main__":
    main()
