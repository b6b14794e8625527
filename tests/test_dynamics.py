"""Cartography, AUM and forgetting scores equal (a) plain numpy on the dense (ticks x samples) matrix and (b) the
peers' own computations (allenai/cartography, asappresearch/aum, mtoneva/example_forgetting), re-implemented
below from their code, on random training logits with ticks a sample missed, also through the multi-slab path."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossledger as ll
import lossledger.dynamics as dyn
from lossledger import errors as E
from lossledger.errors import LedgerWarning


# --- the peers' computations, transcribed from their code (numpy stands in for torch) ----------------------------
def softmax32(logits: np.ndarray) -> np.ndarray:
    """torch.nn.functional.softmax(torch.Tensor(logits), dim=-1): float32 throughout."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def cartography_read_training_dynamics(epoch_files: list[list[dict]]) -> dict:
    """allenai/cartography selection_utils.read_training_dynamics (one list of jsonl records per epoch file).

    The peer asserts that every guid appears in epoch 0; that assertion is left out so that samples missing from
    the first epoch can be compared too (the peer would stop with AssertionError).
    """
    train_dynamics: dict = {}
    for epoch_num, records in enumerate(epoch_files):
        for record in records:
            guid = record["guid"]
            if guid not in train_dynamics:
                train_dynamics[guid] = {"gold": record["gold"], "logits": []}
            train_dynamics[guid]["logits"].append(record[f"logits_epoch_{epoch_num}"])
    return train_dynamics


def cartography_compute_forgetfulness(correctness_trend: list) -> int:
    """allenai/cartography train_dy_filtering.compute_forgetfulness, verbatim."""
    if not any(correctness_trend):  # Example is never predicted correctly, or learnt!
        return 1000
    learnt = False  # Predicted correctly in the current epoch.
    times_forgotten = 0
    for is_correct in correctness_trend:
        if (not learnt and not is_correct) or (learnt and is_correct):
            continue
        elif learnt and not is_correct:
            learnt = False
            times_forgotten += 1
        elif not learnt and is_correct:
            learnt = True
    return times_forgotten


def cartography_compute_train_dy_metrics(training_dynamics: dict, include_ci: bool = False) -> dict:
    """allenai/cartography train_dy_filtering.compute_train_dy_metrics (the per-guid loop, L85-130)."""
    variability_func = lambda conf: np.std(conf)  # noqa: E731
    if include_ci:  # Based on prior work on active bias
        variability_func = lambda conf: np.sqrt(  # noqa: E731
            np.var(conf) + np.var(conf) * np.var(conf) / (len(conf) - 1)
        )
    threshold_closeness_func = lambda conf: conf * (1 - conf)  # noqa: E731
    out = {}
    for guid, record in training_dynamics.items():
        correctness_trend, true_probs_trend = [], []
        for epoch_logits in record["logits"]:
            probs = softmax32(epoch_logits)
            true_class_prob = float(probs[record["gold"]])
            true_probs_trend.append(true_class_prob)
            prediction = np.argmax(epoch_logits)
            is_correct = (prediction == record["gold"]).item()
            correctness_trend.append(is_correct)
        with np.errstate(divide="ignore", invalid="ignore"):
            confidence = np.mean(true_probs_trend)
            out[guid] = {
                "correctness": sum(correctness_trend),
                "confidence": confidence,
                "variability": variability_func(true_probs_trend),
                "forgetfulness": cartography_compute_forgetfulness(correctness_trend),
                "threshold_closeness": threshold_closeness_func(confidence),
            }
    return out


class AUMCalculator:
    """asappresearch/aum aum.AUMCalculator.update (sums and counts per sample id), in numpy float32."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict = {}

    def update(self, logits: np.ndarray, targets: np.ndarray, sample_ids: list) -> None:
        logits = np.asarray(logits, np.float32)
        rows = np.arange(len(targets))
        target_values = logits[rows, targets]
        masked_logits = logits.copy()
        masked_logits[rows, targets] = -np.inf
        other_logit_values = masked_logits.max(1)
        margin_values = (target_values - other_logit_values).tolist()
        for sample_id, margin in zip(sample_ids, margin_values):
            self.counts[sample_id] = self.counts.get(sample_id, 0) + 1
            self.sums[sample_id] = self.sums.get(sample_id, 0.0) + margin

    def aum(self) -> dict:
        return {sample_id: self.sums[sample_id] / self.counts[sample_id] for sample_id in self.sums}


def toneva_forgetting_counts(example_stats: dict, npresentations: int) -> dict:
    """mtoneva/example_forgetting: compute_forgetting_statistics + sort_examples_by_forgetting, one run."""
    unlearned_per_presentation, first_learned = {}, {}
    for example_id, stats in example_stats.items():
        presentation_acc = np.array(stats[1][:npresentations])
        transitions = presentation_acc[1:] - presentation_acc[:-1]
        if len(np.where(transitions == -1)[0]) > 0:
            unlearned_per_presentation[example_id] = np.where(transitions == -1)[0] + 2
        else:
            unlearned_per_presentation[example_id] = []
        if len(np.where(presentation_acc == 1)[0]) > 0:
            first_learned[example_id] = np.where(presentation_acc == 1)[0][0]
        else:
            first_learned[example_id] = np.nan
    counts = {}
    for example_id in unlearned_per_presentation:
        if np.isnan(first_learned[example_id]):
            counts[example_id] = npresentations
        else:
            counts[example_id] = len(unlearned_per_presentation[example_id])
    return counts


# --- plain numpy on the dense matrix (T, N), NaN = not observed ----------------------------------------------
def numpy_reference(p: np.ndarray, c: np.ndarray, m: np.ndarray, never_learned: float, include_ci: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = p.astype(np.float64)
        n_obs = (~np.isnan(p)).sum(0)
        conf = np.nanmean(p, 0)
        var = np.nanvar(p, 0)
        variability = np.sqrt(var + var * var / (n_obs - 1)) if include_ci else np.sqrt(var)
        aum = np.nanmean(m.astype(np.float64), 0)
    events, learned, c_obs = [], [], []
    for col in c.T:
        v = col[~np.isnan(col)]
        c_obs.append(v.size)
        learned.append(bool((v == 1).any()))
        count = float(np.sum((v[:-1] == 1) & (v[1:] == 0)))
        events.append(np.nan if v.size == 0 else count if (v == 1).any() else never_learned)
    return {
        "confidence": conf,
        "variability": variability,  # include_ci: 0 + 0 * 0 / 0 = NaN at one observation, as in the peer
        "threshold_closeness": conf * (1 - conf),
        "n_obs": n_obs,
        "correctness": np.where(np.array(c_obs) > 0, np.nansum(c, 0), np.nan),
        "events": np.array(events),
        "learned": np.array(learned),
        "c_obs": np.array(c_obs),
        "aum": aum,
        "m_obs": (~np.isnan(m)).sum(0),
    }


# --- building a ledger from simulated training -----------------------------------------------------------------
def simulate(path, n: int, n_classes: int, masks: list[list[bool]], seed: int, batch: int):
    """Random logits per (tick, sample); log prob, loss, correct and margin per minibatch of the presented samples.

    Returns the ledger, the dense matrices (T, N) and the peers' raw inputs.
    """
    rng = np.random.default_rng(seed)
    sample_ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    labels = rng.integers(0, n_classes, n)
    led = ll.create(path, sample_ids=sample_ids, labels=labels)
    n_ticks = len(masks)
    dense = {k: np.full((n_ticks, n), np.nan, np.float32) for k in ("prob", "loss", "correct", "margin")}
    epoch_files: list[list[dict]] = []  # cartography's dynamics_epoch_{t}.jsonl records
    updates: list[tuple[int, np.ndarray, np.ndarray, list]] = []  # (tick, logits, targets, ids) per AUM update
    presentations: dict = {}  # id -> [(tick, loss, acc, margin)] per presentation (Toneva's example_stats rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)  # ticks with nothing logged
        with led.run("r") as run:
            for t, mask in enumerate(masks):
                rows = rng.permutation(np.flatnonzero(mask))
                logits_t = (rng.normal(0, 2, (n, n_classes))).astype(np.float32)
                records = []
                for start in range(0, rows.size, batch):
                    r = rows[start : start + batch]
                    z, y, ids = logits_t[r], labels[r], sample_ids[r]
                    probs = softmax32(z)
                    prob = probs[np.arange(r.size), y]
                    zmax = z.max(1, keepdims=True)
                    loss = (np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0] - z[np.arange(r.size), y]).astype(np.float32)
                    correct = z.argmax(1) == y
                    other = z.copy()
                    other[np.arange(r.size), y] = -np.inf
                    margin = (z[np.arange(r.size), y] - other.max(1)).astype(np.float32)
                    run.log(ids, prob=prob, loss=loss, correct=correct, margin=margin)
                    for k, v in (("prob", prob), ("loss", loss), ("correct", correct), ("margin", margin)):
                        dense[k][t, r] = v
                    updates.append((t, z, y, ids.tolist()))
                    for j, i in enumerate(r):
                        guid = int(sample_ids[i])
                        records.append({"guid": guid, f"logits_epoch_{t}": z[j].tolist(), "gold": int(y[j])})
                        presentations.setdefault(guid, []).append(
                            (t, float(loss[j]), int(correct[j]), float(margin[j]))
                        )
                epoch_files.append(records)
                run.end_epoch()
    return led, sample_ids, dense, epoch_files, updates, presentations


def relabel_epochs(epoch_files: list[list[dict]], window: np.ndarray) -> list[list[dict]]:
    """The epoch files of the ticks in ``window``, renumbered 0.. (as cartography would read that folder)."""
    out = []
    for new, old in enumerate(window):
        out.append([{"guid": r["guid"], f"logits_epoch_{new}": r[f"logits_epoch_{old}"], "gold": r["gold"]}
                    for r in epoch_files[old]])
    return out


def column(table, name: str) -> np.ndarray:
    """A column as float64 with null -> NaN."""
    return np.array([np.nan if v is None else v for v in table[name].to_pylist()], dtype=np.float64)


def by_id(sample_ids: np.ndarray, mapping: dict, key=None) -> np.ndarray:
    """A peer's per-id result in the ledger's row order, NaN for ids the peer never saw."""
    values = [mapping.get(int(s), np.nan) for s in sample_ids]
    return np.array([v if key is None or not isinstance(v, dict) else v[key] for v in values], dtype=np.float64)


@st.composite
def trainings(draw):
    n = draw(st.integers(1, 24))
    n_ticks = draw(st.integers(1, 7))
    masks = [draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(n_ticks)]
    window = draw(st.one_of(st.none(), st.just("skip_first"), st.lists(st.integers(0, n_ticks - 1), max_size=5)))
    return {
        "n": n,
        "n_classes": draw(st.integers(2, 4)),
        "masks": masks,
        "seed": draw(st.integers(0, 2**32 - 1)),
        "batch": draw(st.integers(1, 6)),
        "window": window,
        "include_ci": draw(st.booleans()),
        "budget": draw(st.sampled_from([None, 16, 48])),  # None: default chunks, one slab per block
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trainings())
def test_scores_match_numpy_and_peers(tmp_path_factory, monkeypatch, spec):
    with monkeypatch.context() as m:
        if spec["budget"] is not None:  # 4 samples per chunk: several sample blocks, 1-3 ticks per slab
            m.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
            m.setattr("lossledger._scan.SCAN_BUDGET_BYTES", spec["budget"])
        check_training(tmp_path_factory.mktemp("d") / "d.ll", spec)


def check_training(path, spec):
    n, masks, include_ci = spec["n"], spec["masks"], spec["include_ci"]
    led, sample_ids, dense, epoch_files, updates, presentations = simulate(
        path, n, spec["n_classes"], masks, spec["seed"], spec["batch"]
    )
    n_ticks = len(masks)
    window = spec["window"]
    ticks = slice(1, None) if window == "skip_first" else window
    sel = np.arange(n_ticks)[ticks] if isinstance(ticks, slice) else (
        np.arange(n_ticks) if ticks is None else np.unique(np.asarray(ticks, dtype=np.int64)))
    if not np.any(masks):
        for call in (lambda: dyn.cartography(led, "r"), lambda: dyn.aum(led, "r"), lambda: dyn.forgetting(led, "r")):
            with pytest.raises(E.UnknownStreamError, match="streams are"):
                call()
        return
    nl = float(sel.size)  # Toneva: never learned -> npresentations (one presentation per tick here)
    carto = dyn.cartography(led, "r", include_ci=include_ci, ticks=ticks)
    carto_loss = dyn.cartography(led, "r", loss="loss", correct=None, include_ci=include_ci, ticks=ticks)
    aum = dyn.aum(led, "r", ticks=ticks)
    forg = dyn.forgetting(led, "r", never_learned=nl, ticks=ticks)
    for table in (carto, carto_loss, aum, forg):
        assert table["sample_id"].to_pylist() == sample_ids.tolist()
        assert table["label"].to_pylist() == led.samples["label"].to_pylist()
    assert carto.column_names == ["sample_id", "label", "confidence", "variability", "correctness", "forgetfulness",
                                  "threshold_closeness", "n_obs"]
    assert carto.schema.field("correctness").type == "int64"

    # (a) plain numpy on the dense matrices
    ref = numpy_reference(dense["prob"][sel], dense["correct"][sel], dense["margin"][sel], nl, include_ci)
    close = dict(rtol=1e-9, atol=1e-12)
    for name in ("confidence", "variability", "threshold_closeness"):
        np.testing.assert_allclose(column(carto, name), ref[name], **close, err_msg=name)
    np.testing.assert_array_equal(carto["n_obs"].to_numpy(), ref["n_obs"])
    np.testing.assert_array_equal(column(carto, "correctness"), ref["correctness"])
    carto_events = np.where(ref["learned"] | (ref["c_obs"] == 0), ref["events"], 1000.0)
    np.testing.assert_array_equal(column(carto, "forgetfulness"), carto_events)
    p_loss = np.exp(-dense["loss"][sel].astype(np.float64))
    ref_loss = numpy_reference(p_loss, dense["correct"][sel], dense["margin"][sel], nl, include_ci)
    for name in ("confidence", "variability", "threshold_closeness"):
        np.testing.assert_allclose(column(carto_loss, name), ref_loss[name], **close, err_msg=name)
    assert carto_loss["correctness"].null_count == n
    assert np.isnan(column(carto_loss, "forgetfulness")).all()
    np.testing.assert_allclose(column(aum, "aum"), ref["aum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(aum["n_obs"].to_numpy(), ref["m_obs"])
    np.testing.assert_array_equal(column(forg, "forgetting_events"), ref["events"])
    np.testing.assert_array_equal(forg["learned"].to_numpy(zero_copy_only=False), ref["learned"])
    np.testing.assert_array_equal(forg["n_obs"].to_numpy(), ref["c_obs"])

    # (b) the peers' own computations on the raw logits
    peer = cartography_compute_train_dy_metrics(
        cartography_read_training_dynamics(relabel_epochs(epoch_files, sel)), include_ci=include_ci
    )
    for name in ("confidence", "variability", "threshold_closeness", "correctness", "forgetfulness"):
        np.testing.assert_allclose(column(carto, name), by_id(sample_ids, peer, name), **close, err_msg=name)
    for name in ("confidence", "variability", "threshold_closeness"):  # exp(-float32 CE) vs float32 softmax
        np.testing.assert_allclose(column(carto_loss, name), by_id(sample_ids, peer, name), rtol=2e-5, atol=1e-6,
                                   err_msg=name)
    in_window = set(sel.tolist())
    calculator = AUMCalculator()
    for t, z, y, ids in updates:
        if t in in_window:
            calculator.update(logits=z, targets=y, sample_ids=ids)
    np.testing.assert_allclose(column(aum, "aum"), by_id(sample_ids, calculator.aum()), rtol=1e-12, atol=1e-12)
    example_stats = {}  # Toneva's example_stats over the window's presentations: id -> [losses, accs, margins]
    for guid, rows in presentations.items():
        kept = [row for row in rows if row[0] in in_window]
        if kept:
            example_stats[guid] = [[r[1] for r in kept], [r[2] for r in kept], [r[3] for r in kept]]
    counts = toneva_forgetting_counts(example_stats, npresentations=sel.size)
    np.testing.assert_array_equal(column(forg, "forgetting_events"), by_id(sample_ids, counts))
    led.close()


# --- hand-checked cases ---------------------------------------------------------------------------------------------
def _log_columns(led, name: str, columns: list[list[float]], **run_kwargs):
    """Log ``columns[t][i]`` for sample i at tick t (NaN = not logged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)
        with led.run(run_kwargs.pop("run", "r"), **run_kwargs) as run:
            for values in columns:
                values = np.asarray(values, np.float64)
                ids = np.flatnonzero(~np.isnan(values))
                if ids.size:
                    run.log(ids, **{name: values[ids]})
                run.end_epoch()


def test_forgetting_skips_missing_ticks_and_scores_never_learned(ledger):
    nan = np.nan
    seqs = [
        [1, nan, 0],  # one event across a missing tick
        [0, nan, 0],  # never learned
        [0, 1, 1],  # learned, unforgettable
        [1, 0, 1],  # one event
        [nan, nan, nan],  # never observed
        [1, 0, 0],  # one event: 0 -> 0 is not another
        [1, 0, nan],
        [nan, 1, 0],
        [0, 0, 1],
        [1, 1, 1],
    ]
    _log_columns(ledger, "correct", np.array(seqs).T.tolist())
    table = dyn.forgetting(ledger, "r", never_learned=3)
    assert column(table, "forgetting_events")[[0, 1, 2, 3, 5, 6, 7, 8, 9]].tolist() == [1, 3, 0, 1, 1, 1, 1, 0, 0]
    assert np.isnan(column(table, "forgetting_events")[4])
    assert table["learned"].to_pylist() == [True, False, True, True, False, True, True, True, True, True]
    assert table["n_obs"].to_pylist() == [2, 2, 3, 3, 0, 3, 2, 2, 3, 3]
    assert column(dyn.forgetting(ledger, "r"), "forgetting_events")[1] == 1000
    # A window: ticks 1..2 only.
    assert column(dyn.forgetting(ledger, "r", ticks=slice(1, None)), "forgetting_events")[3] == 0
    assert column(dyn.forgetting(ledger, "r", ticks=[2]), "forgetting_events")[1] == 1000


def test_cartography_uses_each_streams_own_observed_ticks(ledger):
    with ledger.run("r") as run:
        run.log([0, 1], prob=[0.2, 0.9], correct=[0, 1])
        run.end_epoch()
        run.log([0, 1], prob=[0.6, 0.7])  # correct not logged at this tick
        run.log([0], correct=[1])
        run.end_epoch()
        run.log([0, 1], prob=[0.4, 0.8], correct=[0, 1])
        run.end_epoch()
    rows = dyn.cartography(ledger, "r").to_pylist()
    assert rows[0]["confidence"] == pytest.approx(np.mean(np.float32([0.2, 0.6, 0.4])), rel=1e-12)
    assert rows[0]["variability"] == pytest.approx(np.std(np.float32([0.2, 0.6, 0.4]).astype(float)), rel=1e-12)
    assert rows[0]["correctness"] == 1 and rows[0]["forgetfulness"] == 1 and rows[0]["n_obs"] == 3
    assert rows[1]["correctness"] == 2 and rows[1]["forgetfulness"] == 0 and rows[1]["n_obs"] == 3
    never = rows[2]
    assert never["n_obs"] == 0 and never["correctness"] is None
    assert all(np.isnan(never[k]) for k in ("confidence", "variability", "forgetfulness", "threshold_closeness"))
    assert "label" in dyn.cartography(ledger, "r").column_names
    # include_ci: sqrt(var + var^2 / (n - 1))
    var = np.var(np.float32([0.2, 0.6, 0.4]).astype(float))
    ci = dyn.cartography(ledger, "r", include_ci=True).to_pylist()[0]["variability"]
    assert ci == pytest.approx(np.sqrt(var + var * var / 2), rel=1e-12)


def test_no_labels_and_empty_window(tmp_path):
    led = ll.create(tmp_path / "n.ll", n_samples=3)
    with led.run("r") as run:
        run.log([0, 1], margin=[1.0, -2.0], correct=[1, 0], prob=[0.5, 0.5])
        run.end_epoch()
    table = dyn.aum(led, "r")
    assert table.column_names == ["sample_id", "aum", "n_obs"]
    assert column(table, "aum")[:2].tolist() == [1.0, -2.0] and np.isnan(column(table, "aum")[2])
    empty = dyn.cartography(led, "r", ticks=[])
    assert empty["n_obs"].to_pylist() == [0, 0, 0] and empty["correctness"].null_count == 3
    assert np.isnan(column(dyn.forgetting(led, "r", ticks=slice(0, 0)), "forgetting_events")).all()


def test_multi_slab_path_is_taken_and_carries_state(tmp_path, monkeypatch):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)  # 4 samples per chunk
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 16)  # one tick per slab
    rng = np.random.default_rng(0)
    n, n_ticks = 13, 9
    led = ll.create(tmp_path / "m.ll", n_samples=n)
    correct = (rng.random((n_ticks, n)) < 0.5).astype(np.float64)
    correct[rng.random((n_ticks, n)) < 0.3] = np.nan
    _log_columns(led, "correct", correct.tolist())
    seen = []
    real_scan = dyn.scan

    def spy(*args, **kwargs):
        for slab in real_scan(*args, **kwargs):
            seen.append((slab.lo, slab.hi, slab.ticks.tolist()))
            yield slab

    monkeypatch.setattr(dyn, "scan", spy)
    table = dyn.forgetting(led, "r", never_learned=-1)
    assert len({(lo, hi) for lo, hi, _ in seen}) == 4  # sample blocks
    assert len(seen) == 4 * n_ticks  # one slab per tick per block
    ref = numpy_reference(correct, correct, correct, -1.0, False)
    np.testing.assert_array_equal(column(table, "forgetting_events"), ref["events"])


def test_memory_is_one_slab_not_the_matrix(tmp_path, monkeypatch):
    n, n_ticks = 20_000, 200
    led = ll.create(tmp_path / "big.ll", n_samples=n)
    rng = np.random.default_rng(1)
    ids = np.arange(n)
    with led.run("r") as run:
        for _ in range(n_ticks):
            run.log(ids, prob=rng.random(n, dtype=np.float32), correct=rng.random(n) < 0.5)
            run.end_epoch()
    matrix = n * n_ticks * 4  # the float32 (ticks x samples) matrix of one stream: 16 MB
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 1 << 18)  # 256 KB slabs
    dyn.cartography(led, "r")  # warm imports and zarr caches
    tracemalloc.start()
    try:
        dyn.cartography(led, "r")
        dyn.forgetting(led, "r")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < matrix / 3, f"peak {peak / 1e6:.1f} MB for a {matrix / 1e6:.1f} MB matrix"


# --- errors ----------------------------------------------------------------------------------------------------
def test_missing_stream_names_the_streams_and_what_to_log(ledger):
    with ledger.run("r") as run:
        run.log([0], loss=[1.0])
        run.end_epoch()
    cases = [
        (lambda: dyn.cartography(ledger, "r"), "'prob'", "prob=softmax"),
        (lambda: dyn.cartography(ledger, "r", loss="loss"), "'correct'", "correct=None"),
        (lambda: dyn.cartography(ledger, "r", loss="xent", correct=None), "'xent'", "cross_entropy"),
        (lambda: dyn.aum(ledger, "r"), "'margin'", "margin="),
        (lambda: dyn.forgetting(ledger, "r", correct="acc"), "'acc'", "correct=(logits.argmax(1) == y)"),
    ]
    for call, stream, hint in cases:
        with pytest.raises(E.UnknownStreamError) as info:
            call()
        message = str(info.value)
        assert isinstance(info.value, KeyError)
        assert stream in message and "its streams are ['loss']" in message and hint in message, message
    with pytest.raises(E.UnknownRunError):
        dyn.aum(ledger, "nope")


def test_bad_streams_raise(ledger):
    with ledger.run("r", on_duplicate="mean") as run:
        run.log([0, 1], correct=[1, 0], pixel=np.zeros((2, 2, 2)))
        run.log([1], correct=[1])  # stored as the mean 0.5
        run.end_epoch()
    with pytest.raises(E.InvalidDTypeError, match="sample 1 has 0.5 at tick 0") as info:
        dyn.forgetting(ledger, "r")
    assert isinstance(info.value, TypeError) and "on_duplicate='mean'" in str(info.value)
    with pytest.raises(E.ShapeMismatchError, match="element shape"):
        dyn.aum(ledger, "r", margin="pixel")
    with pytest.raises(E.ShapeMismatchError, match="out of range"):
        dyn.aum(ledger, "r", margin="correct", ticks=[5])
