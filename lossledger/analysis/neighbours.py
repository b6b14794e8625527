"""Nearest neighbours of the hardest samples in a feature space (Arriaga, Palacio & Valdenegro-Toro, Fig. 5).

The paper looks for biases by computing, for each of the hardest samples, its closest samples in the model's
feature space (the L2 norm of the last feature layer before the prediction, a 256-d vector for their ResNet):
a hard *cat* whose neighbours are all *ships* shows what the model confused it with. :func:`neighbours` does
this exactly (brute force, Euclidean) over the features logged in a stream (element shape (D,), e.g. by an
adapter's ``embedding`` stream) or over a user array, streaming the candidates block by block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .._arrays import as_ids, tick_positions, to_numpy
from .._commit import open_stream, read_run_attrs
from .._scan import scan
from ..errors import ShapeMismatchError, UnknownStreamError
from .curriculum import _label_array

if TYPE_CHECKING:
    import zarr

    from ..ledger import Ledger

#: Candidate rows per block of a user ``features`` array.
FEATURE_BLOCK_ROWS = 8192


def neighbours(
    ledger: Ledger,
    run: str,
    *,
    ids: Any = None,
    k: int = 5,
    stream: str = "embedding",
    features: Any = None,
    top: int = 20,
    tick: int = -1,
    score_stream: str = "loss",
) -> pa.Table:
    """The ``k`` nearest neighbours (exact, Euclidean) of each query sample in a feature space.

    Parameters
    ----------
    ids : query sample ids (any order, repeats allowed); default the ``top`` hardest samples, by action of
        ``score_stream`` in ``run`` (ties by sample id), that have features.
    k : neighbours per query; fewer when fewer other samples have features.
    stream : the features: the values of this stream at ``tick`` (default the last committed tick), element
        shape (D,) (or any element shape, flattened). Samples not logged at that tick have no features.
    features : instead of ``stream``, a user array (N, D) (or (N, ...), flattened) in ledger row order
        (``ledger.sample_ids``); rows with a NaN or infinite value have no features.
    top : number of default queries.

    Distances are computed in float64 as ‖q‖² + ‖x‖² − 2 q·x to rank candidates, and the reported
    ``distance`` (in feature units) is recomputed directly as ‖q − x‖. A query is never its own neighbour;
    other samples at distance 0 are. Ties go to the lower row.

    Returns
    -------
    pyarrow.Table, queries in order, then rank: ``query_id`` (int64), ``query_label`` (int32), ``rank``
    (int64, 1 = nearest), ``neighbour_id`` (int64), ``neighbour_label`` (int32), ``distance`` (float64).
    Labels are null when the ledger has none. Memory: one scan slab (≤ 64 MB) or ``FEATURE_BLOCK_ROWS`` rows
    of ``features`` as float64, plus queries × block distances and queries × k results; never N × D for a
    stream (a user array is the caller's).

    >>> hard = neighbours(ledger, "resnet-s0", k=8, top=5)  # Fig. 5: the 5 hardest and their 8 neighbours
    """
    for name, value in (("k", k), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ShapeMismatchError(f"{name} must be a positive integer, got {value!r}")
    source = _Features(ledger, run, stream, tick, features)
    if ids is None:
        rows, queries = _hardest_with_features(ledger, run, score_stream, int(top), source)
    else:
        rows = ledger._index.rows(as_ids(ids))
        queries = source.rows(rows)
        missing = ~np.isfinite(queries).all(axis=1)
        if missing.any():
            bad = ledger._samples.sample_id[rows[missing]]
            raise ShapeMismatchError(
                f"{bad.size} query sample(s) have no features ({source.describe}), e.g. ids {bad[:5].tolist()}; "
                "query samples that were logged there, or pass features= for every sample"
            )
    q = rows.size
    best_d2 = np.full((q, 0), np.inf)
    best_row = np.full((q, 0), -1, np.int64)
    query_norm = (queries * queries).sum(axis=1)
    for lo, block in source.blocks():
        usable = np.isfinite(block).all(axis=1)
        if not usable.any():
            continue
        x = block[usable]
        cand = lo + np.flatnonzero(usable)
        d2 = query_norm[:, None] + (x * x).sum(axis=1)[None, :] - 2.0 * queries @ x.T
        d2[rows[:, None] == cand[None, :]] = np.inf  # a query is not its own neighbour
        # Keep this block's k best per query, with exact distances, then merge with the best so far.
        take = min(int(k), cand.size)
        part = np.argpartition(d2, take - 1, axis=1)[:, :take] if take < cand.size else np.tile(
            np.arange(cand.size), (q, 1))
        exact = ((queries[:, None, :] - x[part]) ** 2).sum(axis=2)
        exact[np.take_along_axis(d2, part, axis=1) == np.inf] = np.inf
        d_all = np.concatenate([best_d2, exact], axis=1)
        r_all = np.concatenate([best_row, cand[part]], axis=1)
        keep = np.lexsort((r_all, d_all), axis=1)[:, : int(k)]
        best_d2 = np.take_along_axis(d_all, keep, axis=1)
        best_row = np.take_along_axis(r_all, keep, axis=1)
    found = np.isfinite(best_d2)
    per_query = found.sum(axis=1)
    query_rows = np.repeat(rows, per_query)
    neighbour_rows = best_row[found]
    sample_ids = ledger._samples.sample_id
    return pa.table(
        {
            "query_id": pa.array(sample_ids[query_rows], pa.int64()),
            "query_label": _label_array(ledger, query_rows),
            "rank": pa.array(np.concatenate([np.arange(1, c + 1) for c in per_query]) if q else [], pa.int64()),
            "neighbour_id": pa.array(sample_ids[neighbour_rows], pa.int64()),
            "neighbour_label": _label_array(ledger, neighbour_rows),
            "distance": pa.array(np.sqrt(best_d2[found]), pa.float64()),
        }
    )


def _hardest_with_features(
    ledger: Ledger, run: str, score_stream: str, top: int, source: _Features
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and features of the ``top`` hardest samples (action of ``score_stream``) that have features."""
    action = ledger.scores(run, score_stream)["action"].to_numpy(zero_copy_only=False)
    seen = np.flatnonzero(~np.isnan(action))
    order = seen[np.lexsort((ledger._samples.sample_id[seen], -action[seen]))]
    rows, vectors = [], []
    for lo in range(0, order.size, 4 * top):
        candidates = order[lo : lo + 4 * top]
        values = source.rows(candidates)
        usable = np.isfinite(values).all(axis=1)
        rows.append(candidates[usable])
        vectors.append(values[usable])
        if sum(r.size for r in rows) >= top:
            break
    if not rows or sum(r.size for r in rows) == 0:
        raise ShapeMismatchError(
            f"no sample observed in {score_stream!r} of run {run!r} has features ({source.describe}); log the "
            "features at that tick, pass features=, or give ids="
        )
    return np.concatenate(rows)[:top], np.concatenate(vectors)[:top]


class _Features:
    """The feature vectors of every sample: a stream at one tick, or a user array; float64, NaN = none."""

    def __init__(self, ledger: Ledger, run: str, stream: str, tick: int, features: Any) -> None:
        self._ledger = ledger
        n = ledger.n_samples
        if features is not None:
            array = to_numpy(features, "features")
            if array.ndim < 2 or array.shape[0] != n or array.dtype.kind not in "fiub":
                raise ShapeMismatchError(
                    f"features must be a real array (N, D) with one row per sample in ledger row order, N = {n}; "
                    f"got shape {array.shape} and dtype {array.dtype}"
                )
            self._user: np.ndarray | None = array.reshape(n, -1)
            self.describe = "features= rows with a NaN or infinite value"
            return
        self._user = None
        self._array, self._tick, self.element = stream_at_tick(
            ledger, run, stream, tick, need_element=True,
            hint=f"log features with run.log(ids, {stream}=penultimate_layer_output), or pass features=",
        )
        self.describe = f"stream {stream!r} at tick {self._tick}"

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float64 features of ``rows``."""
        if self._user is not None:
            return self._user[rows].astype(np.float64)
        if rows.size == 0:
            return np.empty((0, int(np.prod(self.element))))
        unique, inverse = np.unique(rows, return_inverse=True)
        picked = self._array.get_orthogonal_selection((self._tick, unique) + (slice(None),) * len(self.element))
        return np.asarray(picked, np.float64).reshape(unique.size, -1)[inverse]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first row, (b, D) float64 features)`` for consecutive blocks of rows."""
        if self._user is not None:
            for lo in range(0, self._user.shape[0], FEATURE_BLOCK_ROWS):
                yield lo, self._user[lo : lo + FEATURE_BLOCK_ROWS].astype(np.float64)
            return
        for slab in scan(self._array, np.array([self._tick])):
            yield slab.lo, slab.values[0].reshape(slab.hi - slab.lo, -1).astype(np.float64)


def stream_at_tick(
    ledger: Ledger, run: str, stream: str, tick: int, *, need_element: bool, hint: str
) -> tuple[zarr.Array, int, tuple[int, ...]]:
    """The array of ``stream`` in ``run``, the committed tick ``tick`` (negative from the end) and the element
    shape; raises if the stream is missing (the message ends with ``hint``: what to log), has no ticks, or is
    scalar (``need_element``) or not."""
    commit = read_run_attrs(ledger._io, run)["commit"]
    if stream not in commit["streams"]:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(commit['streams'])}: {hint}"
        )
    element = tuple(int(d) for d in commit["streams"][stream]["element_shape"])
    if need_element and not element:
        raise ShapeMismatchError(
            f"stream {stream!r} is scalar; features need a vector per sample: log e.g. "
            "run.log(ids, embedding=penultimate_layer_output) (element shape (D,)), or pass features="
        )
    if not need_element and element:
        raise ShapeMismatchError(f"stream {stream!r} has elements of shape {element}; a scalar stream is needed")
    if commit["ticks"] == 0:
        raise ShapeMismatchError(f"run {run!r} has no committed ticks yet; call run.end_epoch() first")
    position = int(tick_positions([tick], commit["ticks"])[0])
    return open_stream(ledger._io, run, stream, commit, ledger.n_samples), position, element
