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
    out = {name: np.where(n_obs > 0, values, np.nan) for name, values in out.items()}
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
    if small_chunks:  # several sample blocks, several tick slabs per block and several tiles per slab
        monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
        monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 96)
        monkeypatch.setattr("lossledger.scores.TILE_VALUES", 5)  # several tiles per slab
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
        cache = ledger.path / "cache" / "scores" / "r" / "loss.epoch.arrow"
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


def test_all_dt_modes_in_one_read_equal_each_alone(ledger, monkeypatch):
    from lossledger import _scan
    from lossledger._scoring import stored_scores, stored_scores_all

    rng = np.random.default_rng(4)
    with ledger.run("r") as run:
        for t in range(5):
            ids = rng.choice(10, size=7, replace=False)
            run.log(ids, loss=rng.exponential(1.0, 7))
            run.end_epoch(step=3 * (t + 1) + t)
    reads = []
    real = _scan.ChunkSource.read
    monkeypatch.setattr(_scan.ChunkSource, "read", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    together = stored_scores_all(ledger._io, ledger._samples, "r", "loss")
    assert len(reads) == 5  # one read of each tick's chunk for the three modes
    for dt in ("epoch", "step", "wall"):
        (ledger.path / "cache" / "scores" / "r" / f"loss.{dt}.arrow").unlink()
        alone = stored_scores(ledger._io, ledger._samples, "r", "loss", dt, None)
        assert together[dt].table.equals(alone), dt
    assert not together["step"].table["action"].equals(together["epoch"].table["action"])


def test_a_held_result_is_reused_until_its_cache_file_changes(ledger):
    with ledger.run("r") as run:
        run.log([0, 1], loss=[1.0, 2.0])
        run.end_epoch()
    first = ledger.scores("r")
    assert ledger.scores("r") is first  # Ledger.top after Ledger.scores reads nothing
    cache = ledger.path / "cache" / "scores" / "r" / "loss.epoch.arrow"
    cache.unlink()
    second = ledger.scores("r")
    assert second is not first and cache.exists()
    for name in first.column_names:
        np.testing.assert_array_equal(second[name].to_numpy(), first[name].to_numpy())
    assert ledger.scores("r", ticks=[0]) is not ledger.scores("r", ticks=[0])  # windows are not cached


def test_element_stream_over_many_slabs_and_tiles_matches_numpy(tmp_path, monkeypatch):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 48)  # 3 samples of 2x2 float32 per chunk
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 200)
    monkeypatch.setattr("lossledger.scores.TILE_VALUES", 7)
    rng = np.random.default_rng(5)
    n, n_ticks = 8, 6
    values = rng.exponential(1.0, (n_ticks, n, 2, 2)).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = np.nan
    values[:, 2] = np.nan  # never observed
    led = ll.create(tmp_path / "e.ll", n_samples=n)
    with led.run("r", allow_nonfinite=True) as run:
        for t in range(n_ticks):
            run.log(np.arange(n), pixel=values[t])
            run.end_epoch()
    table = led.scores("r", "pixel")
    flat = reference(values.reshape(n_ticks, -1), np.ones(n_ticks))
    observed = (flat["n_obs"] > 0).reshape(n, 4)
    for name in ("action", "variance", "mean", "first", "last", "min", "max"):
        per_element = np.where(observed, flat[name].reshape(n, 4), 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = per_element.sum(1) / observed.sum(1)
        np.testing.assert_allclose(table[name].to_numpy(), want, rtol=1e-9, err_msg=name)
    assert table["n_obs"].to_pylist() == flat["n_obs"].reshape(n, 4).max(1).tolist()


def test_chunk_reader_agrees_with_zarr(tmp_path, monkeypatch):
    from lossledger._scan import ChunkSource

    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
    led = ll.create(tmp_path / "z.ll", n_samples=10)
    rng = np.random.default_rng(6)
    with led.run("r", stream_dtypes={"half": "float16"}) as run:
        for t in range(3):
            ids = np.arange(10) if t != 1 else np.array([9])  # tick 1: most chunks never written
            run.log(ids, loss=rng.random(ids.size), half=rng.random(ids.size))
            run.end_epoch()
    for stream in ("loss", "half"):
        array = led._io.open_array(f"runs/r/streams/{stream}")
        source = ChunkSource(array)
        assert source.direct and source.n_cols == -(-10 // source.per_chunk)
        for t in range(3):
            got = np.concatenate([source.read(t, c) for c in range(source.n_cols)])
            np.testing.assert_array_equal(got, array[t, :].astype(np.float32), err_msg=f"{stream} tick {t}")
            assert got.dtype == np.float32


def test_damaged_chunk_is_reported(ledger):
    with ledger.run("r") as run:
        run.log(np.arange(10), loss=np.ones(10))
        run.end_epoch()
    chunk = ledger.path / "runs" / "r" / "streams" / "loss" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(E.CorruptLedgerError, match="restore it from a copy"):
        ledger.scores("r")


def _scores_in_child(path: str, queue) -> None:
    led = ll.open(path)
    queue.put(led.scores("r", ticks=[0, 1])["action"].to_pylist())  # a window: computed, not read from the cache


def test_a_forked_child_reads_after_its_parent_did(ledger):
    import multiprocessing
    import threading

    from lossledger import _scan

    with ledger.run("r") as run:
        for t in range(2):
            run.log(np.arange(10), loss=np.arange(10, dtype=np.float32) + t)
            run.end_epoch()
    want = ledger.scores("r", ticks=[0, 1])["action"].to_pylist()
    pool = _scan._read_pool()  # make every reading thread of the parent exist, as after a large read
    barrier = threading.Barrier(_scan.READ_THREADS + 1)
    started = [pool.submit(barrier.wait) for _ in range(_scan.READ_THREADS)]
    barrier.wait()
    for future in started:
        future.result()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_scores_in_child, args=(str(ledger.path), queue))
    child.start()
    child.join(120)  # a child that waits for its parent's threads, which fork does not copy, never ends
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=10) == want


# --- where results live: memory-mapped files ------------------------------------------------------------------
def _filled(path, n=3000, n_ticks=4, seed=7):
    """A ledger of ``n`` samples with labels; ~20% of values not logged. Returns (ledger, values (T, N))."""
    rng = np.random.default_rng(seed)
    led = ll.create(path, n_samples=n, labels=rng.integers(0, 4, n), classes=["a", "b", "c", "d"])
    values = rng.exponential(1.0, (n_ticks, n)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    values[:, 5] = np.nan  # never observed
    with led.run("r") as run:
        for t in range(n_ticks):
            ids = np.flatnonzero(~np.isnan(values[t]))
            run.log(ids, loss=values[t, ids])
            run.end_epoch()
    return ll.open(path), values


def _assert_reference(table, values):
    want = reference(values, np.ones(values.shape[0]))
    for name, expected in want.items():
        np.testing.assert_allclose(table[name].to_numpy(), expected, rtol=1e-12, err_msg=name)


def test_scores_are_a_memory_map_of_the_cache_not_a_copy(tmp_path):
    import pyarrow as pa

    led, values = _filled(tmp_path / "m.ll")
    before = pa.total_allocated_bytes()
    computed = led.scores("r")  # computed into the cache file, handed out mapped
    cached = ll.open(led.path).scores("r")  # read from the cache file: only its footer
    grown = pa.total_allocated_bytes() - before
    assert grown < led.n_samples  # a copy of one column would be 8 bytes per sample
    for table in (computed, cached):
        _assert_reference(table, values)
        assert table.num_rows == led.n_samples and table["action"].null_count == 0


def test_uncached_results_leave_no_file_behind(tmp_path, monkeypatch):
    import tempfile

    led, values = _filled(tmp_path / "u.ll")
    files = {p for p in led.path.rglob("*") if p.is_file()}
    _assert_reference(led.scores("r", ticks=[0, 2]), values[[0, 2]])  # a window: an unnamed temp file
    # The cache folder cannot be made (a file is in the way): computed into an unnamed temp file in cache/.
    (led.path / "cache").mkdir(exist_ok=True)
    (led.path / "cache" / "scores").write_bytes(b"")
    _assert_reference(ll.open(led.path).scores("r"), values)
    assert {p for p in led.path.rglob("*") if p.is_file()} == files | {led.path / "cache" / "scores"}
    # Neither cache/ nor the system temp folder can hold a file: the result is built in memory.
    (led.path / "cache" / "scores").unlink()
    (led.path / "cache").rmdir()
    (led.path / "cache").write_bytes(b"")
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))
    _assert_reference(ll.open(led.path).scores("r"), values)
    _assert_reference(ll.open(led.path).scores("r", ticks=slice(1, None)), values[1:])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other commit", "other rows"])
def test_a_bad_cache_file_is_recomputed(tmp_path, damage):
    import json

    import pyarrow as pa

    led, values = _filled(tmp_path / "d.ll")
    led.scores("r")
    cache = led.path / "cache" / "scores" / "r" / "loss.epoch.arrow"
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:-100])
    elif damage == "garbage":
        cache.write_bytes(b"ARROW1" + bytes(500))
    else:
        with pa.ipc.open_file(cache) as reader:
            table = reader.read_all()
        meta = json.loads(table.schema.metadata[b"lossledger"])
        if damage == "other commit":
            meta["ticks"] -= 1
        else:
            table = table.slice(1)
        with pa.ipc.new_file(cache, table.schema.with_metadata({b"lossledger": json.dumps(meta).encode()})) as w:
            w.write_table(table)
    _assert_reference(ll.open(led.path).scores("r"), values)


def test_sample_index_checks_ids_a_chunk_at_a_time(monkeypatch):
    from lossledger import _samples

    monkeypatch.setattr(_samples, "_CHUNK", 4)
    assert _samples.SampleIndex(np.arange(10))._identity
    swapped = np.arange(10)
    swapped[[5, 6]] = swapped[[6, 5]]  # same ends, one pair out of order in the second chunk
    index = _samples.SampleIndex(swapped)
    assert not index._identity
    np.testing.assert_array_equal(index.rows(np.array([5, 6, 9])), [6, 5, 9])


def test_blocks_stay_narrow_when_a_run_has_few_ticks(tmp_path, monkeypatch):
    from lossledger import _scoring

    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 64)  # 16 samples per chunk
    monkeypatch.setattr(_scoring, "BLOCK_VALUES", 40)  # blocks of at most 2 chunks
    widths = []
    real = _scoring.score_blocks

    def recording(*args, **kwargs):
        for lo, hi, stats in real(*args, **kwargs):
            widths.append(hi - lo)
            yield lo, hi, stats

    monkeypatch.setattr(_scoring, "score_blocks", recording)
    led, values = _filled(tmp_path / "f.ll", n=200, n_ticks=1)
    _assert_reference(led.scores("r"), values)
    assert max(widths) == 32 and sum(widths) == 200
