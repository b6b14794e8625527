"""``lossledger demo``: the main job. Train, log every epoch, then show what the ledger finds.

Everything printed is computed from the ledger just written (and the known flips, to score the scores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow as pa

from . import dynamics
from ._render import render_text
from .analysis import (
    accuracy_vs_threshold,
    detection_table,
    entropy_vs_action,
    flag_noisy,
    memorization_window,
    neighbours,
)
from .demo_training import DemoData, load_data, progress_bar, train
from .ledger import Ledger
from .report import write_report

RUN = "mlp-s0"
#: The streams of one value per sample, exported to scores.parquet (probs and embedding are vectors).
SCALAR_STREAMS = ["loss", "prob", "margin", "correct"]
#: Neighbours per hard sample, and the validation thresholds on a normalized score, in the summary.
K_NEIGHBOURS = 8
THRESHOLDS = [0.25, 0.5, 0.75, 1.0]


def run_demo(
    out: str | Path, *, epochs: int = 100, noise: float = 0.2, seed: int = 0, dataset: str | Path | None = None,
    stdout: TextIO | None = None,
) -> pa.Table:
    """Train, log, analyse and print; write ``demo.ll``, ``scores.parquet``, ``report.html`` in ``out``. Returns the
    detection table (one row per score: AUROC and precision@k at finding the flipped labels)."""
    stdout = sys.stdout if stdout is None else stdout
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(dataset, noise=noise, seed=seed)
    n_train = int((data.split == "train").sum())
    print(f"data: {'digits (scikit-learn)' if dataset is None else dataset}: {len(data.labels)} samples, "
          f"{len(data.classes)} classes; {n_train} train ({int(data.flipped.sum())} labels flipped, "
          f"{noise:.0%}), {len(data.labels) - n_train} validation", file=stdout)
    start = time.monotonic()
    ledger = train(data, out / "demo.ll", epochs=epochs, seed=seed, run=RUN, progress=progress_bar())
    print(f"trained {ledger.run_attrs(RUN)['model']} for {epochs} epochs in {time.monotonic() - start:.1f} s; "
          f"ledger: {ledger.path}", file=stdout)

    window = memorization_window(ledger, RUN)
    print(f"\nmemorization window: ticks {window.start}..{window.stop - 1} (chosen by {window.method})", file=stdout)
    scores = ledger.scores(RUN, ticks=window.ticks)
    train_rows = data.split == "train"
    hardest = _ranked(scores, data, train_rows, hardest=True)
    _section(stdout, "10 hardest training samples (action over the window)", hardest)
    _section(stdout, "10 easiest training samples", _ranked(scores, data, train_rows, hardest=False))
    _section(stdout, "mean action per class (training samples, assigned label)", _per_class(ledger, scores, train_rows))
    table = detection(ledger, data, window.ticks)
    _section(stdout, f"finding the {int(data.flipped.sum())} flipped labels (k = number flipped)", table)
    noisy = flag_noisy(ledger, RUN)
    flagged = np.isin(np.arange(len(data.labels)), noisy.flagged_ids)
    hits = int((flagged & data.flipped).sum())
    print(f"\nflag_noisy (two-component mixture on log-action, threshold {noisy.threshold:.4g}): flagged "
          f"{int(flagged.sum())}, of which {hits} flipped (precision {hits / max(int(flagged.sum()), 1):.2f}, "
          f"recall {hits / max(int(data.flipped.sum()), 1):.2f})", file=stdout)
    _uncertainty(stdout, ledger, data, window.ticks)
    _neighbours(stdout, ledger, data, hardest["sample_id"].to_numpy())
    parquet = ledger.export(out / "scores.parquet", [RUN], streams=SCALAR_STREAMS)
    report = write_report(ledger, out / "report.html", run=RUN, images=_images(dataset))
    print(f"\nwrote {parquet}\nwrote {report}", file=stdout)
    return table


def _images(dataset: str | Path | None) -> np.ndarray | str | Path | None:
    """The pictures for the report's galleries: digits' 8×8 images (raw grey levels), or the user's ``x`` if
    it is image-shaped (``write_report`` checks)."""
    if dataset is not None:
        with np.load(dataset) as npz:
            return dataset if npz["x"].ndim >= 3 else None
    from sklearn.datasets import load_digits

    return load_digits().images


def detection(ledger: Ledger, data: DemoData, window: slice) -> pa.Table:
    """AUROC and precision@k of each score at finding the flipped training labels (higher = more suspect)."""
    train_rows = data.split == "train"
    flipped = data.flipped[train_rows]

    def column(table: pa.Table, name: str, sign: float = 1.0) -> np.ndarray:
        return sign * table[name].to_numpy(zero_copy_only=False)[train_rows]

    full = ledger.scores(RUN)
    windowed = ledger.scores(RUN, ticks=window)
    losses = ledger.trajectories(RUN, "loss", ids=ledger.sample_ids[train_rows])  # (n_train, T): a small demo
    per_epoch = detection_table({str(t): losses[:, t] for t in range(losses.shape[1])}, flipped)
    best = int(np.argmax(per_epoch["auroc"].to_numpy()))
    carto = dynamics.cartography(ledger, RUN)
    return detection_table(
        {
            "action (all epochs)": column(full, "action"),
            f"action (window 0..{window.stop - 1})": column(windowed, "action"),
            "variance of loss": column(full, "variance"),
            "final-epoch loss": losses[:, -1],
            f"best single epoch ({best}, oracle)": losses[:, best],
            "cartography: -confidence": column(carto, "confidence", -1.0),
            "AUM: -aum": column(dynamics.aum(ledger, RUN), "aum", -1.0),
            "forgetting events": column(dynamics.forgetting(ledger, RUN), "forgetting_events"),
        },
        flipped,
    )


def _uncertainty(stdout: TextIO, ledger: Ledger, data: DemoData, window: slice) -> None:
    """Print the regions of action vs entropy (training samples, how many flipped) and the validation accuracy
    of the samples kept by a threshold on normalized action or entropy; both read ``probs`` from the ledger."""
    joint = entropy_vs_action(ledger, [RUN], split="train", ticks=window)
    ids = joint["sample_id"].to_numpy()
    region = np.array(joint["region"].fill_null("neither").to_pylist())
    names = ["high action, low entropy", "low action, high entropy", "neither"]
    counts = pa.table({
        "region": names,
        "n": [int((region == name).sum()) for name in names],
        "flipped": [int(data.flipped[ledger._index.rows(ids[region == name])].sum()) for name in names],
    })
    _section(stdout, "action (window) vs entropy of the last epoch's class probabilities (nats), training samples; "
             "high = top 10%, low = below the median", counts)
    curves = accuracy_vs_threshold(ledger, [RUN], split="val", thresholds=THRESHOLDS, by=("action", "entropy"),
                                   ticks=window)
    _section(stdout, "validation accuracy at the last epoch of the samples whose normalized score is <= threshold",
             curves.select(["by", "threshold", "accuracy_mean", "n"]).rename_columns(
                 ["by", "threshold", "accuracy", "n"]))


def _neighbours(stdout: TextIO, ledger: Ledger, data: DemoData, ids: np.ndarray) -> None:
    """Print the labels of the nearest neighbours of ``ids`` in the logged ``embedding`` (last epoch)."""
    table = neighbours(ledger, RUN, ids=ids, k=K_NEIGHBOURS)
    query = table["query_id"].to_numpy()
    found = table["neighbour_label"].to_numpy()
    distance = table["distance"].to_numpy()
    rows = ledger._index.rows(ids)
    labels = [found[query == i] for i in ids]
    majority = np.array([np.bincount(x, minlength=len(data.classes)).argmax() if x.size else -1 for x in labels])
    summary = pa.table({
        "sample_id": pa.array(ids),
        "label": pa.array(data.labels[rows]),
        "true_label": pa.array(data.true[rows]),
        "flipped": pa.array(data.flipped[rows]),
        "neighbour_labels": [" ".join(str(v) for v in x) for x in labels],
        "majority": pa.array(majority),
        "mean_distance": pa.array([float(distance[query == i].mean()) if (query == i).any() else np.nan for i in ids]),
    })
    _section(stdout, f"labels of the {K_NEIGHBOURS} nearest neighbours of the 10 hardest (Euclidean, in the last "
             "hidden layer at the last epoch)", summary)
    print(f"the neighbours' majority label is the true label for {int((majority == data.true[rows]).sum())} of "
          f"{ids.size}, the assigned label for {int((majority == data.labels[rows]).sum())}", file=stdout)


def _ranked(scores: pa.Table, data: DemoData, rows: np.ndarray, *, hardest: bool) -> pa.Table:
    action = scores["action"].to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(rows & ~np.isnan(action))
    order = candidates[np.argsort(action[candidates] if not hardest else -action[candidates], kind="stable")][:10]
    return pa.table(
        {
            "sample_id": pa.array(scores["sample_id"].to_numpy()[order]),
            "label": pa.array(data.labels[order]),
            "true_label": pa.array(data.true[order]),
            "flipped": pa.array(data.flipped[order]),
            "action": pa.array(action[order]),
        }
    )


def _per_class(ledger: Ledger, scores: pa.Table, rows: np.ndarray) -> pa.Table:
    con = ledger.duckdb()
    try:
        con.register("s", scores.append_column("train", pa.array(rows)))
        return con.sql(
            "SELECT label, count(*) AS n, avg(action) AS mean_action, median(action) AS median_action "
            "FROM s WHERE train AND NOT isnan(action) GROUP BY label ORDER BY label"
        ).to_arrow_table()
    finally:
        con.close()


def _section(stdout: TextIO, title: str, table: pa.Table) -> None:
    print(f"\n{title}\n{render_text(table)}", file=stdout)
