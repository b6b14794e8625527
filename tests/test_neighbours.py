"""lossledger.analysis.neighbours: exact kNN of the hardest samples (paper Fig. 5) vs scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from _ledgers import sgd_digits_ledger

import lossledger as ll
from lossledger import errors as E
from lossledger.analysis.neighbours import neighbours

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")


def _ledger(path, n=300, d=8, seed=0, missing=()):
    """Run "r": two ticks of loss (action = 2 × a known value) and of a (D,) embedding; tick 1's embedding is
    the one that counts, and the samples in ``missing`` are not logged in it at tick 1."""
    rng = np.random.default_rng(seed)
    hardness = rng.permutation(n).astype(np.float64)
    features = rng.normal(size=(n, d)).astype(np.float32)
    ledger = ll.create(path, n_samples=n, labels=np.arange(n) % 5)
    ids = np.arange(n)
    with ledger.run("r") as run:
        run.log(ids, loss=hardness, embedding=rng.normal(size=(n, d)))  # tick 0: a different space
        run.end_epoch()
        logged = np.setdiff1d(ids, missing)
        run.log(ids, loss=hardness)
        run.log(logged, embedding=features[logged])
        run.end_epoch()
    return ledger, hardness, features.astype(np.float64)


def _reference(features, usable, queries, k):
    """scikit-learn's exact neighbours among the usable rows, the query itself left out."""
    rows = np.flatnonzero(usable)
    model = sklearn_neighbors.NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(features[rows])
    dist, idx = model.kneighbors(features[queries])
    out = []
    for q, d_row, i_row in zip(queries, dist, idx):
        pairs = [(rows[i], dd) for i, dd in zip(i_row, d_row) if rows[i] != q][:k]
        out.append(pairs)
    return out


def _check(table, reference, queries, labels):
    assert table["query_id"].to_pylist() == np.repeat(queries, [len(p) for p in reference]).tolist()
    assert table["rank"].to_pylist() == [r + 1 for p in reference for r in range(len(p))]
    assert table["neighbour_id"].to_pylist() == [int(i) for p in reference for i, _ in p]
    np.testing.assert_allclose(table["distance"].to_numpy(), [d for p in reference for _, d in p], rtol=1e-9)
    assert table["query_label"].to_pylist() == labels[table["query_id"].to_numpy()].tolist()
    assert table["neighbour_label"].to_pylist() == labels[table["neighbour_id"].to_numpy()].tolist()


@pytest.mark.parametrize("small_chunks", [False, True])
def test_hardest_samples_neighbours_match_sklearn(tmp_path, monkeypatch, small_chunks):
    if small_chunks:  # many sample blocks
        monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 8 * 4 * 7)  # 7 samples per chunk
        monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 8 * 4 * 7 * 2)
    hardest = np.argsort(-np.random.default_rng(0).permutation(300))  # as _ledger draws them
    missing = hardest[[1, 4]]  # two of the hardest have no embedding at the last tick: skipped
    ledger, hardness, features = _ledger(tmp_path / "m.ll", missing=missing)
    usable = ~np.isin(np.arange(300), missing)
    table = neighbours(ledger, "r", k=6)
    queries = [q for q in np.argsort(-hardness) if usable[q]][:20]
    _check(table, _reference(features, usable, queries, 6), queries, np.arange(300) % 5)
    # Explicit ids, any order, repeated; the user-array path gives the same numbers.
    ids = [17, 3, 17]
    table = neighbours(ledger, "r", ids=ids, k=4)
    _check(table, _reference(features, usable, ids, 4), ids, np.arange(300) % 5)
    user = features.copy()
    user[missing] = np.nan
    assert neighbours(ledger, "r", ids=ids, k=4, features=user).equals(table)


def test_duplicates_are_neighbours_at_zero_and_k_caps(tmp_path):
    ledger = ll.create(tmp_path / "d.ll", sample_ids=[10, 20, 30, 40])
    with ledger.run("r") as run:
        run.log([10, 20, 30, 40], loss=[1.0, 2.0, 3.0, 4.0], embedding=[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
        run.end_epoch()
    table = neighbours(ledger, "r", ids=[10], k=10)
    assert table["neighbour_id"].to_pylist() == [20, 30, 40]  # itself left out; only 3 others exist
    assert table["distance"].to_pylist() == [0.0, 5.0, 10.0]
    assert table["query_label"].null_count == 3 and table["neighbour_label"].null_count == 3  # no labels
    top = neighbours(ledger, "r", k=1, top=2)
    assert top["query_id"].to_pylist() == [40, 30] and top["neighbour_id"].to_pylist() == [30, 10]  # 10 and 20 tie: lower row


def test_neighbours_of_flipped_digits_carry_their_true_class(tmp_path):
    """Paper Fig. 5: the hardest samples' neighbours show what the sample really looks like."""
    pytest.importorskip("sklearn.linear_model")
    ledger, data = sgd_digits_ledger(tmp_path / "digits.ll", 8)
    table = neighbours(ledger, "sgd", k=8, top=20, features=data.x)
    query = table["query_id"].to_numpy().reshape(20, 8)[:, 0]
    neighbour_labels = table["neighbour_label"].to_numpy().reshape(20, 8)
    majority = np.array([np.bincount(row, minlength=10).argmax() for row in neighbour_labels])
    assert data.flipped[query].mean() >= 0.8
    # The neighbours vote for the true class, not the (flipped) label the sample was trained with.
    assert (majority == data.true[query]).mean() >= 0.8
    assert (majority != data.labels[query]).mean() >= 0.7


def test_errors_say_what_to_do(tmp_path):
    ledger, _, _ = _ledger(tmp_path / "e.ll", n=20, missing=[3])
    with pytest.raises(E.ShapeMismatchError, match="features need a vector per sample"):
        neighbours(ledger, "r", stream="loss")
    with pytest.raises(E.ShapeMismatchError, match="have no features .* e.g. ids \\[3\\]"):
        neighbours(ledger, "r", ids=[1, 3])
    with pytest.raises(E.ShapeMismatchError, match="one row per sample in ledger row order, N = 20"):
        neighbours(ledger, "r", features=np.zeros((19, 4)))
    with pytest.raises(E.ShapeMismatchError, match="k must be a positive integer"):
        neighbours(ledger, "r", k=0)
    with pytest.raises(E.UnknownStreamError, match="its streams are \\['embedding', 'loss'\\]: log features"):
        neighbours(ledger, "r", stream="features")
    with pytest.raises(E.UnknownSampleError):
        neighbours(ledger, "r", ids=[99])
