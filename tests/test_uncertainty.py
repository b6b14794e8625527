"""lossledger.analysis.uncertainty: action vs ensemble entropy (Fig. 6b/7) and accuracy vs threshold (Fig. 6c)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lossledger as ll
from lossledger import errors as E
from lossledger.analysis.uncertainty import _t_quantile, accuracy_vs_threshold, entropy_vs_action

stats = pytest.importorskip("scipy.stats")
linear = pytest.importorskip("sklearn.linear_model")

RUNS = ["sgd-s0", "sgd-s1", "sgd-s2", "sgd-s3"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Digits with 20% flipped training labels; four seeds of a logistic model trained by partial_fit for 6
    epochs, each logging loss, probs (C,) and correct for every sample. Returns the ledger, the data and the
    logged arrays {run: (loss (T, N), probs (T, N, C), correct (T, N))} as float32 (as stored)."""
    from lossledger.demo_training import load_data

    data = load_data(noise=0.2, seed=0)
    train = np.flatnonzero(data.split == "train")
    ledger = ll.create(tmp_path_factory.mktemp("u") / "u.ll", n_samples=len(data.labels), labels=data.labels,
                       splits=list(data.split))
    ids = np.arange(len(data.labels))
    logged = {}
    for seed, name in enumerate(RUNS):
        model = linear.SGDClassifier(loss="log_loss", random_state=seed, alpha=1e-3)
        rng = np.random.default_rng(seed)
        streams = {"loss": [], "probs": [], "correct": []}
        with ledger.run(name, seed=seed) as run:
            for _ in range(6):
                order = rng.permutation(train)
                model.partial_fit(data.x[order], data.labels[order], classes=np.arange(10))
                p = model.predict_proba(data.x)
                values = {"loss": -np.log(np.clip(p[ids, data.labels], 1e-12, 1)), "probs": p,
                          "correct": (p.argmax(axis=1) == data.labels).astype(np.float64)}
                if seed == 1:  # this run missed ten samples at its last tick
                    keep = ids >= 10 if len(streams["loss"]) == 5 else ids >= 0
                else:
                    keep = ids >= 0
                run.log(ids[keep], **{k: v[keep] for k, v in values.items()})
                run.end_epoch()
                for k, v in values.items():
                    v = v.astype(np.float32).astype(np.float64)
                    v[~keep] = np.nan
                    streams[k].append(v)
        logged[name] = {k: np.array(v) for k, v in streams.items()}
    return ledger, data, logged


def _min_max(v):
    finite = np.isfinite(v)
    return (v - v[finite].min()) / (v[finite].max() - v[finite].min())


def _reference_entropy(logged, rows):
    last = np.stack([logged[r]["probs"][-1] for r in RUNS])  # (R, N, C)
    mean = np.nanmean(last, axis=0)[rows]
    return np.array([stats.entropy(p) for p in mean])


@pytest.mark.parametrize("split", [None, "val"])
def test_entropy_vs_action_matches_numpy_and_scipy(ensemble, split):
    ledger, data, logged = ensemble
    table = entropy_vs_action(ledger, RUNS, split=split)
    rows = np.arange(len(data.labels)) if split is None else np.flatnonzero(data.split == split)
    assert table["sample_id"].to_pylist() == rows.tolist()
    assert table["label"].to_pylist() == data.labels[rows].tolist()
    action = np.nanmean(np.stack([np.nansum(logged[r]["loss"], axis=0) for r in RUNS]), axis=0)[rows]
    np.testing.assert_allclose(table["normalized_action"].to_numpy(), _min_max(action), rtol=1e-9, atol=1e-12)
    entropy = _reference_entropy(logged, rows)
    np.testing.assert_allclose(table["entropy"].to_numpy(), entropy, rtol=1e-9, atol=1e-12)
    # The regions: top 10% action & entropy at most the median, and the reverse.
    a, h = _min_max(action), entropy
    a_hi, a_lo = np.quantile(a, [0.9, 0.5])
    h_hi, h_lo = np.quantile(h, [0.9, 0.5])
    region = np.array(table["region"].to_pylist(), dtype=object)
    np.testing.assert_array_equal(region == "high action, low entropy", (a >= a_hi) & (h <= h_lo))
    np.testing.assert_array_equal(region == "low action, high entropy", (a <= a_lo) & (h >= h_hi))
    in_none = np.array([r is None for r in region])
    assert in_none.sum() == region.size - ((a >= a_hi) & (h <= h_lo)).sum() - ((a <= a_lo) & (h >= h_hi)).sum()
    meta = json.loads(table.schema.metadata[b"lossledger"])
    assert meta["action_high"] == pytest.approx(a_hi) and meta["entropy_low"] == pytest.approx(h_lo)
    if split is None:  # Fig. 6b: flipped training labels have high action though the ensemble is often sure
        flipped = data.flipped
        assert np.nanmean(a[flipped]) > 3 * np.nanmean(a[~flipped])
        # ... and the high-action, low-entropy region (confident but hard to fit) is mostly flipped labels.
        hale = region == "high action, low entropy"
        assert hale.sum() >= 20 and flipped[hale].mean() > 0.8, (hale.sum(), flipped[hale].mean())


def test_user_probabilities_equal_the_stream(ensemble):
    ledger, _, logged = ensemble
    user = np.stack([logged[r]["probs"][-1] for r in RUNS])
    from_stream = entropy_vs_action(ledger, RUNS)
    assert entropy_vs_action(ledger, RUNS, probabilities=user).equals(from_stream)
    user[:, 5] = np.nan  # no run predicted sample 5: NaN entropy, no region
    table = entropy_vs_action(ledger, RUNS, probabilities=user, high=0.8, low=0.2)
    assert np.isnan(table["entropy"][5].as_py()) and table["region"][5].as_py() is None
    with pytest.raises(E.ShapeMismatchError, match="\\(runs, samples, classes\\) = \\(4, 1797, C\\)"):
        entropy_vs_action(ledger, RUNS, probabilities=user[:3])
    with pytest.raises(E.ShapeMismatchError, match="non-negative"):
        entropy_vs_action(ledger, RUNS, probabilities=user - 1.0)


def _reference_curves(hits, scores, grid, keep, confidence=0.95):
    rows = []
    for theta in grid:
        mask = np.isfinite(scores) & ((scores <= theta) if keep == "below" else (scores >= theta))
        acc = np.array([np.nanmean(h[mask]) for h in hits if np.isfinite(h[mask]).any()])
        mean = acc.mean() if acc.size else np.nan
        half = stats.t.ppf((1 + confidence) / 2, acc.size - 1) * acc.std(ddof=1) / np.sqrt(acc.size) if acc.size > 1 else np.nan
        rows.append((theta, mean, mean - half, mean + half, int(mask.sum())))
    return rows


@pytest.mark.parametrize("keep", ["below", "above"])
def test_accuracy_vs_threshold_matches_numpy_and_student_t(ensemble, keep):
    ledger, data, logged = ensemble
    table = accuracy_vs_threshold(ledger, RUNS, thresholds=10, keep=keep)
    assert table["by"].to_pylist() == ["action"] * 10 + ["entropy"] * 10 + ["variance"] * 10
    hits = np.stack([logged[r]["correct"][-1] for r in RUNS])
    scores = {
        "action": _min_max(np.nanmean(np.stack([np.nansum(logged[r]["loss"], axis=0) for r in RUNS]), axis=0)),
        "entropy": _min_max(_reference_entropy(logged, np.arange(len(data.labels)))),
        "variance": _min_max(np.nanmean(np.stack([np.nanvar(logged[r]["loss"], axis=0) for r in RUNS]), axis=0)),
    }
    for name, score in scores.items():
        got = table.filter(np.array(table["by"].to_pylist()) == name)
        want = _reference_curves(hits, score, np.arange(1, 11) / 10, keep)
        for column, values in zip(("threshold", "accuracy_mean", "ci_low", "ci_high"), list(zip(*want))[:4]):
            np.testing.assert_allclose(got[column].to_numpy(), values, rtol=1e-9, atol=1e-12, err_msg=f"{name} {column}")
        assert got["n"].to_pylist() == [w[4] for w in want]
    # Fig. 6c: accuracy falls as harder samples are let in (below) / as only the hard remain (above).
    action = table.filter(np.array(table["by"].to_pylist()) == "action")["accuracy_mean"].to_numpy()
    overall = np.nanmean(hits)
    if keep == "below":
        assert action[0] > overall + 0.05 and action[-1] == pytest.approx(overall, abs=0.01)
    else:
        assert action[0] < overall - 0.3 and action[-1] <= action[0]


def test_threshold_options_and_errors(ensemble):
    ledger, data, _ = ensemble
    one = accuracy_vs_threshold(ledger, RUNS[:1], by="action", thresholds=[0.0, 1.0], split="val")
    assert one["n"].to_pylist()[1] == int((data.split == "val").sum())
    assert one["ci_low"].is_null().to_pylist() == [False, False] and np.isnan(one["ci_low"].to_numpy()).all()
    with pytest.raises(E.ShapeMismatchError, match="by must name scores among"):
        accuracy_vs_threshold(ledger, RUNS, by=("loss",))
    with pytest.raises(E.ShapeMismatchError, match="in \\[0, 1\\]"):
        accuracy_vs_threshold(ledger, RUNS, thresholds=[2.0])
    with pytest.raises(E.ShapeMismatchError, match="low < high"):
        entropy_vs_action(ledger, RUNS, high=0.5, low=0.5)
    with pytest.raises(E.UnknownRunError):
        entropy_vs_action(ledger, ["nope"])
    with pytest.raises(E.UnknownStreamError, match="its streams are .*run.log\\(ids, right=logits.argmax"):
        accuracy_vs_threshold(ledger, RUNS, correct="right")
    with pytest.raises(E.UnknownStreamError, match="softmax\\(logits\\).*or pass probabilities="):
        entropy_vs_action(ledger, RUNS, probs="softmax")
    with pytest.raises(E.ShapeMismatchError, match="is scalar"):
        entropy_vs_action(ledger, RUNS, probs="loss")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30, 101])
def test_student_t_quantile_matches_scipy(df):
    for p in (0.9, 0.975, 0.995):
        assert _t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10)
