"""``scores(engine="dask")`` equals the local engine bit for bit, and numpy, computed on a real LocalCluster's workers."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import zarr
import zarr.codecs
from distributed import Client, LocalCluster, get_task_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossledger as ll
from lossledger import errors as E
from lossledger._dask_engine import BlockJob, score_block
from lossledger._scan import block_layout, scan

N, T = 3000, 12
#: Small chunks and scan budget (set in the client only: tasks get the resulting plan from it), so a call is
#: many blocks, each several tick slabs.
CHUNK_BYTES, BUDGET = 4096, 32768
STREAMS = {  # name: (stored dtype, element shape, first tick logged)
    "loss": ("float32", (), 0),
    "loss16": ("float16", (), 0),
    "pixel": ("float16", (4, 3), 0),
    "pixel32": ("float32", (4, 3), 3),
}
WINDOWS = [None, slice(2, 9), [11, 0, 5, 5]]


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread each; not the default client, so each test says where tasks go."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(2)
        yield client


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A ledger written by the real writer: NaN gaps, never-observed samples, uneven steps; and its values
    (T, N, *element) float32 per stream (float16 streams as stored), NaN where not logged."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("dask") / "d.ll"
    values = {name: np.full((T, N, *shape), np.nan, np.float32) for name, (_, shape, _) in STREAMS.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lossledger.format.CHUNK_TARGET_BYTES", CHUNK_BYTES)
        led = ll.create(path, n_samples=N, labels=rng.integers(0, 5, N))
        dtypes = {name: dtype for name, (dtype, _, _) in STREAMS.items()}
        with led.run("r", stream_dtypes=dtypes) as run:
            step = 0
            for t in range(T):
                ids = rng.permutation(N - 40)[: rng.integers(N // 2, N - 40)]  # the last 40 are never logged
                for part in np.array_split(ids, rng.integers(1, 4)):  # a few log calls: a few steps per tick
                    logged = {}
                    for name, (dtype, shape, since) in STREAMS.items():
                        if t < since:
                            continue
                        v = rng.exponential(1.0, (part.size, *shape)).astype(np.float32)
                        if shape:
                            v[rng.random(v.shape) < 0.1] = np.nan  # ignored pixels
                        logged[name] = v
                        values[name][t, part] = v.astype(dtype).astype(np.float32)
                    run.log(part, **logged)
                    step += 1
                run.end_epoch(step=step + int(rng.integers(0, 3)))
    led.close()
    return ll.open(path), values


@pytest.fixture(autouse=True)
def small_scan_budget(monkeypatch):
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", BUDGET)


def reference(values: np.ndarray, dts: np.ndarray) -> dict[str, np.ndarray]:
    """Plain numpy: values (T, N, *element) with NaN = not observed; per element, then averaged over the
    elements observed at least once; n_obs the most any element was observed."""
    t, n = values.shape[:2]
    flat = values.reshape(t, n, -1).astype(np.float64)
    observed = ~np.isnan(flat)
    count = observed.sum(0)
    first = np.argmax(observed, 0)
    last = t - 1 - np.argmax(observed[::-1], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # never-observed elements
        per_element = {
            "action": np.nansum(flat * dts[:, None, None], 0),
            "variance": np.nanvar(flat, 0),
            "mean": np.nanmean(flat, 0),
            "first": np.take_along_axis(flat, first[None], 0)[0],
            "last": np.take_along_axis(flat, last[None], 0)[0],
            "min": np.nanmin(flat, 0),
            "max": np.nanmax(flat, 0),
        }
        out = {name: np.nanmean(np.where(count > 0, v, np.nan), 1) for name, v in per_element.items()}
    out["n_obs"] = count.max(1)
    return out


def assert_bit_equal(got: pa.Table, want: pa.Table) -> None:
    assert got.schema == want.schema
    for name in want.column_names:
        a, b = got[name].to_numpy(), want[name].to_numpy()
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name  # NaN bits too


def fresh(led) -> ll.Ledger:
    """The ledger with its score cache deleted, so that the next call computes."""
    shutil.rmtree(led.path / "cache", ignore_errors=True)
    return led


def tick_dts(led, dt: str) -> np.ndarray:
    ticks = led.ticks("r")
    if dt == "epoch":
        return np.ones(ticks.num_rows)
    return np.diff(ticks[dt].to_numpy().astype(np.float64), prepend=0.0)


def score_tasks(stream) -> list[dict]:
    return [r for r in stream.data if r["key"].startswith("score_block-")]


def write_exponential_losses(led: ll.Ledger, t: int, rng: np.random.Generator, *, logged: float) -> np.ndarray:
    """Run "r" of ``led``: ``t`` ticks of exponential losses, each sample logged with probability ``logged``;
    returns the (t, N) float32 values written, NaN where not logged."""
    values = np.full((t, led.n_samples), np.nan, np.float32)
    with led.run("r") as run:
        for tick in range(t):
            ids = np.flatnonzero(rng.random(led.n_samples) < logged)
            values[tick, ids] = rng.exponential(1.0, ids.size).astype(np.float32)
            run.log(ids, loss=values[tick, ids])
            run.end_epoch()
    return values


@pytest.mark.parametrize("stream", list(STREAMS))
def test_dask_equals_local_and_numpy(client, written, stream):
    led, values = written
    for dt in ("epoch", "step", "wall"):
        for window in WINDOWS:
            got = fresh(led).scores("r", stream, dt=dt, ticks=window, engine="dask", client=client)
            want = fresh(led).scores("r", stream, dt=dt, ticks=window)
            assert_bit_equal(got, want)
            sel = np.arange(T) if window is None else np.unique(np.arange(T)[window])
            expected = reference(values[stream][sel], tick_dts(led, dt)[sel])
            assert got["sample_id"].to_pylist() == list(range(N))
            assert np.isnan(got["action"].to_numpy()[-40:]).all() and (got["n_obs"].to_numpy()[-40:] == 0).all()
            for name, column in expected.items():
                np.testing.assert_allclose(got[name].to_numpy(), column, rtol=1e-9, atol=1e-9, err_msg=name)


def test_tasks_run_on_the_workers_one_per_block(client, written):
    led, _ = written
    width, _ = block_layout(N, 4096 // 24, (4, 3), T, BUDGET)  # float16 (4, 3) elements: 170 samples per chunk
    blocks = -(-N // width)
    assert blocks > 4
    workers = set(client.run(os.getpid))
    assert os.getpid() not in client.run(os.getpid).values()
    for how in ("client=", "current client"):
        with get_task_stream(client) as tasks:
            if how == "client=":
                fresh(led).scores("r", "pixel", engine="dask", client=client)
            else:
                with client.as_current():
                    fresh(led).scores("r", "pixel", engine="dask")
        ran = score_tasks(tasks)
        assert len(ran) == blocks, how
        assert {r["worker"] for r in ran} == workers, how  # both worker processes scored blocks


def test_without_a_distributed_client_dask_runs_in_this_process(client, written):
    led, _ = written
    with get_task_stream(client) as tasks:
        got = fresh(led).scores("r", "loss", dt="step", engine="dask")  # Dask's default (threaded) scheduler
    assert score_tasks(tasks) == []
    assert_bit_equal(got, fresh(led).scores("r", "loss", dt="step"))


def test_cache_is_shared_with_the_local_engine(client, written):
    led, _ = written
    cache = fresh(led).path / "cache" / "scores" / "r" / "loss16.wall.arrow"
    computed = led.scores("r", "loss16", dt="wall", engine="dask", client=client)
    assert cache.exists()  # written by the dask call ...
    assert_bit_equal(led.scores("r", "loss16", dt="wall"), computed)  # ... and what the local engine returns
    with get_task_stream(client) as tasks:
        again = led.scores("r", "loss16", dt="wall", engine="dask", client=client)
    assert score_tasks(tasks) == []  # a valid cache is returned without a task
    assert_bit_equal(again, computed)
    with get_task_stream(client) as tasks:
        led.scores("r", "loss16", dt="wall", ticks=slice(0, 4), engine="dask", client=client)
    assert score_tasks(tasks)  # windows are never cached


def test_default_constants_several_blocks_slabs_and_tiles(client, tmp_path, monkeypatch):
    """Unpatched chunking, budget and tile size: 262144-sample chunks, 2 blocks, 2 slabs of 32 and 8 ticks,
    32 tiles per slab; 10% of values missing (the masked kernel)."""
    monkeypatch.undo()
    n, t = 300_000, 40
    rng = np.random.default_rng(1)
    led = ll.create(tmp_path / "big.ll", n_samples=n)
    values = write_exponential_losses(led, t, rng, logged=0.9)
    assert block_layout(n, 262144, (), t, 64 << 20) == (262144, 32)
    for dt, window in (("epoch", None), ("step", slice(1, None))):
        got = fresh(led).scores("r", dt=dt, ticks=window, engine="dask", client=client)
        assert_bit_equal(got, fresh(led).scores("r", dt=dt, ticks=window))
        want = reference(values[window or slice(None)], np.ones(t)[window or slice(None)])
        np.testing.assert_allclose(got["variance"].to_numpy(), want["variance"], rtol=1e-9, atol=1e-12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    n_ticks=st.integers(1, 6),
    budget=st.integers(1, 2048),
    seed=st.integers(0, 2**32 - 1),
)
def test_dask_equals_local_on_random_ledgers(client, tmp_path_factory, monkeypatch, n, n_ticks, budget, seed):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 16)
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", budget)
    rng = np.random.default_rng(seed)
    led = ll.create(tmp_path_factory.mktemp("h") / "h.ll", n_samples=n)
    steps = np.cumsum(rng.integers(1, 100, n_ticks))
    with warnings.catch_warnings(), led.run("r") as run:
        warnings.simplefilter("ignore", ll.LedgerWarning)  # a tick with nothing logged
        for step in steps:
            ids = np.flatnonzero(rng.random(n) < 0.7)
            if ids.size:
                run.log(ids, loss=rng.normal(0, 1, ids.size).astype(np.float32))
            run.end_epoch(step=int(step))
    if "loss" not in led.streams("r")["stream"].to_pylist():
        return
    for dt in ("epoch", "step"):
        got = fresh(led).scores("r", dt=dt, engine="dask", client=client)
        assert_bit_equal(got, fresh(led).scores("r", dt=dt))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    per_chunk=st.integers(1, 60),
    element=st.sampled_from([(), (2,), (2, 3)]),
    n_ticks=st.integers(1, 9),
    budget=st.integers(1, 20_000),
)
def test_block_layout_is_the_local_scans_plan(tmp_path_factory, n, per_chunk, element, n_ticks, budget):
    per_chunk = min(per_chunk, n)
    array = zarr.create_array(
        tmp_path_factory.mktemp("z") / "a.zarr",
        shape=(n_ticks, n, *element),
        chunks=(1, per_chunk, *element),
        dtype="float32",
        fill_value=np.nan,
        compressors=[zarr.codecs.BloscCodec()],
    )  # no chunk written: every read is NaN, decoded straight from (absent) files
    slabs = [
        (s.lo, s.hi, int(s.ticks[0]), int(s.ticks[-1]) + 1)
        for s in scan(array, np.arange(n_ticks), budget_bytes=budget)
    ]
    width, per_slab = block_layout(n, per_chunk, element, n_ticks, budget)
    plan = [
        (lo, min(n, lo + width), start, min(n_ticks, start + per_slab))
        for lo in range(0, n, width)
        for start in range(0, n_ticks, per_slab)
    ]
    assert slabs == plan


@pytest.fixture(scope="module")
def s3_options():
    """A moto S3 server on a free port of 127.0.0.1 (which the workers reach too) with a bucket; fsspec options."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    import s3fs

    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket="ledgers")
    yield options
    server.stop()


def test_workers_read_a_ledger_on_object_storage(client, s3_options, monkeypatch):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 1024)  # 256 samples a chunk: 2 blocks of 512
    n, t = 600, 6
    rng = np.random.default_rng(3)
    url = "s3://ledgers/dask/d.ll"
    led = ll.create(url, n_samples=n, storage_options=s3_options)
    values = write_exponential_losses(led, t, rng, logged=0.8)
    reader = ll.open(url, storage_options=s3_options)
    with get_task_stream(client) as tasks:
        got = reader.scores("r", dt="step", engine="dask", client=client)
    assert len(score_tasks(tasks)) == 2  # the workers fetched the chunks from the store themselves
    assert_bit_equal(got, reader.scores("r", dt="step"))
    want = reference(values, tick_dts(reader, "step"))
    for name, column in want.items():
        np.testing.assert_allclose(got[name].to_numpy(), column, rtol=1e-9, atol=1e-9, err_msg=name)


def test_a_worker_that_sees_another_ledger_refuses(client, written, tmp_path):
    led, _ = written
    other = ll.create(tmp_path / "other.ll", n_samples=N)
    job = BlockJob(
        location=str(other.path),
        created="2001-01-01T00:00:00Z",  # the client's ledger, not the one at this path
        run="r",
        stream="loss",
        tick_index=np.arange(T),
        dts=np.ones((1, T)),
        budget_bytes=BUDGET,
    )
    with pytest.raises(E.LedgerNotFoundError, match="shared file system"):
        client.submit(score_block, job, 0, 10).result()  # raised on a worker, re-raised here
    with pytest.raises(E.LedgerNotFoundError, match="finds no ledger"):
        score_block(replace(job, location=str(tmp_path / "nowhere.ll")), 0, 10)
    created = json.loads((led.path / "zarr.json").read_text())["attributes"]["created"]
    stale = replace(job, location=str(led.path), created=created, tick_index=np.arange(T + 1), dts=np.ones((1, T + 1)))
    with pytest.raises(E.LedgerNotFoundError, match="stale copy"):  # asks for a tick this ledger never committed
        score_block(stale, 0, 10)


def test_bad_engine_or_client_is_refused_and_writes_nothing(client, written, store_files):
    led, _ = written
    before = store_files(led.path)
    with pytest.raises(E.ShapeMismatchError, match=r"\['local', 'dask'\]") as err:
        led.scores("r", engine="spark")
    assert isinstance(err.value, ValueError)
    with pytest.raises(E.ShapeMismatchError, match="engine='dask'"):
        led.scores("r", client=client)  # a client with the local engine would silently not be used
    with pytest.raises(E.ShapeMismatchError, match="distributed.Client"):
        led.scores("r", engine="dask", client="tcp://127.0.0.1:8786")
    assert store_files(led.path) == before


def test_without_dask_the_error_names_the_extra(written, monkeypatch, store_files):
    led = fresh(written[0])
    before = store_files(led.path)
    monkeypatch.setitem(sys.modules, "dask", None)  # what an environment without dask gives on import
    with pytest.raises(E.MissingDependencyError, match=r'pip install "lossledger\[dask\]"') as err:
        led.scores("r", engine="dask")
    assert isinstance(err.value, ImportError)
    assert store_files(led.path) == before


def test_dask_blocks_are_the_local_engines_when_blocks_are_capped(client, written, monkeypatch):
    """With few ticks the local engine caps a block at ``BLOCK_VALUES`` values (a smaller scan budget); the tasks
    get that same plan from the client: one task per local block, and the same bits."""
    import lossledger._scoring as scoring

    led, _ = written
    monkeypatch.setattr(scoring, "BLOCK_VALUES", 1000)  # 1000 // 1024 per chunk -> one chunk per block
    widths: list[int] = []
    real = scoring.score_blocks

    def recording(*args, **kwargs):
        for lo, hi, stats in real(*args, **kwargs):
            widths.append(hi - lo)
            yield lo, hi, stats

    monkeypatch.setattr(scoring, "score_blocks", recording)
    want = fresh(led).scores("r", dt="step", ticks=[4])
    monkeypatch.setattr(scoring, "score_blocks", real)
    with get_task_stream(client) as tasks:
        got = fresh(led).scores("r", dt="step", ticks=[4], engine="dask", client=client)
    assert len(widths) > 1 and len(score_tasks(tasks)) == len(widths)
    assert_bit_equal(got, want)
