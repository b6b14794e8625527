"""Overhead of recording per-sample losses in a real PyTorch training loop (goal: <= 5% of epoch time).

Two workloads train for real on CPU (or on CUDA with ``--device cuda``):

- ``mlp-digits``: MLP 64-256-10 on sklearn's digits (1797 samples), batch 32, Adam;
- ``cnn-synthetic``: a small CNN (two conv blocks) on 2048 synthetic 3x32x32 images, batch 64, SGD with momentum.

Each workload trains one model in one process, switching between sides in ABBA order (so drift, caches warming
or other load on the machine hits every side alike); round 0 is a warm-up and not timed. A side runs a block
of epochs (mlp: 5, so that a commit in the writer thread overlapping the next epoch is measured as it happens
in training; cnn: 1), and the block ends when its last tick is committed (``rec.wait()``): every commit is
inside the timing. Sides:

- ``none``: the plain loop;
- ``Recorder``: ``rec.log(ids, losses)`` every step, ``rec.end_epoch()`` every epoch (writer thread);
- ``Recorder(background=False)``: the same, committing inside ``end_epoch`` (info);
- ``run.log`` every step, ``run.end_epoch()`` (info: what the recorder replaces; a host sync per step on GPU);
- probes (info): ``evaluate()`` with margin on 512 digits / 1024 images, each in its own committed tick, against
  a plain ``torch.no_grad()`` loop computing the same losses.

The goal applies to the ratio of the medians of the per-epoch wall times; the ratio of process CPU times
(main and writer threads) is printed beside it, as it is less sensitive to other jobs on a shared machine.
torch runs on 1 intra-op thread by default (``--threads``): tiny models gain nothing from more, and on a busy
2-core machine extra threads make the timings noise.

    python benchmarks/overhead.py            # ~50 s on 2 CPU cores
    python benchmarks/overhead.py --quick    # fewer rounds

Always exits 0: timings depend on the machine; read the ratio columns.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lossledger.adapters.torch import IndexedDataset, Recorder, evaluate
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lossledger as ll

GOAL = 1.05


def digits(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, TensorDataset, TensorDataset, int]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt, TensorDataset(x, y), TensorDataset(x[:512], y[:512]), 32


def synthetic_images(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, TensorDataset, TensorDataset, int]:
    g = torch.Generator().manual_seed(0)
    n, classes = 2048, 10
    y = torch.randint(0, classes, (n,), generator=g)
    prototypes = torch.randn(classes, 3, 32, 32, generator=g)
    x = prototypes[y] + 2.0 * torch.randn(n, 3, 32, 32, generator=g)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, classes),
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, TensorDataset(x, y), TensorDataset(x[:1024], y[:1024]), 64


def train_epoch(model, opt, loader, device, log: Callable[[torch.Tensor, torch.Tensor], None] | None) -> None:
    model.train()
    for ids, x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        if log is not None:
            log(ids, losses)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, make, device: torch.device, rounds: int, block: int, root: Path) -> list[tuple[str, ...]]:
    """Rows of the report for one workload: ``rounds`` ABBA rounds of ``block`` epochs per side."""
    torch.manual_seed(0)
    model, opt, train, probe, batch = make(device)
    loader = DataLoader(IndexedDataset(train), batch_size=batch, shuffle=True)
    probe_loader = DataLoader(IndexedDataset(probe), batch_size=256)
    ledger = ll.create(root / f"{name}.ll", n_samples=len(train))
    sides = ("none", "recorder", "recorder-sync", "run.log", "probe", "evaluate")
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    own: dict[str, list[float]] = {"log": [0.0], "commit": []}  # time inside rec.log per epoch; end_epoch (sync)
    with (
        ledger.run("rec") as run,
        ledger.run("sync") as sync_run,
        ledger.run("direct") as direct,
        ledger.run("probe") as probe_run,
    ):
        rec, rec_sync = Recorder(run), Recorder(sync_run, background=False)

        def plain() -> None:
            train_epoch(model, opt, loader, device, None)

        def recorded() -> None:
            train_epoch(model, opt, loader, device, timed_log)
            rec.end_epoch()  # the commit runs in the writer thread, overlapping the next epoch of the block

        def timed_log(ids: torch.Tensor, losses: torch.Tensor) -> None:
            t0 = time.perf_counter()
            rec.log(ids, losses)
            own["log"][-1] += time.perf_counter() - t0

        def recorded_sync() -> None:
            train_epoch(model, opt, loader, device, rec_sync.log)
            t0 = time.perf_counter()
            rec_sync.end_epoch()
            own["commit"].append(time.perf_counter() - t0)

        def direct_log() -> None:
            train_epoch(model, opt, loader, device, lambda ids, losses: direct.log(ids, loss=losses.cpu()))
            direct.end_epoch()

        def plain_probe() -> None:
            model.eval()
            with torch.no_grad():
                for _ids, x, y in probe_loader:
                    F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").cpu()
            model.train()

        def probe_eval() -> None:
            evaluate(probe_run, model, probe_loader, nn.CrossEntropyLoss(reduction="none"), margin=True)

        run_side = {"none": plain, "recorder": recorded, "recorder-sync": recorded_sync, "run.log": direct_log,
                    "probe": plain_probe, "evaluate": probe_eval}
        for i in range(rounds + 1):
            for side in sides if i % 2 == 0 else sides[::-1]:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(block):
                    run_side[side]()
                    if side == "recorder":
                        own["log"].append(0.0)
                rec.wait()  # the block ends when its last tick is committed
                sync(device)
                if i > 0:  # round 0 warms up
                    wall[side].append((time.perf_counter() - t0) / block)
                    cpu[side].append((time.process_time() - c0) / block)
        rec.close()
        rec_sync.close()
    ledger.close()
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ratio, cpu_ratio = med["recorder"] / med["none"], cmed["recorder"] / cmed["none"]
    paired = statistics.median(r / n for r, n in zip(wall["recorder"], wall["none"], strict=True))
    fastest = min(wall["recorder"]) / min(wall["none"])
    steps = -(-len(train) // batch)
    per_step = (cmed["recorder"] - cmed["none"]) / steps * 1e6
    log_time = statistics.median(own["log"][-len(wall["none"]) * block - 1 : -1])  # timed rounds only
    commit_time = statistics.median(own["commit"][-len(wall["none"]) * block :])
    direct = (log_time + commit_time) / med["none"]
    n = f"{len(wall['none'])} x {block}"
    return [
        (f"{name}: epoch, no ledger (median wall / CPU)", f"{_ms(med['none'])} / {_ms(cmed['none'])}",
         f"{steps} steps of {batch}, {n} epochs", ""),
        (f"{name}: epoch, Recorder (median wall / CPU)", f"{_ms(med['recorder'])} / {_ms(cmed['recorder'])}",
         f"CPU {per_step:+.0f} us/step incl. commit", ""),
        (f"{name}: ratio Recorder / none, wall", f"{ratio:.3f}x", f"<= {GOAL:.2f}x", _verdict(ratio)),
        (f"{name}: ratio Recorder / none, process CPU", f"{cpu_ratio:.3f}x", f"<= {GOAL:.2f}x", _verdict(cpu_ratio)),
        (f"{name}: median of per-round ratios, wall", f"{paired:.3f}x", "adjacent blocks", "info"),
        (f"{name}: ratio of the fastest blocks, wall", f"{fastest:.3f}x", "", "info"),
        (f"{name}: time in rec.log per epoch + end_epoch (sync)", f"{_ms(log_time)} + {_ms(commit_time)}",
         f"{log_time / steps * 1e6:.1f} us per log call", ""),
        (f"{name}: (rec.log + end_epoch) / epoch without ledger", f"{direct:.3f}x", "of the epoch, not overlapped",
         "info"),
        (f"{name}: ratio Recorder(background=False) / none, wall", f"{med['recorder-sync'] / med['none']:.3f}x", "",
         "info"),
        (f"{name}: ratio run.log every step / none, wall", f"{med['run.log'] / med['none']:.3f}x", "", "info"),
        (f"{name}: probe: plain no_grad loop / evaluate()", f"{_ms(med['probe'])} / {_ms(med['evaluate'])}",
         f"{len(probe)} samples, margin, own tick", ""),
        (f"{name}: evaluate() / epoch without ledger, wall", f"{med['evaluate'] / med['none']:.3f}x", "", "info"),
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _verdict(ratio: float) -> str:
    return "met" if ratio <= GOAL else "NOT met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (noisier)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=None, help="timed ABBA rounds per workload")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 keeps torch's default)"
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    print("lossledger adapter overhead: PyTorch training loop, with vs without Recorder, interleaved epochs")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, lossledger "
        f"{ll.__version__}, device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs "
        f"({sys.platform}), load average {os.getloadavg()[0]:.2f}"
    )
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench("mlp-digits", digits, device, args.rounds or (4 if args.quick else 10), 5, Path(tmp))
        rows += bench("cnn-synthetic", synthetic_images, device, args.rounds or (3 if args.quick else 8), 1, Path(tmp))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("measure", "value", "goal / note", "verdict")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    line = "  ".join("-" * w for w in widths)
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(line)
    print(
        f"per-epoch medians over timed blocks (mlp: 5 epochs, cnn: 1; round 0 excluded; each block ends when its "
        f"last tick is committed), sides interleaved ABBA; load average now "
        f"{os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # noqa: BLE001 - a benchmark reports, it does not fail the caller
        print(f"benchmark failed: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(0)
