"""``lossledger demo``, the README's main command, run for real as a subprocess (short training)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import lossledger as ll

pytest.importorskip("sklearn")


def test_demo_trains_logs_and_finds_the_flipped_labels(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lossledger", "demo", "--out", str(tmp_path), "--epochs", "25"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for heading in ("10 hardest training samples", "10 easiest training samples", "mean action per class",
                    "finding the", "flag_noisy", "memorization window: ticks 0..", "vs entropy",
                    "validation accuracy", "nearest neighbours of the 10 hardest"):
        assert heading in text, text
    assert "\r" not in out.stderr  # no progress bar when stderr is not a terminal
    ledger = ll.open(tmp_path / "demo.ll")
    assert ledger.ticks("mlp-s0").num_rows == 25
    streams = ledger.streams("mlp-s0")
    assert set(streams["stream"].to_pylist()) == {"loss", "prob", "margin", "correct", "probs", "embedding"}
    since = dict(zip(streams["stream"].to_pylist(), streams["since"].to_pylist(), strict=True))
    assert since["probs"] == 0 and since["embedding"] == 24  # features of the last epoch only
    probs = ledger.trajectories("mlp-s0", "probs")  # (n, 25, 10): a small demo
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, rtol=1e-5)
    labels = ledger.samples["label"].to_numpy()
    chosen = np.take_along_axis(probs, labels[:, None, None], axis=2)[..., 0]
    np.testing.assert_allclose(chosen, ledger.trajectories("mlp-s0", "prob"), rtol=1e-6)
    # The printed neighbours are those the analysis finds in the logged embedding.
    hard = [line.split() for line in text.split("nearest neighbours of the 10 hardest")[1].splitlines()[3:13]]
    found = ll.analysis.neighbours(ledger, "mlp-s0", ids=[int(row[0]) for row in hard], k=8)
    for row in hard:
        mine = found.filter(pc.equal(found["query_id"], int(row[0])))["neighbour_label"].to_pylist()
        assert row[4:12] == [str(v) for v in mine]
    entropy = ll.analysis.entropy_vs_action(ledger, ["mlp-s0"], split="train", ticks=slice(0, window_end(text)))
    high = int(pc.sum(pc.equal(entropy["region"], "high action, low entropy")).as_py() or 0)
    assert any(line.split()[:5] == ["high", "action,", "low", "entropy", str(high)] for line in text.splitlines())
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


def window_end(text):
    """The stop of the printed memorization window, ``memorization window: ticks 0..N``."""
    line = next(line for line in text.splitlines() if line.startswith("memorization window: ticks 0.."))
    return int(line.split("..")[1].split()[0]) + 1


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
    probs = ledger.trajectories("sk", "probs")  # predict_proba: (n, 3, 10)
    np.testing.assert_allclose(np.take_along_axis(probs, data.labels[:, None, None], axis=2)[..., 0], prob, rtol=1e-6)
    embedding = ledger.trajectories("sk", "embedding")  # the hidden layer's ReLU output, last epoch only
    assert embedding.shape == (len(data.labels), 3, 256)
    assert np.isnan(embedding[:, :2]).all() and not np.isnan(embedding[:, 2]).any() and (embedding[:, 2] >= 0).all()
    table = ll.analysis.neighbours(ledger, "sk", k=3, top=4)  # reads the embedding from the ledger
    assert table.num_rows == 12
