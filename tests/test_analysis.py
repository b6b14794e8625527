"""lossledger.analysis: detection metrics vs scipy/sklearn, the memorization window, noisy-label flags."""

from __future__ import annotations

import numpy as np
import pytest
from _ledgers import ledger_from_losses
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lossledger as ll
from lossledger import errors as E
from lossledger.analysis import auroc, detection_table, flag_noisy, memorization_window, precision_at_k

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(2, 60), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, np.nan, -3.0])),
    st.randoms(use_true_random=False),
)
def test_auroc_and_precision_match_references(scores, random):
    positive = np.array([random.random() < 0.4 for _ in scores])
    keep = ~np.isnan(scores)
    s, pos = scores[keep], positive[keep]
    if 0 < pos.sum() < pos.size:
        assert auroc(scores, positive) == pytest.approx(sklearn_metrics.roc_auc_score(pos, s), abs=1e-12)
    else:
        assert np.isnan(auroc(scores, positive))
    k = int(pos.sum())
    if k:
        want = pos[np.argsort(-s, kind="stable")[:k]].mean()
        assert precision_at_k(scores, positive) == pytest.approx(want)


def test_detection_table_and_bad_input():
    table = detection_table({"good": [3.0, 2.0, 1.0, 0.0], "bad": [0.0, 1.0, 2.0, 3.0]}, [True, True, False, False])
    assert table.to_pydict() == {"score": ["good", "bad"], "auroc": [1.0, 0.0], "precision_at_k": [1.0, 0.0],
                                 "k": [2, 2], "n": [4, 4]}
    with pytest.raises(E.ShapeMismatchError, match="one flag per score"):
        auroc([1.0, 2.0], [True])


def _memorizing(onset, n_ticks=30, n=400, seed=0):
    """Clean samples learned at once; noisy ones stay hard until ``onset``, then are memorized (both reach a
    floor of 0.05, as a trained network's losses do)."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.2
    t = np.arange(n_ticks)[:, None]
    clean = 0.05 + 2.0 * np.exp(-t / 2.0)
    hard = 0.05 + np.where(t < onset, 3.0, 3.0 * np.exp(-(t - onset) / 2.0))
    losses = np.where(noisy, hard, clean) * rng.lognormal(0, 0.2, (n_ticks, n))
    return losses, noisy


def test_separability_window_ends_near_the_memorization_onset(tmp_path):
    losses, noisy = _memorizing(onset=15)
    ledger = ledger_from_losses(tmp_path / "a.ll", losses)
    window = memorization_window(ledger, "r")
    assert window.method == "separability"
    assert 10 <= window.stop <= 18, window.curve.to_pydict()["smoothed"]
    assert window.ticks == slice(0, window.stop)
    assert window.curve.num_rows == 30
    windowed = ledger.scores("r", ticks=window.ticks)["action"].to_numpy()
    full = ledger.scores("r")["action"].to_numpy()
    assert auroc(windowed, noisy) >= auroc(full, noisy)


def test_validation_window_is_the_minimum_of_validation_loss(tmp_path):
    n_ticks, n = 20, 50
    val_curve = (np.arange(n_ticks) - 7.0) ** 2 / 10.0 + 1.0  # minimum at tick 7
    losses = np.tile(np.linspace(2.0, 0.1, n_ticks)[:, None], (1, n))
    splits = ["train"] * 40 + ["val"] * 10
    losses[:, 40:] = val_curve[:, None]
    ledger = ledger_from_losses(tmp_path / "a.ll", losses, splits=splits)
    window = memorization_window(ledger, "r", smooth=1)
    assert (window.method, window.stop) == ("validation", 8)
    np.testing.assert_allclose(window.curve["statistic"].to_numpy(), val_curve, rtol=1e-6)
    with pytest.raises(E.ShapeMismatchError, match="method must be"):
        memorization_window(ledger, "r", method="magic")


def test_flag_noisy_mixture_and_reference(tmp_path):
    losses, noisy = _memorizing(onset=25, n_ticks=25)
    splits = ["val" if i % 10 == 0 else "train" for i in range(losses.shape[1])]
    losses[:, ::10] = _memorizing(onset=0, n_ticks=25, n=40, seed=1)[0]  # held-out samples: learned normally
    ledger = ledger_from_losses(tmp_path / "a.ll", losses, splits=splits)
    train = np.array(splits) == "train"
    result = flag_noisy(ledger, "r", ticks=None)
    assert result.window is None and result.method == "mixture"
    table = result.table
    assert table.num_rows == train.sum() and set(table["sample_id"].to_pylist()) == set(np.flatnonzero(train))
    action = table["action"].to_numpy()
    assert (np.diff(action) <= 0).all()  # highest first
    flagged = np.isin(np.arange(len(noisy)), result.flagged_ids)
    assert (flagged == (noisy & train))[train].mean() > 0.98
    assert np.all(table.filter(table["flagged"])["action"].to_numpy() >= result.threshold)
    reference = flag_noisy(ledger, "r", ticks=None, method="reference", quantile=0.9)
    val_action = ledger.scores("r")["action"].to_numpy()[~train]
    assert reference.threshold == pytest.approx(np.quantile(val_action, 0.9))
    assert reference.table["p_noisy"].null_count == reference.table.num_rows
    auto = flag_noisy(ledger, "r")
    assert auto.window is not None and auto.window.method == "validation"
    with pytest.raises(E.ShapeMismatchError, match="quantile must lie"):
        flag_noisy(ledger, "r", method="reference", quantile=1.5)


def test_window_finds_flipped_digits_better_than_full_action_cartography_and_aum(tmp_path):
    """Issue 7: on digits with flipped labels, the auto-window action beats the full-run action, cartography
    confidence and AUM at finding the flips (AUROC), with a real torch MLP trained past memorization onset."""
    pytest.importorskip("torch")
    from lossledger.demo_training import load_data, train

    data = load_data(noise=0.2, seed=0)
    ledger = train(data, tmp_path / "digits.ll", epochs=100, seed=0, run="r")
    rows = data.split == "train"
    flipped = data.flipped[rows]
    window = memorization_window(ledger, "r")
    assert 0 < window.stop < 100

    def score(table, column, sign=1.0):
        return sign * table[column].to_numpy(zero_copy_only=False)[rows]

    auto = auroc(score(ledger.scores("r", ticks=window.ticks), "action"), flipped)
    assert auto >= auroc(score(ledger.scores("r"), "action"), flipped)
    assert auto >= auroc(score(ll.dynamics.cartography(ledger, "r"), "confidence", -1.0), flipped)
    assert auto >= auroc(score(ll.dynamics.aum(ledger, "r"), "aum", -1.0), flipped)
