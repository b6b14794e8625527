"""Keras callback benchmark: what the per-epoch probe evaluation of ``LossLedgerCallback`` costs.

The callback runs one forward pass over the probe set at every epoch end (the paper's protocol), so its
cost is that of evaluating the probe, not of the ledger. Measured in one process, for each case, in one
``model.fit`` with the callback:

1. per epoch, the training time (epoch time minus the callback) and the callback time, split into the probe
   evaluation and the ledger part (``run.log`` + ``run.end_epoch``);
2. after training, ``probe_losses`` (batched ``predict_on_batch`` plus the unreduced loss) against
   ``model.predict`` of the same probe with the same batch size, the floor of any evaluation; interleaved.

Reported: the callback time as a fraction of the training time of the same epochs, and probe evaluation vs
``model.predict``. Epoch 0 (tracing/compilation) is excluded from the medians. The script always exits 0.

    python benchmarks/overhead_keras.py                    # KERAS_BACKEND, else torch
    python benchmarks/overhead_keras.py --backend jax --threads 1

Cases: ``digits`` (sklearn digits: MLP trained on the 1,347-sample train split, probe = the 450-sample
test split) and ``synthetic`` (a small CNN on ``--synthetic-n`` random 32x32x3 images, probe =
``--probe-n`` more: 5:1 like CIFAR-10's train and test splits).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


class TimedRun:
    """Passes calls through to a :class:`lossledger.Run`, adding up the seconds spent in ``log``/``end_epoch``."""

    def __init__(self, run: Any) -> None:
        self.run, self.seconds = run, 0.0

    def log(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        self.run.log(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def end_epoch(self, **kwargs: Any) -> int:
        start = time.perf_counter()
        tick = self.run.end_epoch(**kwargs)
        self.seconds += time.perf_counter() - start
        return tick


def _epoch_timer(keras: Any) -> Any:
    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:  # runs after the ledger callback
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _cases(args: argparse.Namespace, keras: Any) -> dict[str, tuple[Any, ...]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    rows = np.random.default_rng(0).permutation(len(y))
    test, train = rows[:450], rows[450:]

    def mlp() -> Any:
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                 keras.layers.Dense(10)])

    rng = np.random.default_rng(1)
    n, m = args.synthetic_n, args.probe_n
    images = rng.normal(size=(n + m, 32, 32, 3)).astype(np.float32)
    labels = (images[:, ::4, ::4, :].reshape(n + m, -1) @ rng.normal(size=(192, 10))).argmax(1).astype(np.int32)

    def cnn() -> Any:
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Flatten(), keras.layers.Dense(10),
        ])

    return {
        "digits": (mlp, x[train], y[train], x[test], y[test], 64, 256),
        "synthetic": (cnn, images[:n], labels[:n], images[n:], labels[n:], 128, 512),
    }


def _measure(keras: Any, case: tuple[Any, ...], epochs: int, root: Path, name: str) -> dict[str, float]:
    from lossledger.adapters.keras import LossLedgerCallback, probe_losses

    import lossledger as ll

    build, x, y, xp, yp, batch, probe_batch = case
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = _epoch_timer(keras)
    ledger = ll.create(root / f"{name}.ll", n_samples=len(yp), labels=yp)
    with ledger.run("bench") as run:
        timed = TimedRun(run)
        callback = LossLedgerCallback(timed, probe=(xp, yp, np.arange(len(yp))), batch_size=probe_batch)  # type: ignore[arg-type]
        inside: list[float] = []
        in_ledger: list[float] = []

        class Split(keras.callbacks.Callback):
            """Runs the ledger callback and times it; the epoch timer, after it, sees the whole epoch."""

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                start, before = time.perf_counter(), timed.seconds
                callback.on_epoch_end(epoch, logs)
                inside.append(time.perf_counter() - start)
                in_ledger.append(timed.seconds - before)

        callback.set_model(model)
        model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0, callbacks=[Split(), timer])
    train = [total - cb for total, cb in zip(timer.seconds, inside)]
    evaluate, predict = [], []
    for _ in range(3):  # interleaved, so that both see the same machine load
        start = time.perf_counter()
        probe_losses(model, xp, yp, batch_size=probe_batch)
        evaluate.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.predict(xp, batch_size=probe_batch, verbose=0)
        predict.append(time.perf_counter() - start)
    return {
        "train_n": len(y), "probe_n": len(yp), "train": statistics.median(train[1:]),
        "callback": statistics.median(inside[1:]), "ledger": statistics.median(in_ledger[1:]),
        "evaluate": statistics.median(evaluate), "predict": statistics.median(predict),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["torch", "jax", "tensorflow"], default=None,
                        help="Keras backend (default: $KERAS_BACKEND, else torch)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit; epoch 0 is excluded (default 3)")
    parser.add_argument("--synthetic-n", type=int, default=10000, help="training images of the CNN case")
    parser.add_argument("--probe-n", type=int, default=2000, help="probe images of the CNN case")
    parser.add_argument("--cases", default="digits,synthetic", help="comma-separated: digits,synthetic")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the backend (default: its own choice; 1 is steadier on a busy machine)")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend or os.environ.get("KERAS_BACKEND", "torch")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    widths = (9, 15, 11, 10, 15, 10, 22)
    try:
        import keras

        import lossledger as ll

        if args.threads and keras.backend.backend() == "torch":
            import torch

            torch.set_num_threads(args.threads)
        print(f"lossledger Keras callback benchmark: backend {keras.backend.backend()}, {args.epochs} epochs, "
              f"threads {args.threads or 'default'}")
        print(f"python {platform.python_version()}, keras {keras.__version__}, numpy {np.__version__}, "
              f"lossledger {ll.__version__}, {os.cpu_count()} CPUs ({sys.platform}), "
              f"load average {os.getloadavg()[0]:.1f}\n")
        header = ("case", "train / probe", "train/epoch", "callback", "of which ledger", "cb / train",
                  "probe eval / predict")
        print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
        cases = _cases(args, keras)
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.cases.split(","):
                r = _measure(keras, cases[name], args.epochs, Path(tmp), name)
                row = (
                    name, f"{r['train_n']:,} / {r['probe_n']:,}", f"{r['train'] * 1e3:.0f} ms",
                    f"{r['callback'] * 1e3:.0f} ms", f"{r['ledger'] * 1e3:.1f} ms", f"{r['callback'] / r['train']:.1%}",
                    f"{r['evaluate'] * 1e3:.0f} / {r['predict'] * 1e3:.0f} ms = {r['evaluate'] / r['predict']:.2f}x",
                )
                print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)), flush=True)
        print(f"\nmedians over epochs 1..{args.epochs - 1}; train/epoch = epoch time minus the callback; callback = "
              "probe evaluation + run.log + end_epoch; cb / train = callback / train time of the same epochs; "
              "probe eval / predict = probe_losses vs model.predict of the probe, medians of 3 interleaved; "
              f"load average at the end {os.getloadavg()[0]:.1f}")
    except Exception:  # noqa: BLE001 - a benchmark reports, it never fails the caller
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
