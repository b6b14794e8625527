"""lossledger.analysis.clusters: k-means of loss curves (paper Fig. 2) vs numpy Lloyd's and scikit-learn."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from _ledgers import ledger_from_losses

from lossledger import errors as E
from lossledger.analysis.clusters import cluster_curves

sklearn_cluster = pytest.importorskip("sklearn.cluster")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _shapes(n, n_ticks=12, seed=0, missing=0.0):
    """(T, N) loss curves of three shapes (falling, flat, rising) with noise and scale; the true shape per
    sample; a fraction ``missing`` of the values not logged."""
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 3, n)
    t = np.linspace(0, 1, n_ticks)[:, None]
    curves = np.where(shape == 0, np.exp(-5 * t), np.where(shape == 1, 0.8 + 0 * t, 0.1 + 0.9 * t))
    losses = curves * rng.uniform(0.5, 3.0, n) + rng.normal(0, 0.05, (n_ticks, n)) ** 2
    losses[rng.random(losses.shape) < missing] = np.nan
    return losses, shape


def _prepare(losses, normalize):
    """Reference preparation: numpy.interp over each sample's observed ticks, then divide by max |x|."""
    x = losses.T.astype(np.float32).astype(np.float64)
    t = np.arange(x.shape[1])
    rows = []
    for i, row in enumerate(x):
        seen = ~np.isnan(row)
        if seen.any():
            filled = np.interp(t, t[seen], row[seen])
            if normalize and np.abs(filled).max() > 0:
                filled = filled / np.abs(filled).max()
            rows.append((i, filled))
    return np.array([i for i, _ in rows]), np.array([r for _, r in rows])


def _lloyd(x, centres, max_iter=100):
    """Plain Lloyd's algorithm; an empty cluster keeps its centre. Returns labels, centres."""
    labels = None
    for _ in range(max_iter):
        d = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)
        new = d.argmin(axis=1)
        centres = np.array([x[new == j].mean(axis=0) if (new == j).any() else centres[j] for j in range(len(centres))])
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
    return labels, centres


@pytest.mark.parametrize("normalize", [True, False])
def test_one_batch_is_lloyds_algorithm(tmp_path, monkeypatch, normalize):
    # Tiny chunks and slabs: the curves come from many sample blocks, one tick per slab.
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 64)  # 16 samples per chunk
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 200)
    losses, shape = _shapes(150, missing=0.15)
    losses[:, 7] = np.nan  # never observed
    losses[:3, 8] = np.nan  # observed only later: the first value extends backwards
    ledger = ledger_from_losses(tmp_path / "c.ll", losses, labels=np.arange(150) % 4)
    rows, x = _prepare(losses, normalize)
    init = x[[int(np.flatnonzero(shape[rows] == j)[0]) for j in range(3)]]
    got = cluster_curves(ledger, "r", k=3, normalize=normalize, batch_size=1000, init=init, n_members=4)

    labels, centres = _lloyd(x, init.copy())
    order = np.argsort(centres.mean(axis=1), kind="stable")
    relabel = np.argsort(order)
    np.testing.assert_allclose(got.centres, centres[order], rtol=1e-10, atol=1e-12)
    cluster = got.assignments["cluster"].to_numpy(zero_copy_only=False)
    assert got.assignments["cluster"].null_count == 1 and got.assignments["cluster"][7].as_py() is None
    np.testing.assert_array_equal(cluster[rows], relabel[labels])
    distance = np.linalg.norm(x - centres[labels], axis=1)
    np.testing.assert_allclose(got.assignments["distance"].to_numpy()[rows], distance, rtol=1e-9)
    assert np.isnan(got.assignments["distance"][7].as_py())
    assert got.inertia == pytest.approx((distance**2).sum(), rel=1e-9)
    assert got.assignments["sample_id"].to_pylist() == list(range(150))
    assert got.assignments["label"].to_pylist() == (np.arange(150) % 4).tolist()
    assert got.ticks.tolist() == list(range(12))
    # Members: the 4 closest per cluster, by distance.
    for j in range(3):
        mine = rows[relabel[labels] == j]
        closest = mine[np.argsort(distance[relabel[labels] == j], kind="stable")[:4]]
        members = got.members.filter(got.members["cluster"].to_numpy() == j)
        assert members["sample_id"].to_pylist() == closest.tolist()
        assert members["rank"].to_pylist() == list(range(1, min(4, mine.size) + 1))
        assert mine.size > 0
        np.testing.assert_allclose(members["distance"].to_numpy(), np.sort(distance[relabel[labels] == j])[:4])


def test_mini_batches_match_sklearn_and_find_the_shapes(tmp_path):
    losses, shape = _shapes(3000, seed=1)
    ledger = ledger_from_losses(tmp_path / "m.ll", losses)
    _, x = _prepare(losses, True)
    reference = sklearn_cluster.KMeans(3, n_init=5, random_state=0).fit(x)
    got = cluster_curves(ledger, "r", k=3, batch_size=256, seed=3)
    assert got.inertia <= reference.inertia_ * 1.01
    cluster = got.assignments["cluster"].to_numpy()
    assert sklearn_metrics.adjusted_rand_score(shape, cluster) > 0.99
    # Numbered by centre mean: falling (mean ~0.3) < rising (~0.5) < flat (1.0).
    assert [np.bincount(shape[cluster == j]).argmax() for j in range(3)] == [0, 2, 1]
    assert got.centres.shape == (3, 12) and got.n_iter >= 1
    # One batch with k-means++ seeding: as good as scikit-learn's best of 5 inits.
    whole = cluster_curves(ledger, "r", k=3, batch_size=4096, seed=0)
    assert whole.inertia == pytest.approx(reference.inertia_, rel=1e-6)


def test_window_and_raw_values(tmp_path):
    losses, _ = _shapes(200, seed=2)
    ledger = ledger_from_losses(tmp_path / "w.ll", losses)
    got = cluster_curves(ledger, "r", k=2, normalize=False, ticks=[5, 1, 1, 3], init=[[0.0] * 3, [1.0] * 3])
    assert got.ticks.tolist() == [1, 3, 5]
    x = losses[[1, 3, 5]].T.astype(np.float32).astype(np.float64)
    _, centres = _lloyd(x, np.array([[0.0] * 3, [1.0] * 3]))
    np.testing.assert_allclose(got.centres, centres[np.argsort(centres.mean(axis=1))], rtol=1e-10)


def test_memory_is_one_batch_not_the_matrix(tmp_path, monkeypatch):
    n, n_ticks = 20_000, 100
    losses = np.random.default_rng(0).random((n_ticks, n))
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 4096)  # 1024 samples per chunk
    ledger = ledger_from_losses(tmp_path / "big.ll", losses)
    matrix = n * n_ticks * 8  # the float64 (samples x ticks) matrix: 16 MB
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 1 << 20)  # blocks of 1024 curves: 400 KB
    cluster_curves(ledger, "r", batch_size=500, max_iter=2)  # warm imports and caches
    tracemalloc.start()
    try:
        got = cluster_curves(ledger, "r", batch_size=500, max_iter=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.n_iter == 3
    assert peak < matrix / 3, f"peak {peak / 1e6:.1f} MB for a {matrix / 1e6:.1f} MB matrix"


def test_errors_say_what_to_do(tmp_path):
    ledger = ledger_from_losses(tmp_path / "e.ll", np.ones((3, 4)))
    with ledger.run("img") as run:
        run.log([0, 1], pixel=np.ones((2, 2, 2)))
        run.end_epoch()
    with pytest.raises(E.ShapeMismatchError, match="ask for fewer clusters"):
        cluster_curves(ledger, "r", k=5)
    with pytest.raises(E.ShapeMismatchError, match="scalar streams"):
        cluster_curves(ledger, "img", "pixel")
    with pytest.raises(E.UnknownStreamError, match="its streams are \\['loss'\\]"):
        cluster_curves(ledger, "r", "prob")
    with pytest.raises(E.ShapeMismatchError, match="shape \\(k, ticks\\) = \\(2, 3\\)"):
        cluster_curves(ledger, "r", k=2, init=np.zeros((2, 4)))
    with pytest.raises(E.ShapeMismatchError, match="k must be an integer"):
        cluster_curves(ledger, "r", k=0)
    with pytest.raises(E.ShapeMismatchError, match="no committed ticks"):
        cluster_curves(ledger, "r", ticks=slice(5, None))
