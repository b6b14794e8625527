"""Curriculum by action score (Arriaga, Palacio & Valdenegro-Toro, §4.5 and Fig. 13).

The paper sorts the training set by action, splits it into equally sized chunks "with a uniform distribution
across classes", trains a model from scratch on each chunk alone, keeps the chunk with the highest test
accuracy, and then repeatedly appends the remaining chunk that helps most; every size is compared against the
best of three random subsets of the same size.

- :func:`curriculum_chunks`: the chunks (class-balanced, easiest first).
- :func:`greedy_curriculum`: the greedy driver around a user's ``train_and_score(ids) -> accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import ShapeMismatchError
from ..scores import Dt

if TYPE_CHECKING:
    from ..ledger import Ledger

TrainAndScore = Callable[[np.ndarray], float]


def curriculum_chunks(
    ledger: Ledger,
    run: str,
    n_chunks: int,
    *,
    stream: str = "loss",
    ticks: Any = None,
    split: str | None = None,
    dt: Dt = "epoch",
) -> pa.Table:
    """Split the samples into ``n_chunks`` class-balanced chunks of increasing action (chunk 0 easiest).

    Each class's samples, sorted by action ascending (ties by row order), are cut into ``n_chunks``
    consecutive parts whose sizes differ by at most one; part ``j`` of every class goes to chunk ``j``. The
    classes' leftover samples (``n_c mod n_chunks``) are dealt to the chunks in turn, so the chunk sizes also
    differ by at most one and each class is spread evenly (its count per chunk differs by at most one).
    Without labels the ledger is one class.

    Parameters
    ----------
    n_chunks : number of chunks, 1 ≤ ``n_chunks`` ≤ number of candidate samples.
    stream, ticks, dt : the action is ``ledger.scores(run, stream, dt=dt, ticks=ticks)["action"]``.
    split : only samples of this split (e.g. ``"train"``); default every sample. Samples never observed in
        ``stream`` (NaN action) are left out.

    Returns
    -------
    pyarrow.Table, one row per candidate, by ``chunk`` then ``action`` ascending: ``sample_id`` (int64),
    ``label`` (int32, null when the ledger has no labels), ``action`` (float64, loss units × Δt), ``chunk``
    (int64, 0 = easiest). Memory: the run's scores (O(N)) plus one scan slab.

    >>> chunks = curriculum_chunks(ledger, "mlp-s0", 10, split="train")
    >>> easiest = chunks.filter(pc.equal(chunks["chunk"], 0))["sample_id"].to_numpy()
    """
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, (int, np.integer)) or n_chunks < 1:
        raise ShapeMismatchError(f"n_chunks must be a positive integer, got {n_chunks!r}")
    n_chunks = int(n_chunks)
    scores = ledger.scores(run, stream, dt=dt, ticks=ticks)
    action = scores["action"].to_numpy(zero_copy_only=False)
    candidates = ~np.isnan(action)
    if split is not None:
        candidates &= _in_split(ledger, split)
    rows = np.flatnonzero(candidates)
    if rows.size < n_chunks:
        raise ShapeMismatchError(
            f"{n_chunks} chunks need at least {n_chunks} samples observed in stream {stream!r}"
            f"{'' if split is None else f' of split {split!r}'}; run {run!r} has {rows.size}: ask for fewer chunks"
        )
    labels = ledger._samples.label
    groups = np.zeros(rows.size, np.int64) if labels is None else labels[rows].astype(np.int64)
    chunk = np.empty(rows.size, np.int64)
    start = 0  # the chunk that receives the next class's first leftover sample
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        members = members[np.argsort(action[rows[members]], kind="stable")]
        base, extra = divmod(members.size, n_chunks)
        sizes = np.full(n_chunks, base, np.int64)
        sizes[(start + np.arange(extra)) % n_chunks] += 1
        start = (start + extra) % n_chunks
        chunk[members] = np.repeat(np.arange(n_chunks), sizes)
    order = np.lexsort((rows, action[rows], chunk))
    picked = rows[order]
    return pa.table(
        {
            "sample_id": pa.array(ledger._samples.sample_id[picked], pa.int64()),
            "label": _label_array(ledger, picked),
            "action": pa.array(action[picked], pa.float64()),
            "chunk": pa.array(chunk[order], pa.int64()),
        }
    )


def greedy_curriculum(
    ledger: Ledger,
    run: str,
    train_and_score: TrainAndScore,
    *,
    n_chunks: int = 10,
    stream: str = "loss",
    n_random: int = 3,
    seed: int = 0,
    split: str | None = None,
    ticks: Any = None,
    dt: Dt = "epoch",
) -> pa.Table:
    """The paper's greedy curriculum (§4.5, Fig. 13) over the chunks of :func:`curriculum_chunks`.

    Step 1 scores every chunk alone and keeps the best; each later step scores the kept chunks plus each
    remaining chunk and keeps the best union, until every chunk is used. At every step ``n_random`` random
    subsets of the same size, drawn uniformly without replacement from all the chunks' samples
    (``numpy.random.default_rng(seed)``), are scored too; the best of them is the baseline. Ties go to the
    lowest chunk index.

    Parameters
    ----------
    train_and_score : the user's function: trains a model from scratch (the paper: same initial weights
        every time) on the samples ``ids`` and returns its accuracy (or any higher-is-better number) on a
        fixed test set. ``ids``: (size,) int64 sample ids of the ledger, sorted ascending (both for chunks and
        random subsets, so that the order does not favour either). It must return a finite real number.
    n_chunks, stream, split, ticks, dt : as in :func:`curriculum_chunks`.
    n_random : random subsets per step (0: no baseline, ``random_best_accuracy`` NaN).

    Returns
    -------
    pyarrow.Table, one row per step (``n_chunks`` rows): ``step`` (int64, from 1), ``chunks`` (list<int64>:
    the chunks kept, in the order they were added), ``size`` (int64, samples), ``accuracy`` (float64, of the
    kept chunks), ``mean_action`` (float64, mean action of their samples), ``random_best_accuracy``
    (float64). Cost: n_chunks·(n_chunks + 1)/2 + n_random·n_chunks calls of ``train_and_score``. Memory:
    O(N) besides what ``train_and_score`` uses.

    >>> def train_and_score(ids):
    ...     model = LogisticRegression(max_iter=200).fit(x[ids], y[ids])
    ...     return model.score(x_test, y_test)
    >>> steps = greedy_curriculum(ledger, "mlp-s0", train_and_score, n_chunks=10, split="train")
    """
    if not callable(train_and_score):
        raise ShapeMismatchError(
            f"train_and_score must be a function ids -> accuracy, got {type(train_and_score).__name__}"
        )
    if isinstance(n_random, bool) or not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise ShapeMismatchError(f"n_random must be a non-negative integer, got {n_random!r}")
    table = curriculum_chunks(ledger, run, n_chunks, stream=stream, ticks=ticks, split=split, dt=dt)
    ids = table["sample_id"].to_numpy()
    action = table["action"].to_numpy()
    chunk = table["chunk"].to_numpy()
    rng = np.random.default_rng(seed)

    def score(chosen: np.ndarray) -> float:
        value = train_and_score(np.sort(chosen))
        try:
            result = float(value)
        except (TypeError, ValueError) as err:
            raise ShapeMismatchError(
                f"train_and_score returned {value!r}; return the accuracy as a float"
            ) from err
        if not np.isfinite(result):
            raise ShapeMismatchError(
                f"train_and_score returned {result} for {chosen.size} samples; return a finite accuracy"
            )
        return result

    kept: list[int] = []
    remaining = list(range(int(n_chunks)))
    out: dict[str, list[Any]] = {key: [] for key in
                                 ("step", "chunks", "size", "accuracy", "mean_action", "random_best_accuracy")}
    for step in range(1, int(n_chunks) + 1):
        accuracies = [score(ids[np.isin(chunk, [*kept, j])]) for j in remaining]
        best = int(np.argmax(accuracies))
        kept.append(remaining.pop(best))
        in_kept = np.isin(chunk, kept)
        size = int(in_kept.sum())
        randoms = [score(rng.choice(ids, size, replace=False)) for _ in range(n_random)]
        out["step"].append(step)
        out["chunks"].append(list(kept))
        out["size"].append(size)
        out["accuracy"].append(accuracies[best])
        out["mean_action"].append(float(action[in_kept].mean()))
        out["random_best_accuracy"].append(max(randoms) if randoms else float("nan"))
    schema = pa.schema([("step", pa.int64()), ("chunks", pa.list_(pa.int64())), ("size", pa.int64()),
                        ("accuracy", pa.float64()), ("mean_action", pa.float64()),
                        ("random_best_accuracy", pa.float64())])
    return pa.table(out, schema=schema)


# --- helpers shared by the analyses of this package ------------------------------------------------------
def _in_split(ledger: Ledger, split: str) -> np.ndarray:
    """(N,) bool: the samples of ``split``; raises when the ledger has no such split."""
    samples = ledger._samples
    names = list(samples.splits or ())
    if samples.split is None or split not in names:
        raise ShapeMismatchError(
            f"the ledger has no split {split!r} (its splits: {names}); pass one of those, or split=None for "
            "every sample"
        )
    return samples.split == names.index(split)


def _label_array(ledger: Ledger, rows: np.ndarray) -> pa.Array:
    """The labels of ``rows`` as int32, all null when the ledger has no labels."""
    labels = ledger._samples.label
    if labels is None:
        return pa.nulls(rows.size, pa.int32())
    return pa.array(labels[rows], pa.int32())
