"""Round trips through a real Zarr store on disk: what is logged is what is read back, NaN elsewhere."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossledger as ll
from lossledger.errors import LedgerWarning


@st.composite
def tick_plans(draw):
    n = draw(st.integers(1, 40))
    use_custom_ids = draw(st.booleans())
    n_ticks = draw(st.integers(1, 5))
    plan = []
    for _ in range(n_ticks):
        logged = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
        n_batches = draw(st.integers(1, 3))
        plan.append((logged, n_batches))
    return n, use_custom_ids, plan


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=tick_plans(), seed=st.integers(0, 2**32 - 1))
def test_round_trip_matches_numpy_reference(tmp_path_factory, spec, seed):
    n, use_custom_ids, plan = spec
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64) if use_custom_ids else np.arange(n)
    path = tmp_path_factory.mktemp("rt") / "rt.ll"
    led = ll.create(path, sample_ids=ids) if use_custom_ids else ll.create(path, n_samples=n)
    expected = {"loss": np.full((len(plan), n), np.nan, np.float32),
                "loc": np.full((len(plan), n), np.nan, np.float32),
                "emb": np.full((len(plan), n, 3), np.nan, np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)  # ticks with nothing logged warn
        with led.run("r") as run:
            for t, (rows, n_batches) in enumerate(plan):
                rows = np.array(rows, dtype=np.int64)
                for batch in np.array_split(rows, n_batches):
                    if batch.size == 0:
                        continue
                    loss = rng.random(batch.size).astype(np.float32)
                    loc = rng.random(batch.size)
                    emb = rng.standard_normal((batch.size, 3)).astype(np.float32)
                    run.log(ids[batch], loss=loss, loc=loc)
                    run.log(ids[batch], emb=emb)
                    expected["loss"][t, batch] = loss
                    expected["loc"][t, batch] = loc.astype(np.float32)
                    expected["emb"][t, batch] = emb
                assert run.end_epoch() == t
    reader = ll.open(path)
    for stream, want in expected.items():
        if stream not in reader.streams("r")["stream"].to_pylist():
            assert np.isnan(want).all()
            continue
        got = reader.trajectories("r", stream)
        np.testing.assert_array_equal(got, np.moveaxis(want, 0, 1))
        # And the same bytes through plain Zarr: the store is standard Zarr v3.
        raw = zarr.open_array(path / "runs" / "r" / "streams" / stream, mode="r")
        assert raw.shape[0] >= len(plan)  # the shape is a capacity; ticks past the commit read as NaN
        np.testing.assert_array_equal(raw[: len(plan)], want)
        assert np.isnan(raw[len(plan) :]).all()
        picked = rng.permutation(n)[: max(1, n // 2)]
        np.testing.assert_array_equal(
            reader.trajectories("r", stream, ids=ids[picked], ticks=[len(plan) - 1, 0]),
            np.moveaxis(want[[len(plan) - 1, 0]][:, picked], 0, 1),
        )


def test_ticks_record_epoch_step_and_wall(ledger):
    with ledger.run("r") as run:
        for _ in range(3):
            run.log([0, 1], loss=[0.1, 0.2])
            run.log([2], loss=[0.3])
            run.end_epoch()
        run.log([0], loss=[1.0])
        run.end_epoch(epoch=10, step=100)
    ticks = ledger.ticks("r").to_pydict()
    assert ticks["tick"] == [0, 1, 2, 3]
    assert ticks["epoch"] == [0, 1, 2, 10]
    assert ticks["step"] == [2, 4, 6, 100]
    assert all(b > a for a, b in zip(ticks["wall"], ticks["wall"][1:]))


def test_tick_rows_pending_in_the_commit_record_reach_the_arrays(ledger, monkeypatch):
    """Tick rows wait in the commit record until TICKS_FLUSH commits or close(); readers never notice."""
    monkeypatch.setattr("lossledger.run.TICKS_FLUSH", 3)
    root = ledger.path / "runs" / "r"

    def in_arrays() -> list[int]:
        epoch = zarr.open_array(root / "ticks" / "epoch", mode="r")
        return [int(e) for e in epoch[:] if e >= 0]

    run = ledger.run("r")
    for t in range(7):
        run.log([t % 10], loss=[float(t)])
        run.end_epoch(epoch=100 + t, step=10 * t)
        reader = ll.open(ledger.path)
        assert reader.ticks("r")["epoch"].to_pylist() == list(range(100, 101 + t))
        assert reader.ticks("r")["step"].to_pylist() == [10 * i for i in range(t + 1)]
        assert in_arrays() == list(range(100, 100 + 3 * ((t + 1) // 3)))
    run.close()
    assert in_arrays() == list(range(100, 107))
    assert zarr.open_group(root, mode="r").attrs["commit"]["pending_ticks"] == {"epoch": [], "step": [], "wall": []}
    with ledger.run("r") as run:
        run.log([0], loss=[1.0])
        assert run.end_epoch() == 7
    assert ledger.ticks("r")["epoch"].to_pylist() == [*range(100, 107), 107]
    assert ledger.ticks("r")["step"].to_pylist() == [*range(0, 70, 10), 61]


def test_resume_continues_after_last_committed_tick(ledger):
    with ledger.run("r", model="mlp", seed=0) as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
    with ledger.run("r") as run:
        assert run.ticks == 1
        assert run.attrs == {"model": "mlp", "seed": 0}
        run.log([1, 2], loss=[3.0, 4.0], margin=[0.5, -0.5])
        assert run.end_epoch() == 1
    traj = ledger.trajectories("r", ids=[0, 1, 2])
    np.testing.assert_array_equal(traj, [[1.0, np.nan], [2.0, 3.0], [np.nan, 4.0]])
    # A stream that starts at tick 1 is NaN before it.
    np.testing.assert_array_equal(ledger.trajectories("r", "margin", ids=[1, 2]), [[np.nan, 0.5], [np.nan, -0.5]])
    streams = ledger.streams("r").to_pydict()
    assert streams["stream"] == ["loss", "margin"] and streams["since"] == [0, 1]
    assert ledger.ticks("r")["epoch"].to_pylist() == [0, 1]


def test_uncommitted_tick_is_discarded_loudly(ledger):
    run = ledger.run("r")
    run.log([0], loss=[1.0])
    run.end_epoch()
    run.log([1], loss=[2.0])
    with pytest.warns(LedgerWarning, match="discarded"):
        run.close()
    assert ledger.ticks("r").num_rows == 1
    np.testing.assert_array_equal(ledger.trajectories("r", ids=[0, 1]), [[1.0], [np.nan]])


@pytest.mark.parametrize(
    ("mode", "expected"), [("first", [1.0, 5.0]), ("last", [3.0, 6.0]), ("mean", [2.0, 5.5])]
)
def test_on_duplicate_policies(ledger, mode, expected):
    with ledger.run("r", on_duplicate=mode) as run:
        run.log([0, 1, 0], loss=[1.0, 5.0, 2.0])
        run.log([0, 1], loss=[3.0, 6.0])
        run.end_epoch()
    np.testing.assert_allclose(ledger.trajectories("r", ids=[0, 1])[:, 0], expected)


def test_float16_stream_and_integer_and_bool_values(ledger):
    with ledger.run("r", stream_dtypes={"loss": "float16"}) as run:
        run.log([0, 1], loss=np.array([0.1, 1000.0]), correct=np.array([True, False]), count=[3, 4])
        run.end_epoch()
    loss = ledger.trajectories("r", ids=[0, 1])
    assert loss.dtype == np.float16
    np.testing.assert_allclose(loss[:, 0].astype(np.float32), [0.1, 1000.0], rtol=1e-3)
    np.testing.assert_array_equal(ledger.trajectories("r", "correct", ids=[0, 1])[:, 0], [1.0, 0.0])
    np.testing.assert_array_equal(ledger.trajectories("r", "count", ids=[0, 1])[:, 0], [3.0, 4.0])


class _DLPackOnly:
    """An object that only speaks DLPack (as a jax array or a CuPy array on the host would)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class _ArrayLike:
    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array


def test_log_accepts_sequences_array_protocol_and_dlpack(ledger):
    with ledger.run("r") as run:
        run.log(_ArrayLike(np.array([0, 1])), loss=_DLPackOnly(np.array([0.5, 0.25], np.float32)))
        run.log((2,), loss=_ArrayLike(np.array([0.125])))
        run.end_epoch()
    np.testing.assert_array_equal(ledger.trajectories("r", ids=[0, 1, 2])[:, 0], [0.5, 0.25, 0.125])


def test_nonfinite_values_stored_when_allowed(ledger):
    with ledger.run("r", allow_nonfinite=True) as run:
        run.log([0, 1], loss=[np.inf, np.nan])
        run.end_epoch()
    np.testing.assert_array_equal(ledger.trajectories("r", ids=[0, 1])[:, 0], [np.inf, np.nan])


def test_reader_sees_only_committed_ticks(ledger):
    reader = ll.open(ledger.path)
    run = ledger.run("r")
    run.log([0], loss=[1.0])
    run.end_epoch()
    run.log([0], loss=[2.0])  # logged, not committed
    assert reader.ticks("r").num_rows == 1
    assert reader.trajectories("r").shape == (10, 1)
    run.end_epoch()
    assert reader.trajectories("r", ids=[0]).tolist() == [[1.0, 2.0]]
    run.close()


def test_runs_listing_info_and_attrs(ledger):
    with ledger.run("b-run", lr=0.1):
        pass
    with ledger.run("a-run", model="mlp") as run:
        run.log([0], loss=[1.0], pix=np.zeros((1, 2, 2)))
        run.end_epoch()
    assert ledger.runs == ["a-run", "b-run"]
    attrs = ledger.run_attrs("a-run")
    assert attrs["model"] == "mlp" and attrs["created"] and attrs["updated"]
    text = ll.open(ledger.path).info()
    assert "samples: 10" in text and "a-run: 1 tick(s); streams: loss, pix(2, 2); model=mlp" in text
    assert "b-run: 0 tick(s)" in text


def test_samples_table_with_custom_ids_and_splits(tmp_path):
    led = ll.create(tmp_path / "s.ll", sample_ids=[30, 10, 20], labels=[1, 0, 1], classes=["neg", "pos"],
                    splits=["train", "test", "train"])
    table = ll.open(led.path).samples
    assert table["sample_id"].to_pylist() == [30, 10, 20]
    assert table["class"].to_pylist() == ["pos", "neg", "pos"]
    assert table["split"].to_pylist() == ["train", "test", "train"]


def test_overwrite_replaces_a_ledger(ledger):
    with ledger.run("r") as run:
        run.log([0], loss=[1.0])
        run.end_epoch()
    fresh = ll.create(ledger.path, n_samples=3, overwrite=True)
    assert fresh.n_samples == 3 and fresh.runs == []


def test_nan_marks_ignored_elements_but_inf_and_scalar_nan_raise(ledger):
    with ledger.run("r") as run:
        maps = np.ones((2, 2, 3), np.float32)
        maps[0, 0, 0] = np.nan  # an ignored pixel
        run.log([0, 1], pixel=maps)
        maps[1, 1, 1] = np.inf
        with pytest.raises(ll.errors.NonFiniteValueError, match="1 inf value"):
            run.log([2, 3], pixel=maps)
        with pytest.raises(ll.errors.NonFiniteValueError, match="NaN/inf"):
            run.log([0], loss=[np.nan])
        run.end_epoch()
    got = ledger.trajectories("r", "pixel", ids=[0, 2])
    assert np.isnan(got[0, 0, 0, 0]) and (got[0, 0][~np.isnan(got[0, 0])] == 1).all() and np.isnan(got[1]).all()


def test_bfloat16_values_from_ml_dtypes_are_stored_as_float32(ledger):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with ledger.run("r") as run:
        run.log([0, 1], loss=np.array([0.5, 1.25], dtype=ml_dtypes.bfloat16))
        run.end_epoch()
    np.testing.assert_array_equal(ledger.trajectories("r", ids=[0, 1])[:, 0], [0.5, 1.25])


def test_a_forked_child_commits_after_its_parent_did(ledger, monkeypatch):
    """The writer's thread pool is per process: a child forked after the parent committed must not wait on the
    parent's threads (which a fork does not copy)."""
    import os

    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 8)  # 5 chunk files per tick: the pool is used

    with ledger.run("parent") as run:
        run.log(list(range(10)), loss=np.ones(10))
        run.end_epoch()
    pid = os.fork()
    if pid == 0:  # the child: commit a tick of its own run, then leave without running the parent's cleanup
        code = 1
        try:
            with ledger.run("child") as run:
                run.log(list(range(10)), loss=np.full(10, 2.0))
                run.end_epoch()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung committing its tick")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    np.testing.assert_array_equal(ll.open(ledger.path).trajectories("child")[:, 0], np.full(10, 2.0))


def test_a_stream_first_logged_in_a_tick_discarded_on_close_is_not_committed(ledger):
    # close() commits once more (the pending tick rows move to ticks/); a stream first logged in the discarded tick
    # must not be in that record: it would name a stream with no committed tick, which readers refuse as damage.
    run = ledger.run("r")
    run.log([0], loss=[1.0])
    run.end_epoch()
    run.log([0, 1], other=[1.0, 2.0])
    with pytest.warns(LedgerWarning, match="discarded on close"):
        run.close()
    reader = ll.open(ledger.path)
    assert reader.streams("r")["stream"].to_pylist() == ["loss"]
    assert reader.ticks("r").num_rows == 1
    with ledger.run("r") as run:  # resumes; the new stream can be logged afresh
        run.log([1], other=[3.0])
        run.end_epoch()
    np.testing.assert_array_equal(ll.open(ledger.path).trajectories("r", "other", ids=[1])[0], [np.nan, 3.0])


def test_discard_drops_the_tick_and_the_streams_first_logged_in_it(ledger):
    with ledger.run("r") as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
        run.log([2], loss=[3.0], other=[4.0])
        run.log([3], loss=[5.0])
        assert run.discard() == 3
        run.log([4], loss=[6.0])
        assert run.end_epoch() == 1
    reader = ll.open(ledger.path)
    assert reader.streams("r")["stream"].to_pylist() == ["loss"]
    np.testing.assert_array_equal(reader.trajectories("r", ids=[2, 3, 4])[:, 1], [np.nan, np.nan, 6.0])
    assert reader.ticks("r")["step"].to_pylist() == [1, 2]  # the discarded log calls are no steps


def _float16_edge_values(rng, size):
    """float32 values a float16 cast must get right: ties between float16 neighbours, subnormals, the largest
    float16 and values that round to it, signed zeros, NaN, and plain losses."""
    step = np.float32(2.0**-10)
    ties = (1 + step * (np.arange(64, dtype=np.float32) + 0.5)).astype(np.float32)  # halfway: round to even
    special = np.array([0.0, -0.0, 65504.0, -65504.0, 65503.9, 65488.1, 6.1e-5, 5.96e-8, 2.9e-8, 3e-8, -1e-7,
                        np.nan, 1e-30, 0.1, 1000.0], np.float32)
    edges = np.concatenate([ties, -ties * 1024, special, rng.uniform(0, 1e-4, 256).astype(np.float32)])
    values = rng.exponential(0.2, size).astype(np.float32)
    values[rng.random(size) < 0.1] = np.nan
    k = min(size, edges.size)
    values.reshape(-1)[rng.choice(size, k, replace=False)] = rng.choice(edges, k, replace=False)
    return values


@pytest.mark.parametrize("n_values", [100, 1 << 16])  # below and above the size cast by pyarrow
def test_as_float16_has_the_bits_of_numpys_cast(n_values):
    rng = np.random.default_rng(n_values)
    from lossledger.run import as_float16

    finite = rng.integers(0, 0x477FE000, n_values, dtype=np.uint32)  # every float32 bit pattern up to 65504
    signed = finite | (rng.integers(0, 2, n_values, dtype=np.uint32) << 31)
    for values in (signed.view(np.float32), _float16_edge_values(rng, n_values)):
        got, expected = as_float16(values), values.astype(np.float16)
        assert got.dtype == np.float16 and got.shape == values.shape
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(got)], expected.view(np.uint16)[~np.isnan(got)])
    halves = _float16_edge_values(rng, 10).astype(np.float16)
    assert as_float16(halves) is halves
    np.testing.assert_array_equal(as_float16(np.array([0.1, 3.0])), np.float32([0.1, 3.0]).astype(np.float16))


@pytest.mark.parametrize("mode", ["error", "first", "last", "mean"])
def test_float16_maps_store_numpys_cast_of_what_was_logged(tmp_path, mode):
    """(64, 64) float16 maps of 300 samples (128 per chunk: an edge chunk of 44), logged over several calls of
    several batch sizes (numpy's and pyarrow's cast), some samples twice, some never: the stored maps are
    numpy's float32 -> float16 cast of the float32 value the mode keeps (mean: float32 sums / count), NaN
    where not logged."""
    n, shape, ticks = 300, (64, 64), 2
    rng = np.random.default_rng(7)
    led = ll.create(tmp_path / "h.ll", n_samples=n)
    expected = np.full((ticks, n, *shape), np.nan, np.float32)
    with led.run("r", stream_dtypes={"pixel": "float16"}, on_duplicate=mode) as run:
        for t in range(ticks):
            sums = np.zeros((n, *shape), np.float32)
            counts = np.zeros(n, int)
            order = rng.permutation(n)[: n - 20 - 30 * t]  # not all logged; the last chunk's samples partly
            if mode != "error":
                order = np.concatenate([order, rng.choice(order, 40)])  # some twice, across calls
            lo = 0
            for size in (1, 7, 40, 3, 90, 1000):
                ids = order[lo : lo + size]
                lo += size
                if mode != "error" and size == 40:
                    ids = np.concatenate([ids, ids[:2]])  # duplicates within one call, too
                maps = _float16_edge_values(rng, ids.size * 4096).reshape(ids.size, *shape)
                maps[:, 0, 0] = rng.uniform(-65504, 65504, ids.size)  # large values of both signs
                run.log(ids, pixel=maps)
                for i, m in zip(ids, maps):  # the reference, sample by sample in logging order
                    if mode == "first" and counts[i]:
                        continue
                    sums[i] = sums[i] + m if mode == "mean" else m  # a mean's sum starts at +0.0
                    counts[i] += 1
            logged = counts > 0
            expected[t, logged] = sums[logged] / counts[logged, None, None] if mode == "mean" else sums[logged]
            run.end_epoch()
    got = led.trajectories("r", "pixel")  # (N, T, 64, 64)
    reference = expected.swapaxes(0, 1).astype(np.float16)
    assert got.dtype == np.float16 and got.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(reference))
    assert np.isnan(got[~logged, -1]).all()  # samples not logged in the last tick
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(got)], reference.view(np.uint16)[~np.isnan(got)])


def test_float16_maps_refuse_values_out_of_range_and_inf_and_write_nothing(ledger):
    with ledger.run("r", stream_dtypes={"pixel": "float16"}, allow_nonfinite=True) as run:
        ok = np.full((2, 3, 4), 65504.0, np.float32)
        ok[0, 0, 0] = np.nan
        run.log([0, 1], pixel=-ok)
        for bad in (65504.5, np.inf, -70000.0):
            maps = np.ones((2, 3, 4), np.float32)
            maps[1, 2, 3] = bad
            with pytest.raises(ll.errors.NonFiniteValueError, match="above 65504"):
                run.log([2, 3], pixel=maps)
        run.end_epoch()
    got = ledger.trajectories("r", "pixel")
    assert np.isnan(got[0, 0, 0, 0]) and (got[0, :2][~np.isnan(got[0, :2])] == -65504).all()
    assert np.isnan(got[0, 2:]).all()
