"""Training-dynamics scores from the literature, computed out of core from a ledger's streams.

Each function reads one run's committed ticks block by block (:func:`lossledger._scan.scan`) and returns a
``pyarrow.Table`` with one row per sample in row order: ``sample_id``, ``label`` (if the ledger has labels),
then its score columns. Memory: one scan slab (``lossledger._scan.SCAN_BUDGET_BYTES``, default 64 MB) and
numpy temporaries of a few times its size (float64 copies), a few arrays per sample of the current block, and
the result (about 8 bytes per sample and column); never the whole (ticks x samples) matrix.

Conventions shared by every function:

- A tick at which a sample has no value (NaN: not logged) is skipped. It is neither correct nor incorrect and
  does not break a sequence of consecutive observations; ``n_obs`` counts the ticks that were observed.
- A sample never observed gets ``n_obs = 0``, NaN in float columns and null in integer columns (never 0).
- ``ticks=`` (a slice or tick indices, as in :meth:`Ledger.scores`) restricts the scores to a window; each tick
  counts once and the ticks are taken in increasing order. Cartography's ``--burn_out E`` is
  ``ticks=slice(0, E)``; the AUM paper's replication skips the first epoch: ``ticks=slice(1, None)``.
- The streams must be scalar (one value per sample and tick).

Published definitions and the peer code matched (the exact peer computations are quoted in the tests):

- **Data maps** (Swayamdipta, Schwartz, Lourie, Wang, Hajishirzi, Smith & Choi, "Dataset Cartography: Mapping
  and Diagnosing Datasets with Training Dynamics", EMNLP 2020, arXiv:2009.10795). Peer code: allenai/cartography
  ``cartography/selection/train_dy_filtering.py`` (``compute_train_dy_metrics``, ``compute_correctness``,
  ``compute_forgetfulness``) at 3df3438. Per epoch e with gold-label probability p_e and correctness c_e:
  confidence = mean_e p_e, variability = population std (``np.std``, ddof=0) of p_e, correctness = Σ_e c_e
  (a count, not a fraction), forgetfulness = number of c: 1 -> 0 transitions (1000 if never correct),
  threshold_closeness = confidence · (1 - confidence).
- **AUM** (Pleiss, Zhang, Elenberg & Weinberger, "Identifying Mislabeled Data using the Area Under the Margin
  Ranking", NeurIPS 2020, arXiv:2001.10528). Peer code: asappresearch/aum ``aum/aum.py``
  (``AUMCalculator.update``) at v1.0.2 (892e76e). margin = z[assigned] - max_{k != assigned} z[k] on raw
  logits, AUM = the unweighted mean of the margins over the measurements of the sample.
- **Forgetting events** (Toneva, Sordoni, Tachet des Combes, Trischler, Bengio & Gordon, "An Empirical Study of
  Example Forgetting during Deep Neural Network Learning", ICLR 2019, arXiv:1812.05159). Peer code:
  mtoneva/example_forgetting ``order_examples_by_forgetting.py`` (``compute_forgetting_statistics``,
  ``sort_examples_by_forgetting``) at d51c1aa: the number of 1 -> 0 transitions of the 0/1 accuracy between
  consecutive presentations; an example never classified correctly gets ``npresentations`` (the number of
  epochs) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from ._arrays import tick_positions
from ._commit import open_stream, read_run_attrs
from ._scan import Slab, scan
from .errors import InvalidDTypeError, ShapeMismatchError, UnknownStreamError
from .scores import _BlockMoments

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["CARTOGRAPHY_NEVER_LEARNED", "aum", "cartography", "forgetting"]

#: What ``compute_forgetfulness`` of allenai/cartography returns for an example that was never correct.
CARTOGRAPHY_NEVER_LEARNED = 1000


# --- public functions -------------------------------------------------------------------------------------
def cartography(
    ledger: Ledger,
    run: str,
    *,
    prob: str = "prob",
    loss: str | None = None,
    correct: str | None = "correct",
    include_ci: bool = False,
    ticks: Any = None,
) -> pa.Table:
    """Data-map coordinates (Swayamdipta et al. 2020), as allenai/cartography computes them, per sample.

    Parameters
    ----------
    prob : name of a stream holding p(gold) at each tick: the model's probability of the sample's assigned
        label (softmax of the training-pass logits, taken at the label), in [0, 1].
    loss : if given, the name of a per-sample **cross-entropy** loss stream, and p(gold) = exp(-loss) (``prob``
        is then ignored). Only valid for cross-entropy (-log softmax at the label): with label smoothing,
        focal loss, class weights or any other loss, exp(-loss) is not p(gold). exp(-float32 loss) differs from
        the float32 softmax by ~1e-7 relative.
    correct : name of a 0/1 (or bool) stream, 1 when the argmax prediction equals the label at that tick.
        Required for ``correctness`` and ``forgetfulness``: if the run has no such stream,
        :class:`~lossledger.errors.UnknownStreamError` is raised; pass ``correct=None`` to compute only the
        probability columns (``correctness`` then null, ``forgetfulness`` NaN).
    include_ci : cartography's ``--include_ci`` variability, sqrt(var + var²/(n - 1)) (NaN when n_obs = 1).
    ticks : a window of ticks (slice or indices); default all committed ticks.

    Returns
    -------
    pyarrow.Table, one row per sample: ``sample_id``, [``label``],
    ``confidence`` (float64) mean of p over the observed ticks;
    ``variability`` (float64) population std (ddof=0) of p over the same ticks;
    ``correctness`` (int64) number of ticks at which the sample was correct (a count, not a fraction;
    cartography's plots divide by the dataset's maximum);
    ``forgetfulness`` (float64) number of correct -> incorrect transitions between consecutive observed ticks
    of ``correct``, 1000 if the sample was observed but never correct;
    ``threshold_closeness`` (float64) confidence · (1 - confidence);
    ``n_obs`` (int64) ticks at which p was observed.

    NaN (not logged) ticks are skipped in each stream separately: ``confidence``/``variability``/``n_obs``
    use the ticks where p is observed, ``correctness``/``forgetfulness`` those where ``correct`` is (the same
    ticks when both are logged in one ``run.log`` call). A sample never observed has NaN/null scores, where
    cartography leaves it out. Memory: one scan slab plus O(block) state, plus the O(N) result.
    """
    commit, tick_index = _commit_and_ticks(ledger, run, ticks)
    if loss is not None:
        p_array = _stream_array(
            ledger, run, commit, loss,
            "cartography(loss=...) reads a per-sample cross-entropy loss stream; log it with "
            "run.log(ids, loss=F.cross_entropy(logits, y, reduction='none'))",
        )
    else:
        p_array = _stream_array(
            ledger, run, commit, prob,
            "cartography needs p(gold) per tick: log it with run.log(ids, prob=softmax(logits)[arange(B), y]), "
            "or pass loss='<stream>' to use exp(-loss) of a cross-entropy loss stream",
        )
    c_array = None
    if correct is not None:
        c_array = _stream_array(
            ledger, run, commit, correct,
            "cartography's correctness needs a 0/1 stream per tick: log it with "
            "run.log(ids, correct=(logits.argmax(1) == y)), or pass correct=None to skip correctness and "
            "forgetfulness",
        )
    n = ledger.n_samples
    transform = _neg_exp if loss is not None else None
    moments = _collect(ledger, p_array, tick_index, _Moments, transform=transform, stream=loss or prob)
    mean, var, n_obs = moments["mean"], moments["var"], moments["n"]
    if include_ci:
        with np.errstate(divide="ignore", invalid="ignore"):
            variability = np.sqrt(var + var * var / (n_obs - 1.0))
        variability[n_obs <= 1] = np.nan
        variability[n_obs == 0] = np.nan
    else:
        variability = np.sqrt(var)
    if c_array is None:
        correctness = pa.nulls(n, pa.int64())
        forgetfulness = np.full(n, np.nan)
    else:
        tr = _collect(ledger, c_array, tick_index, _Transitions, binary=True, stream=correct or "")
        correctness = pa.array(tr["n_correct"], pa.int64(), mask=tr["n"] == 0)
        forgetfulness = _forgetting_events(tr, CARTOGRAPHY_NEVER_LEARNED)
    return _table(
        ledger,
        {
            "confidence": pa.array(mean, pa.float64()),
            "variability": pa.array(variability, pa.float64()),
            "correctness": correctness,
            "forgetfulness": pa.array(forgetfulness, pa.float64()),
            "threshold_closeness": pa.array(mean * (1.0 - mean), pa.float64()),
            "n_obs": pa.array(n_obs, pa.int64()),
        },
    )


def aum(ledger: Ledger, run: str, *, margin: str = "margin", ticks: Any = None) -> pa.Table:
    """Area under the margin (Pleiss et al. 2020), as asappresearch/aum computes it, per sample.

    Parameters
    ----------
    margin : name of a stream holding the margin of each sample at each tick, in logit units:
        z[assigned] - max_{k != assigned} z[k] on the **raw logits** (no softmax) of the training forward pass,
        with the assigned (possibly noisy) label. E.g. ``z_y = z.gather(1, y[:, None])[:, 0];
        other = z.scatter(1, y[:, None], -inf).amax(1); run.log(ids, margin=z_y - other)``.
    ticks : a window of ticks (slice or indices); default all committed ticks. The paper's replication skips the
        first epoch: ``ticks=slice(1, None)``.

    Returns
    -------
    pyarrow.Table, one row per sample: ``sample_id``, [``label``], ``aum`` (float64, logit units) the mean of
    the margin over the ticks at which it was observed (NaN if never), ``n_obs`` (int64) those ticks.

    Assumption: each tick holds one measurement per sample (one presentation per epoch, as when every sample is
    seen once per epoch). asappresearch/aum averages over every update call (minibatch presentation); with
    several presentations of a sample in one tick, a run opened with ``on_duplicate="mean"`` stores their mean
    and this function then weights each tick equally, which differs from the per-update average unless every
    tick has the same number of presentations. For that case log the per-tick sum of margins and their count as
    two streams and divide their ``Ledger.scores(...)["action"]`` columns. NaN ticks are skipped. Memory: one
    scan slab plus O(block) state, plus the O(N) result.
    """
    commit, tick_index = _commit_and_ticks(ledger, run, ticks)
    array = _stream_array(
        ledger, run, commit, margin,
        "aum needs the logit margin per tick: log run.log(ids, margin=z[y] - max_{k!=y} z[k]) from the raw logits",
    )
    sums = _collect(ledger, array, tick_index, _Sums, stream=margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(sums["n"] > 0, sums["total"] / sums["n"], np.nan)
    return _table(ledger, {"aum": pa.array(value, pa.float64()), "n_obs": pa.array(sums["n"], pa.int64())})


def forgetting(
    ledger: Ledger,
    run: str,
    *,
    correct: str = "correct",
    never_learned: float = CARTOGRAPHY_NEVER_LEARNED,
    ticks: Any = None,
) -> pa.Table:
    """Forgetting events (Toneva et al. 2019) per sample, from a 0/1 correctness stream.

    Parameters
    ----------
    correct : name of a stream holding 1 (or True) when the sample was classified correctly at that tick and 0
        when not; any other value raises :class:`~lossledger.errors.InvalidDTypeError`.
    never_learned : the score of a sample observed but never correct. Default 1000 as in allenai/cartography's
        ``compute_forgetfulness``; mtoneva/example_forgetting uses the number of presentations instead
        (``npresentations`` = its ``--epochs``): with one presentation per tick pass
        ``never_learned=ledger.ticks(run).num_rows`` (or the window's length).
    ticks : a window of ticks (slice or indices); default all committed ticks.

    Returns
    -------
    pyarrow.Table, one row per sample: ``sample_id``, [``label``],
    ``forgetting_events`` (float64) number of transitions correct (1) -> incorrect (0) between consecutive
    observed ticks; ``never_learned`` if the sample was observed but never correct; NaN if never observed;
    ``learned`` (bool) correct at least once;
    ``n_obs`` (int64) ticks at which ``correct`` was observed.

    A NaN tick is skipped: 1, NaN, 0 is one forgetting event and 0, NaN, 0 none (an incorrect tick not preceded
    by a correct one is not a forgetting event). Unforgettable samples are those with ``learned`` and 0 events.
    The sequence is carried across tick slabs. Toneva et al. sum the counts over several runs: add the columns
    of each run's table. Memory: one scan slab plus temporaries of about twice its size, plus the O(N) result.
    """
    commit, tick_index = _commit_and_ticks(ledger, run, ticks)
    array = _stream_array(
        ledger, run, commit, correct,
        "forgetting needs a 0/1 correctness stream per tick: log run.log(ids, correct=(logits.argmax(1) == y))",
    )
    tr = _collect(ledger, array, tick_index, _Transitions, binary=True, stream=correct)
    return _table(
        ledger,
        {
            "forgetting_events": pa.array(_forgetting_events(tr, float(never_learned)), pa.float64()),
            "learned": pa.array(tr["n_correct"] > 0, pa.bool_()),
            "n_obs": pa.array(tr["n"], pa.int64()),
        },
    )


# --- streaming state ----------------------------------------------------------------------------------------
class _State(Protocol):
    def __init__(self, width: int) -> None: ...

    def update(self, values: np.ndarray) -> None: ...

    def result(self) -> dict[str, np.ndarray]: ...


class _Sums:
    """Count and float64 sum of the observed values of each sample of a block."""

    def __init__(self, width: int) -> None:
        self.n = np.zeros(width, np.int64)
        self.total = np.zeros(width, np.float64)

    def update(self, values: np.ndarray) -> None:
        valid = ~np.isnan(values)
        self.n += valid.sum(axis=0)
        self.total += np.where(valid, values, 0.0).sum(axis=0, dtype=np.float64)

    def result(self) -> dict[str, np.ndarray]:
        return {"n": self.n, "total": self.total}


class _Moments:
    """Count, mean and population variance of the observed values: the score engine's block statistics."""

    def __init__(self, width: int) -> None:
        self._stats = _BlockMoments((width,))

    def update(self, values: np.ndarray) -> None:
        self._stats.update(values, np.ones((1, values.shape[0])))

    def result(self) -> dict[str, np.ndarray]:
        stats = self._stats.per_sample()
        return {"n": stats["n_obs"], "mean": stats["mean"], "var": stats["variance"]}


class _Transitions:
    """0/1 sequences of each sample of a block: observations, correct ticks, 1 -> 0 transitions, last value."""

    def __init__(self, width: int) -> None:
        self.n = np.zeros(width, np.int64)
        self.n_correct = np.zeros(width, np.int64)
        self.events = np.zeros(width, np.int64)
        self.prev = np.full(width, -1, np.int8)  # last observed value: 0, 1, or -1 before any observation

    def update(self, values: np.ndarray) -> None:
        observed = ~np.isnan(values)
        codes = np.where(observed, (values == 1).astype(np.int8), np.int8(-1))  # (g, w)
        chain = np.concatenate([self.prev[None], codes])  # (g + 1, w): row 0 carries the previous slab
        g1 = chain.shape[0]
        rows = np.arange(g1, dtype=np.int32 if g1 < 2**31 else np.int64)[:, None]
        last_pos = np.maximum.accumulate(np.where(chain >= 0, rows, -1), axis=0)  # last observed row so far
        before = last_pos[:-1]  # for tick i (row i + 1): the last observed row strictly before it
        # Where nothing was observed before (-1), row 0 is unobserved too, so index 0 reads -1: no event.
        prev_code = np.take_along_axis(chain, np.maximum(before, 0), axis=0)
        self.events += ((codes == 0) & (prev_code == 1)).sum(axis=0)
        self.n += observed.sum(axis=0)
        self.n_correct += (codes == 1).sum(axis=0)
        final = last_pos[-1]
        self.prev = np.where(final >= 0, np.take_along_axis(chain, np.maximum(final, 0)[None], axis=0)[0], -1).astype(
            np.int8
        )

    def result(self) -> dict[str, np.ndarray]:
        return {"n": self.n, "n_correct": self.n_correct, "events": self.events}


def _forgetting_events(tr: dict[str, np.ndarray], never_learned: float) -> np.ndarray:
    out = np.where(tr["n_correct"] > 0, tr["events"].astype(np.float64), float(never_learned))
    out[tr["n"] == 0] = np.nan
    return out


# --- plumbing -------------------------------------------------------------------------------------------------
def _neg_exp(values: np.ndarray) -> np.ndarray:
    return np.exp(-values.astype(np.float64))


def _commit_and_ticks(ledger: Ledger, run: str, ticks: Any) -> tuple[dict[str, Any], np.ndarray]:
    """The run's commit record (read once, so every stream is read at the same ticks) and the tick positions."""
    commit = read_run_attrs(ledger._io, run)["commit"]
    return commit, np.unique(tick_positions(ticks, commit["ticks"]))


def _stream_array(ledger: Ledger, run: str, commit: dict[str, Any], stream: str, hint: str) -> Any:
    streams = commit["streams"]
    if stream not in streams:
        raise UnknownStreamError(
            f"run {run!r} has no committed stream {stream!r}; its streams are {sorted(streams)}. {hint}"
        )
    element_shape = tuple(streams[stream]["element_shape"])
    if element_shape:
        raise ShapeMismatchError(
            f"stream {stream!r} of run {run!r} has element shape {element_shape}; these scores need a scalar per "
            "sample and tick (log one value per sample, e.g. the reduced per-sample value)"
        )
    return open_stream(ledger._io, run, stream, commit, ledger.n_samples)


def _collect(
    ledger: Ledger,
    array: Any,
    tick_index: np.ndarray,
    make_state: Callable[[int], _State],
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    binary: bool = False,
    stream: str,
) -> dict[str, np.ndarray]:
    """Run a per-block state over every slab of ``array`` and gather its per-sample results (N,)."""
    n = ledger.n_samples
    if tick_index.size == 0:
        return make_state(n).result()
    out: dict[str, np.ndarray] = {}
    for lo, hi, result in _blocks(ledger, array, tick_index, make_state, transform, binary, stream):
        for name, values in result.items():
            if name not in out:
                out[name] = np.empty(n, dtype=values.dtype)
            out[name][lo:hi] = values
    return out


def _blocks(
    ledger: Ledger,
    array: Any,
    tick_index: np.ndarray,
    make_state: Callable[[int], _State],
    transform: Callable[[np.ndarray], np.ndarray] | None,
    binary: bool,
    stream: str,
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    state: _State | None = None
    slab: Slab
    for slab in scan(array, tick_index):
        if slab.block_start:
            state = make_state(slab.hi - slab.lo)
        assert state is not None
        values = slab.values
        if binary:
            _check_binary(ledger, values, slab, tick_index, stream)
        if transform is not None:
            values = transform(values)
        state.update(values)
        if slab.block_end:
            yield slab.lo, slab.hi, state.result()


def _check_binary(ledger: Ledger, values: np.ndarray, slab: Slab, tick_index: np.ndarray, stream: str) -> None:
    bad = ~(np.isnan(values) | (values == 0) | (values == 1))
    if not bad.any():
        return
    t, j = (int(x[0]) for x in np.nonzero(bad))
    sample_id = int(ledger._samples.sample_id[slab.lo + j])
    tick = int(tick_index[slab.ticks[t]])
    raise InvalidDTypeError(
        f"stream {stream!r} must hold 0/1 correctness values, but sample {sample_id} has {float(values[t, j])!r} at "
        f"tick {tick} ({int(bad.sum())} such value(s) in this block); log correct=(prediction == label) once per "
        "sample and tick (a run with on_duplicate='mean' stores fractions when a sample is logged twice in a tick)"
    )


def _table(ledger: Ledger, columns: dict[str, pa.Array]) -> pa.Table:
    samples = ledger._samples
    out: dict[str, pa.Array] = {"sample_id": pa.array(samples.sample_id, pa.int64())}
    if samples.label is not None:
        out["label"] = pa.array(samples.label, pa.int32())
    out.update(columns)
    return pa.table(out)
