"""``lossledger demo``, the README's main command, run for real as a subprocess (short training)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import lossledger as ll

pytest.importorskip("sklearn")


def test_demo_trains_logs_and_finds_the_flipped_labels(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lossledger", "demo", "--out", str(tmp_path), "--epochs", "25"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for heading in ("10 hardest training samples", "10 easiest training samples", "mean action per class",
                    "finding the", "flag_noisy", "memorization window: ticks 0.."):
        assert heading in text, text
    assert "\r" not in out.stderr  # no progress bar when stderr is not a terminal
    ledger = ll.open(tmp_path / "demo.ll")
    assert ledger.ticks("mlp-s0").num_rows == 25
    assert set(ledger.streams("mlp-s0")["stream"].to_pylist()) == {"loss", "prob", "margin", "correct"}
    flipped = np.array(ledger.run_attrs("mlp-s0")["flipped"])
    # The printed AUROC of the full-run action is the one computed from the ledger.
    scores = ledger.scores("mlp-s0")
    train = np.array([s == "train" for s in ledger.samples["split"].to_pylist()])
    auroc = ll.analysis.auroc(scores["action"].to_numpy()[train], np.isin(ledger.sample_ids, flipped)[train])
    assert auroc > 0.95
    line = next(line for line in text.splitlines() if line.startswith("action (all epochs)"))
    assert float(line.split()[3]) == pytest.approx(auroc, abs=5e-7)
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html
    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.num_rows == ledger.n_samples * 4  # one row per sample and stream


def test_sklearn_learner_logs_the_same_streams_without_torch(tmp_path):
    from lossledger.demo_training import load_data, train

    data = load_data(noise=0.2, seed=1)
    ledger = train(data, tmp_path / "sk.ll", epochs=3, model="sklearn", run="sk")
    assert ledger.run_attrs("sk")["model"] == "sklearn-mlp-256"
    loss = ledger.trajectories("sk", "loss")
    prob = ledger.trajectories("sk", "prob")
    assert loss.shape == (len(data.labels), 3) and not np.isnan(loss).any()
    np.testing.assert_allclose(np.exp(-loss), prob, rtol=1e-5)  # cross-entropy: p(label) = exp(-loss)
    correct = ledger.trajectories("sk", "correct")
    assert set(np.unique(correct)) <= {0.0, 1.0}
