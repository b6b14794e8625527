"""Action scores without labels: a tiny autoencoder on digits, its per-sample reconstruction loss every epoch.

The action score needs no labels, only a loss per sample that an iterative optimizer drives down. Here the
loss is the mean squared reconstruction error of each 8×8 digit by a small PyTorch autoencoder (64 → 32 → 8
→ 32 → 64); the labels are stored in the ledger only to show which digits are hard to reconstruct, the model
never sees them. After training, the script prints the hardest and easiest samples and clusters the loss
curves (paper Fig. 2).

    python docs/examples/autoencoder.py --epochs 30 --out autoencoder.ll

Needs torch and scikit-learn (for the bundled digits; no download).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import lossledger as ll
from lossledger.analysis.clusters import cluster_curves


def train(out: Path, epochs: int, seed: int) -> ll.Ledger:
    """Train the autoencoder for ``epochs`` epochs, logging every sample's reconstruction loss at each."""
    x_np, y = load_digits(return_X_y=True)
    x = torch.from_numpy((x_np / 16.0).astype(np.float32))
    ids = np.arange(len(x))
    ledger = ll.create(out, n_samples=len(x), labels=y, classes=[str(d) for d in range(10)], overwrite=True)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a model this small is fastest on one thread
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(),
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64), torch.nn.Sigmoid(),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    with ledger.run("autoencoder", model="mlp-ae-64-32-8", seed=seed) as run:
        for _ in range(epochs):
            model.train()
            for batch in np.array_split(rng.permutation(ids), max(1, len(ids) // 64)):
                loss = torch.nn.functional.mse_loss(model(x[batch]), x[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():  # probe every sample after the epoch, as the paper does
                per_sample = ((model(x) - x) ** 2).mean(dim=1)
            run.log(ids, loss=per_sample)
            run.end_epoch()
    return ledger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("autoencoder.ll"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    ledger = train(args.out, args.epochs, args.seed)
    print(f"ledger {args.out}: {ledger.n_samples} samples, {ledger.ticks('autoencoder').num_rows} epochs")
    for title, hardest in (("hardest", True), ("easiest", False)):
        print(f"\n{title} to reconstruct (action = summed MSE over epochs):")
        print(f"{'rank':>4} {'sample_id':>9} {'digit':>5} {'action':>10}")
        for row in ledger.top(args.top, "autoencoder", hardest=hardest).to_pylist():
            print(f"{row['rank']:>4} {row['sample_id']:>9} {row['class']:>5} {row['action']:>10.6f}")
    clusters = cluster_curves(ledger, "autoencoder", k=3)
    sizes = np.bincount(clusters.assignments["cluster"].to_numpy(), minlength=3)
    print("\nloss-curve clusters (k-means of curves scaled to their peak; 0 falls fastest):")
    for j, (size, centre) in enumerate(zip(sizes, clusters.centres)):
        closest = clusters.members.filter(np.asarray(clusters.members["cluster"]) == j)["sample_id"].to_pylist()
        print(f"  cluster {j}: {size} samples, centre {centre[0]:.2f} -> {centre[-1]:.2f}, closest {closest}")


if __name__ == "__main__":
    main()
