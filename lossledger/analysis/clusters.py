"""k-means of per-sample loss curves (Arriaga, Palacio & Valdenegro-Toro, Fig. 2), out of core.

The paper clusters the loss curves of a CIFAR10 model with k = 3 and finds three shapes (increasing, slowly
decreasing or constant, decreasing: hard, medium, easy), shown as the cluster centres with their closest
curves. :func:`cluster_curves` does the same for a run of any size: curves are read block by block from the
stream (chunk by chunk, decoded in threads by :mod:`lossledger._scan`) and gathered into batches of ``batch_size`` samples, and
k-means runs over those batches (mini-batch k-means); the whole (samples × ticks) matrix is never in memory
unless ``batch_size`` covers every sample.

The algorithm, one pass over the batches per iteration:

1. Init: k-means++ (Arthur & Vassilvitskii 2007) on ``min(batch_size, n)`` curves drawn uniformly at random
   (``seed``) from the ``n`` observed samples, or the ``init`` centres given.
2. Each batch is assigned to the nearest centres (squared Euclidean distance), then each centre becomes the
   running mean of every curve assigned to it so far in this pass (Sculley's mini-batch update with
   per-centre learning rate 1 / count, the counts restarting at each pass). A centre that receives no curve
   in a pass keeps its place.
3. The passes stop when at most ``tol`` × n samples changed cluster in a pass, or after ``max_iter`` passes.
4. A final pass assigns every sample to its nearest final centre, with its distance, and keeps the
   ``n_members`` closest curves of each centre.

With ``batch_size`` ≥ n every pass is one batch, and the result is exactly Lloyd's algorithm from the same
init. Clusters are then numbered by the mean of their centre, ascending: with ``normalize`` on a loss stream,
cluster 0 holds the curves that fall fastest (easy) and cluster k-1 those that stay high (hard).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .. import _scan
from .._arrays import tick_positions
from .._commit import open_stream, read_run_attrs
from .._scan import ChunkSource, read_chunks
from ..errors import ShapeMismatchError, UnknownStreamError
from .curriculum import _label_array

if TYPE_CHECKING:
    import zarr

    from ..ledger import Ledger


@dataclass(frozen=True)
class Clusters:
    """The result of :func:`cluster_curves`.

    ``assignments``: one row per sample (row order): ``sample_id`` (int64), ``label`` (int32, null without
    labels), ``cluster`` (int64, null for a sample never observed), ``distance`` (float64, Euclidean distance
    of its prepared curve to its centre; NaN when never observed).
    ``centres``: (k, T) float64, in the units of the prepared curves (stream units, or fractions of each
    curve's peak with ``normalize``), T = the number of ticks used.
    ``members``: the ``n_members`` samples closest to each centre (paper Fig. 2): ``cluster``, ``rank``
    (1 = closest), ``sample_id``, ``distance``; by cluster then rank.
    ``ticks``: (T,) int64 tick indices used; ``inertia``: sum of squared distances; ``n_iter``: passes run.
    """

    assignments: pa.Table
    centres: np.ndarray
    members: pa.Table
    ticks: np.ndarray
    inertia: float
    n_iter: int


def cluster_curves(
    ledger: Ledger,
    run: str,
    stream: str = "loss",
    *,
    k: int = 3,
    normalize: bool = True,
    ticks: Any = None,
    batch_size: int = 4096,
    n_members: int = 5,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: Any = None,
) -> Clusters:
    """k-means of the per-sample curves of ``stream`` in ``run`` (see the module docstring for the algorithm).

    Parameters
    ----------
    stream : a scalar stream (one value per sample and tick), e.g. ``"loss"``.
    k : number of clusters (paper: 3); at most the number of observed samples.
    normalize : divide each curve by its largest absolute value, so that curves are compared by shape (a
        fraction of their own peak) rather than scale; an all-zero curve stays zero. ``False``: raw values.
    ticks : a window of ticks (slice or indices, as in :meth:`Ledger.scores`); each tick counts once, in
        increasing order. Default: every committed tick.
    batch_size : samples per mini-batch.
    n_members : closest samples kept per centre (fewer if a cluster is smaller).
    seed : seeds the init sample and k-means++.
    max_iter : most passes over the data; ``tol``: stop when at most ``tol`` × n samples changed cluster in a
        pass (0: only when none did).
    init : optional (k, T) initial centres in prepared-curve units, instead of k-means++.

    Missing values: a tick at which a sample was not logged (NaN) is filled by linear interpolation between
    the sample's neighbouring observed ticks (``numpy.interp``: the nearest observed value before the first
    or after the last), before ``normalize``. A sample never observed in the ticks is left out (``cluster``
    null, ``distance`` NaN) and counts toward nothing.

    Memory: one block of raw curves within half the scan budget (``lossledger._scan.SCAN_BUDGET_BYTES``,
    ≤ 32 MB), up to 9 decoded chunks in flight (~1 MiB each), one batch of ``batch_size`` × T float64 values
    with temporaries of a few times its size, the k-means++ sample of up to ``batch_size`` curves (the same
    size), and ~40 bytes per sample (assignments, distances, the result). Never N × T unless ``batch_size``
    ≥ N, in which case the one batch is kept between passes instead of being read again. I/O: a pass decodes
    each chunk once per block of its chunk column: ⌈samples per chunk / block width⌉ times.

    >>> clusters = cluster_curves(ledger, "mlp-s0", k=3)
    >>> clusters.members.filter(pc.equal(clusters.members["cluster"], 2))  # the hard curves, as in Fig. 2
    """
    for name, value, least in (("k", k, 1), ("batch_size", batch_size, 1), ("n_members", n_members, 0),
                               ("max_iter", max_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ShapeMismatchError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if not 0.0 <= float(tol) < 1.0:
        raise ShapeMismatchError(f"tol is a fraction of the samples in [0, 1), got {tol!r}")
    reader = _CurveReader(ledger, run, stream, ticks, int(batch_size), normalize)
    n, n_ticks = ledger.n_samples, reader.tick_index.size
    rng = np.random.default_rng(seed)
    if init is None:
        sample, n_valid = reader.sample(int(batch_size), rng)
        if n_valid < k:
            raise ShapeMismatchError(
                f"k={k} clusters need at least {k} samples observed in stream {stream!r}; run {run!r} has "
                f"{n_valid}: ask for fewer clusters"
            )
        centres = _kmeans_plus_plus(sample, int(k), rng)
    else:
        centres = np.array(init, dtype=np.float64, copy=True)
        if centres.shape != (k, n_ticks) or not np.isfinite(centres).all():
            raise ShapeMismatchError(
                f"init must be finite centres of shape (k, ticks) = ({k}, {n_ticks}), got shape {centres.shape}"
            )
    labels = np.full(n, -1, np.int64)
    n_iter = 0
    for n_iter in range(1, int(max_iter) + 1):
        sums = np.zeros_like(centres)
        counts = np.zeros(k, np.int64)
        changed = n_valid = 0
        for rows, x in reader.batches():
            assigned = _nearest(x, centres)[0]
            changed += int((assigned != labels[rows]).sum())
            n_valid += rows.size
            labels[rows] = assigned
            counts += np.bincount(assigned, minlength=k)
            np.add.at(sums, assigned, x)
            moved = counts > 0
            centres[moved] = sums[moved] / counts[moved, None]
        if n_valid < k:
            raise ShapeMismatchError(
                f"k={k} clusters need at least {k} samples observed in stream {stream!r}; run {run!r} has "
                f"{n_valid}: ask for fewer clusters"
            )
        if changed <= tol * n_valid:
            break
    # Number the clusters by the mean of their centre (easy, falling curves first).
    order = np.argsort(centres.mean(axis=1), kind="stable")
    centres = centres[order]
    cluster = np.full(n, -1, np.int64)
    distance = np.full(n, np.nan)
    best: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0, np.int64))] * k
    for rows, x in reader.batches():
        assigned = _nearest(x, centres)[0]
        cluster[rows] = assigned
        distance[rows] = np.sqrt(((x - centres[assigned]) ** 2).sum(axis=1))
        for j in range(k):
            mine = assigned == j
            d = np.concatenate([best[j][0], distance[rows[mine]]])
            r = np.concatenate([best[j][1], rows[mine]])
            keep = np.lexsort((r, d))[: int(n_members)]
            best[j] = (d[keep], r[keep])
    observed = cluster >= 0
    sample_ids = ledger._samples.sample_id
    assignments = pa.table(
        {
            "sample_id": pa.array(sample_ids, pa.int64()),
            "label": _label_array(ledger, np.arange(n)),
            "cluster": pa.array(cluster, pa.int64(), mask=~observed),
            "distance": pa.array(distance, pa.float64()),
        }
    )
    members = pa.table(
        {
            "cluster": pa.array(np.concatenate([np.full(b[1].size, j) for j, b in enumerate(best)]), pa.int64()),
            "rank": pa.array(np.concatenate([np.arange(1, b[1].size + 1) for b in best]), pa.int64()),
            "sample_id": pa.array(sample_ids[np.concatenate([b[1] for b in best])], pa.int64()),
            "distance": pa.array(np.concatenate([b[0] for b in best]), pa.float64()),
        }
    )
    inertia = float(np.sum(distance[observed] ** 2))
    return Clusters(assignments, centres, members, reader.tick_index.copy(), inertia, n_iter)


# --- reading curves ---------------------------------------------------------------------------------------
class _CurveReader:
    """Batches of prepared curves (interpolated, normalized) of observed samples, in row order."""

    def __init__(self, ledger: Ledger, run: str, stream: str, ticks: Any, batch_size: int, normalize: bool) -> None:
        commit = read_run_attrs(ledger._io, run)["commit"]
        if stream not in commit["streams"]:
            raise UnknownStreamError(
                f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}"
            )
        if commit["streams"][stream]["element_shape"]:
            raise ShapeMismatchError(
                f"stream {stream!r} has elements of shape {tuple(commit['streams'][stream]['element_shape'])}; "
                "curves are clustered for scalar streams (one value per sample and tick) such as 'loss'"
            )
        self.tick_index = np.unique(tick_positions(ticks, commit["ticks"]))
        if self.tick_index.size == 0:
            raise ShapeMismatchError(f"run {run!r} has no committed ticks in the window {ticks!r} to cluster")
        self.array: zarr.Array = open_stream(ledger._io, run, stream, commit, ledger.n_samples)
        self.batch_size = batch_size
        self.normalize = normalize
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._single = batch_size >= ledger.n_samples

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(rows, curves)``: (b,) int64 rows of the observed samples, (b, T) float64 prepared curves."""
        if self._cache is not None:
            yield from self._cache
            return
        cache: list[tuple[np.ndarray, np.ndarray]] | None = [] if self._single else None
        for lo, raw in self._raw_batches():
            valid, x = _prepare(raw, self.normalize)
            item = (lo + np.flatnonzero(valid), x)
            if cache is not None:
                cache.append(item)
            yield item
        self._cache = cache

    def sample(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A uniform random sample (without replacement) of ``size`` prepared curves, and the number observed.

        Each observed sample gets a random key; the ``size`` smallest keys win (kept batch by batch).
        """
        keys = rng.random(self.array.shape[1])
        best_keys, best = np.empty(0), np.empty((0, self.tick_index.size))
        n_valid = 0
        for rows, x in self.batches():
            n_valid += rows.size
            merged_keys = np.concatenate([best_keys, keys[rows]])
            keep = np.argsort(merged_keys, kind="stable")[:size]
            best_keys, best = merged_keys[keep], np.concatenate([best, x])[keep]
        return best, n_valid

    def _raw_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, (b, T) float32 values)`` for consecutive rows, b = batch_size (the last less).

        Curves are gathered in blocks of ``width`` samples of one chunk column, all ticks at once: width × T
        float32 values within half the scan budget. A chunk column wider than a block is decoded once per
        block (chunks hold ~1 MiB of one tick; a long run trades decoding again for memory).
        """
        n_ticks = self.tick_index.size
        source = ChunkSource(self.array)
        width = int(max(1, min(source.per_chunk, _scan.SCAN_BUDGET_BYTES // 2 // (4 * n_ticks))))
        parts: list[np.ndarray] = []
        filled, first = 0, 0
        for col in range(source.n_cols):
            for a in range(0, source.width(col), width):
                b = min(source.width(col), a + width)
                block = np.empty((b - a, n_ticks), np.float32)
                keys = [(int(t), col) for t in self.tick_index]
                for i, (_, values) in enumerate(read_chunks(source, keys)):
                    block[:, i] = values[a:b]
                start = 0
                while start < block.shape[0]:
                    take = min(self.batch_size - filled, block.shape[0] - start)
                    parts.append(block[start : start + take])
                    filled += take
                    start += take
                    if filled == self.batch_size:
                        yield first, np.concatenate(parts) if len(parts) > 1 else parts[0]
                        first += filled
                        parts, filled = [], 0
        if parts:
            yield first, np.concatenate(parts) if len(parts) > 1 else parts[0]


def _prepare(raw: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(b,) mask of rows with an observed tick, and those rows' curves: NaN interpolated, optionally normalized.

    The interpolation is ``numpy.interp`` over each row's observed ticks, vectorized over rows.
    """
    x = raw.astype(np.float64)
    observed = ~np.isnan(x)
    valid = np.asarray(observed.any(axis=1))
    x, observed = x[valid], observed[valid]
    if not observed.all():
        n_ticks = x.shape[1]
        t = np.arange(n_ticks)
        before = np.maximum.accumulate(np.where(observed, t, -1), axis=1)
        after = np.minimum.accumulate(np.where(observed, t, n_ticks)[:, ::-1], axis=1)[:, ::-1]
        lo = np.where(before < 0, after, before)
        hi = np.where(after >= n_ticks, before, after)
        x_lo, x_hi = np.take_along_axis(x, lo, axis=1), np.take_along_axis(x, hi, axis=1)
        span = hi - lo
        weight = np.divide(t - lo, span, out=np.zeros(x.shape), where=span > 0)
        x = x_lo + weight * (x_hi - x_lo)
    if normalize:
        peak = np.abs(x).max(axis=1, keepdims=True)
        x = np.divide(x, peak, out=x, where=peak > 0)
    return valid, x


# --- k-means steps --------------------------------------------------------------------------------------------
def _nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``x``: the index of its nearest centre and the squared distance to it."""
    d2 = (x * x).sum(axis=1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(axis=1)[None, :]
    assigned = np.argmin(d2, axis=1)
    return assigned, np.maximum(d2[np.arange(x.shape[0]), assigned], 0.0)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k centres chosen by k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
    centres = np.empty((k, x.shape[1]))
    first = int(rng.integers(x.shape[0]))
    centres[0] = x[first]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = d2.sum()
        pick = int(rng.choice(x.shape[0], p=d2 / total)) if total > 0 else int(rng.integers(x.shape[0]))
        centres[j] = x[pick]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(axis=1))
    return centres
