"""lossledger.analysis.curriculum: class-balanced action chunks and the paper's greedy curriculum (§4.5)."""

from __future__ import annotations

import numpy as np
import pytest
from _ledgers import ledger_from_losses, sgd_digits_ledger
from hypothesis import given, settings
from hypothesis import strategies as st

from lossledger import errors as E
from lossledger.analysis.curriculum import curriculum_chunks, greedy_curriculum

sklearn_linear = pytest.importorskip("sklearn.linear_model")
threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(4, 80),
    n_classes=st.integers(1, 4),
    n_chunks=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_chunks_are_equal_class_balanced_and_sorted(tmp_path_factory, n, n_classes, n_chunks, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    losses = rng.choice([0.5, 1.0, 2.0, 3.5], size=(3, n)) * rng.random((1, n)).round(1)  # many ties
    losses[:, rng.random(n) < 0.1] = np.nan  # never observed: not a candidate
    observed = ~np.isnan(losses).all(axis=0)
    ledger = ledger_from_losses(tmp_path_factory.mktemp("c") / "c.ll", losses, labels=labels)
    if observed.sum() < n_chunks:
        with pytest.raises(E.ShapeMismatchError, match="ask for fewer chunks"):
            curriculum_chunks(ledger, "r", n_chunks)
        return
    table = curriculum_chunks(ledger, "r", n_chunks)
    ids, chunk = table["sample_id"].to_numpy(), table["chunk"].to_numpy()
    action = table["action"].to_numpy()
    want_action = np.nansum(losses, axis=0)
    # Every observed sample exactly once, with its action and label.
    assert sorted(ids.tolist()) == np.flatnonzero(observed).tolist()
    np.testing.assert_allclose(action, want_action[ids], rtol=1e-6)
    assert table["label"].to_numpy().tolist() == labels[ids].tolist()
    # Rows by chunk, then action ascending.
    assert np.all(np.diff(chunk) >= 0)
    for j in range(n_chunks):
        assert np.all(np.diff(action[chunk == j]) >= 0)
    # Equal chunks; each class spread evenly; within a class, a later chunk never holds an easier sample.
    sizes = np.bincount(chunk, minlength=n_chunks)
    assert sizes.max() - sizes.min() <= 1
    for c in np.unique(labels[ids]):
        mine = labels[ids] == c
        per_chunk = np.bincount(chunk[mine], minlength=n_chunks)
        assert per_chunk.max() - per_chunk.min() <= 1
        # Within a class, every sample of chunk a is at most as hard as every sample of a later chunk b.
        for a in range(n_chunks):
            for b in range(a + 1, n_chunks):
                if (chunk[mine] == a).any() and (chunk[mine] == b).any():
                    assert action[mine][chunk[mine] == a].max() <= action[mine][chunk[mine] == b].min()


def test_chunks_split_no_labels_and_errors(tmp_path):
    losses = np.arange(12, dtype=np.float64)[None, :] * np.ones((2, 1))
    splits = ["train"] * 8 + ["val"] * 4
    ledger = ledger_from_losses(tmp_path / "s.ll", losses, splits=splits)
    table = curriculum_chunks(ledger, "r", 4, split="train")
    assert table["sample_id"].to_pylist() == list(range(8))
    assert table["chunk"].to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert table["label"].null_count == 8  # no labels: one class, label null
    with pytest.raises(E.ShapeMismatchError, match="its splits: \\['train', 'val'\\]"):
        curriculum_chunks(ledger, "r", 4, split="test")
    with pytest.raises(E.ShapeMismatchError, match="positive integer"):
        curriculum_chunks(ledger, "r", 0)
    with pytest.raises(E.ShapeMismatchError, match="ask for fewer chunks"):
        curriculum_chunks(ledger, "r", 5, split="val")
    with pytest.raises(E.UnknownRunError):
        curriculum_chunks(ledger, "nope", 2)
    with pytest.raises(E.ShapeMismatchError, match="finite accuracy"):
        greedy_curriculum(ledger, "r", lambda ids: float("nan"), n_chunks=2)
    with pytest.raises(E.ShapeMismatchError, match="as a float"):
        greedy_curriculum(ledger, "r", lambda ids: "good", n_chunks=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Digits with 20% of the training labels flipped; run "sgd" logs a logistic model's per-sample log-loss
    over 15 epochs of partial_fit on the train split (every sample probed each epoch)."""
    return sgd_digits_ledger(tmp_path_factory.mktemp("d") / "digits.ll", 15, splits=True)


def test_greedy_curriculum_matches_a_plain_reference_on_digits(digits):
    ledger, data = digits
    test = np.flatnonzero(data.split == "val")  # labels of the val split were never flipped
    calls: dict[tuple[int, ...], float] = {}

    def train_and_score(ids: np.ndarray) -> float:
        assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
        key = tuple(ids.tolist())
        if key not in calls:
            model = sklearn_linear.LogisticRegression(max_iter=200, tol=1e-3).fit(data.x[ids], data.labels[ids])
            calls[key] = model.score(data.x[test], data.labels[test])
        return calls[key]

    n_chunks = 5
    with threadpool_limits(1):  # BLAS threads only fight each other for a model this small
        steps = greedy_curriculum(ledger, "sgd", train_and_score, n_chunks=n_chunks, split="train", n_random=3,
                                  seed=1)
    chunks = curriculum_chunks(ledger, "sgd", n_chunks, split="train")
    ids, chunk, action = (chunks[c].to_numpy() for c in ("sample_id", "chunk", "action"))
    members = [np.sort(ids[chunk == j]) for j in range(n_chunks)]

    # The reference: the paper's loop written out plainly.
    kept: list[int] = []
    for row in steps.to_pylist():
        options = [j for j in range(n_chunks) if j not in kept]
        accs = [train_and_score(np.sort(np.concatenate([members[c] for c in [*kept, j]]))) for j in options]
        kept.append(options[int(np.argmax(accs))])
        chosen = np.concatenate([members[c] for c in kept])
        assert row["chunks"] == kept
        assert row["accuracy"] == max(accs)
        assert row["size"] == chosen.size
        assert row["mean_action"] == pytest.approx(action[np.isin(ids, chosen)].mean(), rel=1e-12)
    assert steps["step"].to_pylist() == [1, 2, 3, 4, 5]
    assert steps["size"].to_pylist()[-1] == ids.size

    # The random baselines: n_random subsets of each size that are not unions of chunks; the best is reported.
    unions = {tuple(np.sort(np.concatenate([members[c] for c in row["chunks"][:i] + [j]])).tolist())
              for row in steps.to_pylist() for i in range(len(row["chunks"])) for j in range(n_chunks)}
    randoms = [(len(key), acc) for key, acc in calls.items() if key not in unions]
    for row in steps.to_pylist()[:-1]:
        mine = [acc for size, acc in randoms if size == row["size"]]
        assert 1 <= len(mine) <= 3
        assert row["random_best_accuracy"] == max(mine)
    assert steps["random_best_accuracy"].to_pylist()[-1] == steps["accuracy"].to_pylist()[-1]  # all = all

    # Paper Fig 13: sorted by action, every size beats the best random subset of that size; and dropping the
    # hardest (mostly flipped) samples beats training on everything.
    accuracy, random_best = steps["accuracy"].to_numpy(), steps["random_best_accuracy"].to_numpy()
    assert np.all(accuracy[:-1] >= random_best[:-1]), (accuracy, random_best)
    assert accuracy[:-1].max() > accuracy[-1]
    flipped = data.flipped[ids]
    assert flipped[chunk == 0].mean() < flipped.mean() / 2
