"""Ensembles and correlations of runs equal plain numpy / scipy references on random ledgers with NaNs."""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import lossledger as ll
from lossledger import errors as E
from lossledger.compare import correlate, ensemble


def write_runs(led: ll.Ledger, values: dict[str, np.ndarray]) -> None:
    """Log (T, N) float32 arrays, NaN = not logged, one run per entry."""
    for name, array in values.items():
        run = led.run(name)
        for row in array:
            ids = np.flatnonzero(~np.isnan(row))
            run.log(ids, loss=row[ids])
            run.end_epoch()
        run.close()


def reference_actions(values: dict[str, np.ndarray]) -> np.ndarray:
    """(R, N) float64 action per run (dt = 1 per epoch), NaN where the run never observed the sample."""
    out = []
    for array in values.values():
        seen = (~np.isnan(array)).any(axis=0)
        out.append(np.where(seen, np.nansum(array.astype(np.float64), axis=0), np.nan))
    return np.array(out)


def reference_r(x: np.ndarray, y: np.ndarray, method: str) -> float:
    if x.size < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.pearsonr(x, y) if method == "pearson" else stats.spearmanr(x, y)
    return float(result.statistic)


@st.composite
def ledger_specs(draw):
    n = draw(st.integers(2, 24))
    n_runs = draw(st.integers(2, 4))
    n_ticks = draw(st.integers(1, 3))
    labelling = draw(st.sampled_from(["none", "labels", "classes"]))
    discrete = draw(st.booleans())  # multiples of 1/4: exact sums and many ties
    observe = draw(st.floats(0.2, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, n_runs, n_ticks, labelling, discrete, observe, seed


def build(tmp_path_factory, spec) -> tuple[ll.Ledger, dict[str, np.ndarray], np.ndarray | None, list[str] | None]:
    n, n_runs, n_ticks, labelling, discrete, observe, seed = spec
    rng = np.random.default_rng(seed)
    labels = None if labelling == "none" else rng.integers(0, 3, n) + (5 if labelling == "labels" else 0)
    classes = ["cat", "dog", "owl"] if labelling == "classes" else None
    led = ll.create(tmp_path_factory.mktemp("c") / "c.ll", n_samples=n, labels=labels, classes=classes)
    values = {}
    for k in range(n_runs):
        if discrete:
            array = (rng.integers(0, 9, (n_ticks, n)) / 4).astype(np.float32)
        else:
            array = rng.exponential(1.0, (n_ticks, n)).astype(np.float32)
        mask = rng.random((n_ticks, n)) < observe
        mask[np.arange(n_ticks), rng.integers(0, n, n_ticks)] = True  # no empty tick
        values[f"seed-{k}.v1"] = np.where(mask, array, np.float32(np.nan))
    write_runs(led, values)
    return led, values, labels, classes


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=ledger_specs())
def test_ensemble_matches_numpy(tmp_path_factory, spec):
    led, values, labels, _ = build(tmp_path_factory, spec)
    names = list(values)[::-1]  # any order of runs, not the ledger's
    table = ensemble(led, names)
    actions = reference_actions(values)[::-1]
    n_runs = (~np.isnan(actions)).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # samples no run observed
        mean = np.nanmean(actions, axis=0)
    seen = ~np.isnan(mean)
    spread = np.ptp(mean[seen]) if seen.any() else 0.0
    low = np.nanmin(mean) if seen.any() else np.nan
    normalized = np.where(seen, (mean - low) / spread if spread > 0 else 0.0, np.nan)

    label = ["label"] if labels is not None else []
    assert table.column_names == ["sample_id", *label, *names, "mean", "n_runs", "normalized"]
    assert table["sample_id"].to_pylist() == list(range(len(mean)))
    if labels is not None:
        assert table["label"].to_pylist() == labels.tolist()
    for name, want in zip(names, actions):
        np.testing.assert_allclose(table[name].to_numpy(), want, rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(table["mean"].to_numpy(), mean, rtol=1e-12)
    np.testing.assert_array_equal(table["n_runs"].to_numpy(), n_runs)
    np.testing.assert_allclose(table["normalized"].to_numpy(), normalized, rtol=1e-9, atol=1e-12)
    got = table["normalized"].to_numpy()
    assert np.all((got[seen] >= 0) & (got[seen] <= 1))


@SETTINGS
@given(
    spec=ledger_specs(),
    method=st.sampled_from(["pearson", "spearman"]),
    quantiles=st.lists(st.floats(0.01, 1.0), min_size=0, max_size=3),
)
def test_correlate_matches_scipy(tmp_path_factory, spec, method, quantiles):
    led, values, labels, classes = build(tmp_path_factory, spec)
    names = list(values)
    table = correlate(led, names, method=method, quantiles=quantiles)
    actions = reference_actions(values)
    groups = [("all", np.ones(actions.shape[1], bool))]
    if labels is not None:
        present = range(3) if classes is not None else np.unique(labels)
        groups += [(classes[c] if classes else str(c), labels == c) for c in present]
    expected = []
    for i, j in combinations(range(len(names)), 2):
        for group, in_group in groups:
            use = in_group & ~np.isnan(actions[i]) & ~np.isnan(actions[j])
            a, b = actions[i][use], actions[j][use]
            expected.append((names[i], names[j], group, None, a.size, reference_r(a, b, method)))
            for q in quantiles:
                if a.size == 0:
                    expected.append((names[i], names[j], group, q, 0, math.nan))
                    continue
                m = (a + b) / 2
                top = m >= np.quantile(m, 1 - q)
                expected.append((names[i], names[j], group, q, int(top.sum()), reference_r(a[top], b[top], method)))
    rows = table.to_pylist()
    assert [tuple(row.values())[:5] for row in rows] == [e[:5] for e in expected]
    np.testing.assert_allclose([row["r"] for row in rows], [e[5] for e in expected], rtol=1e-9, atol=1e-12)


def test_top_quantile_is_chosen_by_the_pair_mean(ledger):
    a = np.array([[1, 2, 3, 4, 5]], np.float32)
    b = np.array([[2, 1, 4, 3, 6]], np.float32)  # pair means 1.5 1.5 3.5 3.5 5.5
    write_runs(ledger, {"a": np.pad(a, ((0, 0), (0, 5)), constant_values=np.nan),
                        "b": np.pad(b, ((0, 0), (0, 5)), constant_values=np.nan)})
    ab = correlate(ledger, ["a", "b"], by_class=False, quantiles=[1.0, 0.4, 0.2]).to_pylist()
    # q = 0.4: threshold = 0.6 quantile of the means = 3.5, ties kept -> samples 2, 3, 4 (by run a alone: 3, 4)
    assert [(row["quantile"], row["n"]) for row in ab] == [(None, 5), (1.0, 5), (0.4, 3), (0.2, 1)]
    assert ab[0]["r"] == pytest.approx(np.corrcoef(a[0], b[0])[0, 1])
    assert ab[1]["r"] == ab[0]["r"]
    assert ab[2]["r"] == pytest.approx(np.corrcoef([3, 4, 5], [4, 3, 6])[0, 1])
    assert math.isnan(ab[3]["r"])  # one sample: undefined, not an error
    ba = correlate(ledger, ["b", "a"], by_class=False, quantiles=[1.0, 0.4, 0.2]).to_pylist()
    assert [(r["run_a"], r["n"]) for r in ba] == [("b", 5), ("b", 5), ("b", 3), ("b", 1)]
    np.testing.assert_array_equal([r["r"] for r in ba], [r["r"] for r in ab])


def test_correlate_groups_and_degenerate_cases(ledger):
    # the fixture: 10 samples, labels i % 3 in classes a, b, c; sample 9 (class a) never observed in run y
    x = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.float32)
    y = np.array([[2, 2, 3, 1, 5, 3, 2, 9, 3, np.nan]], np.float32)
    write_runs(ledger, {"x": x, "y": y, "z": x * 2})
    table = correlate(ledger, ["x", "y", "z"], method="spearman")
    rows = {(r["run_a"], r["run_b"], r["group"]): (r["n"], r["r"]) for r in table.to_pylist()}
    assert list(rows)[:4] == [("x", "y", "all"), ("x", "y", "a"), ("x", "y", "b"), ("x", "y", "c")]
    assert len(rows) == 3 * 4 and table["quantile"].null_count == 12
    assert rows["x", "y", "a"][0] == 3 and rows["x", "y", "all"][0] == 9  # sample 9 is skipped, not 0
    assert rows["x", "y", "a"][1] == pytest.approx(0.0)  # ranks 1 2 3 vs 2.5 1 2.5 (ordinal ranks: 0.5)
    assert rows["x", "y", "c"][0] == 3 and math.isnan(rows["x", "y", "c"][1])  # y constant in class c
    assert rows["x", "z", "all"] == (10, 1.0)
    assert correlate(ledger, ["x", "y"], by_class=False)["group"].to_pylist() == ["all"]


def test_ensemble_edge_cases(tmp_path):
    led = ll.create(tmp_path / "e.ll", n_samples=4)
    nan = np.nan
    write_runs(led, {"r0": np.array([[1, 1, nan, nan]], np.float32), "r1": np.array([[1, nan, 1, nan]], np.float32)})
    table = ensemble(led, ["r0", "r1"])
    assert table.column_names == ["sample_id", "r0", "r1", "mean", "n_runs", "normalized"]
    assert table["n_runs"].to_pylist() == [2, 1, 1, 0]
    mean, normalized = table["mean"].to_numpy(), table["normalized"].to_numpy()
    np.testing.assert_array_equal(mean, [1, 1, 1, nan])
    np.testing.assert_array_equal(normalized, [0, 0, 0, nan])  # every mean equal: all at the minimum
    single = ensemble(led, ["r1"], by="max")
    np.testing.assert_array_equal(single["mean"].to_numpy(), [1, nan, 1, nan])


def test_options_reach_the_scores(tmp_path):
    led = ll.create(tmp_path / "o.ll", n_samples=3)
    for name, scale in (("p", 1.0), ("q", 3.0)):
        with led.run(name) as run:
            for step in range(4):
                run.log([0, 1, 2], loss=np.array([1.0, 2.0, 4.0 - step]) * scale)
                run.end_epoch(step=(step + 1) * (step + 2))
    for score, dt, ticks in (("action", "step", slice(1, 3)), ("variance", "epoch", [0, 3]), ("max", "wall", None)):
        table = ensemble(led, ["p", "q"], dt=dt, ticks=ticks, by=score)
        for name in ("p", "q"):
            want = led.scores(name, dt=dt, ticks=ticks)[score].to_numpy()
            np.testing.assert_array_equal(table[name].to_numpy(), want)
        got = correlate(led, ["p", "q"], dt=dt, ticks=ticks, by=score)["r"].to_numpy()
        np.testing.assert_allclose(got, [np.corrcoef(table["p"].to_numpy(), table["q"].to_numpy())[0, 1]])


@pytest.fixture(scope="module")
def bad_ledger(tmp_path_factory) -> ll.Ledger:
    """Runs a, b and one named like an ensemble column; nothing is written to it by the tests."""
    led = ll.create(tmp_path_factory.mktemp("b") / "b.ll", n_samples=3, labels=[0, 1, 0])
    write_runs(led, {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32),
                     "mean": np.ones((1, 3), np.float32)})
    return led


@pytest.mark.parametrize(
    ("call", "error", "builtin", "advice"),
    [
        (lambda led: ensemble(led, ["a", "nope"]), E.UnknownRunError, KeyError, r"choose from \['a', 'b', 'mean'\]"),
        (lambda led: correlate(led, ["nope", "a"]), E.UnknownRunError, KeyError, "choose from"),
        (lambda led: ensemble(led, ["a", "b", "a"]), E.ShapeMismatchError, ValueError, "name each run once"),
        (lambda led: correlate(led, ["b", "b"]), E.ShapeMismatchError, ValueError, "name each run once"),
        (lambda led: ensemble(led, []), E.ShapeMismatchError, ValueError, "at least 1 run.*pass run names"),
        (lambda led: correlate(led, ["a"]), E.ShapeMismatchError, ValueError, "at least 2 run.*pass run names"),
        (lambda led: ensemble(led, "a"), E.ShapeMismatchError, ValueError, "must be a list of run names"),
        (lambda led: correlate(led, ["a", "b"], method="kendall"), E.ShapeMismatchError, ValueError,
         r"one of \['pearson', 'spearman'\]"),
        (lambda led: correlate(led, ["a", "b"], quantiles=[0.5, 0.0]), E.ShapeMismatchError, ValueError,
         r"\(0, 1\].*pass e\.g\."),
        (lambda led: correlate(led, ["a", "b"], quantiles=[1.5]), E.ShapeMismatchError, ValueError, "pass e.g."),
        (lambda led: correlate(led, ["a", "b"], quantiles=[-0.1]), E.ShapeMismatchError, ValueError, "pass e.g."),
        (lambda led: correlate(led, ["a", "b"], quantiles=[float("nan")]), E.ShapeMismatchError, ValueError,
         "pass e.g."),
        (lambda led: correlate(led, ["a", "b"], quantiles=0.5), E.ShapeMismatchError, ValueError, "must be a list"),
        (lambda led: ensemble(led, ["a"], by="n_obs"), E.ShapeMismatchError, ValueError, "choose one of"),
        (lambda led: ensemble(led, ["a", "mean"]), E.InvalidNameError, ValueError, "ledger.scores"),
        (lambda led: ensemble(led, ["a"], "margin"), E.UnknownStreamError, KeyError, "streams are"),
    ],
)
def test_bad_input(bad_ledger, call, error, builtin, advice):
    with pytest.raises(error, match=advice) as info:
        call(bad_ledger)
    assert isinstance(info.value, builtin) and isinstance(info.value, E.LedgerError)
