"""Scores equal a plain numpy reference on random trajectories with NaNs, for every dt mode."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossledger as ll
from lossledger import errors as E
from lossledger.errors import LedgerWarning


def reference(values: np.ndarray, dts: np.ndarray) -> dict[str, np.ndarray]:
    """Plain numpy: values (T, N) with NaN = not observed; dts (T,)."""
    if values.shape[0] == 0:
        values, dts = np.full((1, values.shape[1]), np.nan, np.float32), np.ones(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        observed = ~np.isnan(values)
        n_obs = observed.sum(0)
        first_idx = np.argmax(observed, 0)
        last_idx = values.shape[0] - 1 - np.argmax(observed[::-1], 0)
        cols = np.arange(values.shape[1])
        out = {
            "action": np.nansum(values.astype(np.float64) * dts[:, None], 0),
            "variance": np.nanvar(values.astype(np.float64), 0),
            "mean": np.nanmean(values.astype(np.float64), 0),
            "first": values[first_idx, cols].astype(np.float64),
            "last": values[last_idx, cols].astype(np.float64),
            "min": np.nanmin(values, 0).astype(np.float64),
            "max": np.nanmax(values, 0).astype(np.float64),
        }
    for name in out:
        out[name] = np.where(n_obs > 0, out[name], np.nan)
    out["n_obs"] = n_obs
    return out


@st.composite
def ledgers(draw):
    n = draw(st.integers(1, 30))
    n_ticks = draw(st.integers(0, 6))
    steps = draw(st.lists(st.integers(1, 50), min_size=n_ticks, max_size=n_ticks))
    masks = [draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(n_ticks)]
    seed = draw(st.integers(0, 2**32 - 1))
    window = draw(st.one_of(st.none(), st.lists(st.integers(0, max(0, n_ticks - 1)), max_size=4)))
    return n, steps, masks, seed, (window if n_ticks else None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=ledgers(), small_chunks=st.booleans())
def test_scores_match_numpy(tmp_path_factory, monkeypatch, spec, small_chunks):
    n, steps, masks, seed, window = spec
    if small_chunks:  # several sample blocks and several tick slabs per block
        monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
        monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 48)
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("s") / "s.ll"
    led = ll.create(path, n_samples=n, labels=rng.integers(0, 3, n))
    values = np.full((len(steps), n), np.nan, np.float32)
    total_step = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)
        with led.run("r") as run:
            for t, (step, mask) in enumerate(zip(steps, masks)):
                ids = np.flatnonzero(mask)
                if ids.size:
                    v = rng.exponential(1.0, ids.size).astype(np.float32)
                    run.log(ids, loss=v)
                    values[t, ids] = v
                total_step += step
                run.end_epoch(step=total_step)
    ticks = led.ticks("r")
    step_dt = np.diff(ticks["step"].to_numpy().astype(float), prepend=0.0)
    wall_dt = np.diff(ticks["wall"].to_numpy(), prepend=0.0)
    sel = np.arange(len(steps)) if window is None else np.unique(np.asarray(window, dtype=int))
    for dt, dts in (("epoch", np.ones(len(steps))), ("step", step_dt), ("wall", wall_dt)):
        if not np.any(masks):
            with pytest.raises(E.UnknownStreamError):
                led.scores("r", dt=dt)
            continue
        table = led.scores("r", dt=dt, ticks=window)
        want = reference(values[sel], dts[sel])
        assert table["sample_id"].to_pylist() == list(range(n))
        for name, expected in want.items():
            np.testing.assert_allclose(table[name].to_numpy(), expected, rtol=1e-9, atol=1e-9, err_msg=name)


def test_element_stream_scores_average_over_observed_elements(ledger):
    pix = np.array([[[1.0, 2.0], [np.nan, 4.0]]], np.float32)
    with ledger.run("r", allow_nonfinite=True) as run:
        run.log([0], pixel=pix)
        run.end_epoch()
        run.log([0], pixel=pix * 3)
        run.end_epoch()
    row = ledger.scores("r", "pixel").to_pylist()[0]
    # element actions 4, 8, -, 16 -> mean over the 3 observed elements
    assert row["action"] == pytest.approx((4 + 8 + 16) / 3)
    assert row["n_obs"] == 2
    assert ledger.scores("r", "pixel").to_pylist()[1]["n_obs"] == 0


def test_scores_cache_is_used_and_refreshed_on_new_ticks(ledger):
    with ledger.run("r") as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
        first = ledger.scores("r")
        cache = ledger.path / "cache" / "scores" / "r" / "loss.epoch.parquet"
        assert cache.exists()
        mtime = cache.stat().st_mtime_ns
        second = ledger.scores("r")
        assert cache.stat().st_mtime_ns == mtime
        for name in first.column_names:
            np.testing.assert_array_equal(second[name].to_numpy(), first[name].to_numpy())
        run.log([0], loss=[5.0])
        run.end_epoch()
    again = ll.open(ledger.path).scores("r")
    assert again["action"].to_pylist()[:2] == [6.0, 2.0]
    assert again["n_obs"].to_pylist()[:2] == [2, 1]


def test_scores_bad_arguments(ledger):
    with ledger.run("r") as run:
        run.log([0], loss=[1.0])
        run.end_epoch()
    with pytest.raises(E.ShapeMismatchError, match="dt must be one of"):
        ledger.scores("r", dt="hour")
    with pytest.raises(E.UnknownStreamError, match="streams are"):
        ledger.scores("r", "margin")
