"""Ledgers on object storage: the same API over ``s3://`` URLs, against a real S3 server (moto's, started on
127.0.0.1 by this module). Every number is compared with the same ledger written to a local folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import numpy as np
import pytest

import lossledger as ll
import lossledger._remote
from lossledger.errors import CorruptLedgerError, LedgerExistsError, NotALedgerError, RunLockedError

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

N, T = 300, 6
RNG = np.random.default_rng(7)
LOSSES = RNG.gamma(2.0, 0.5, size=(T, N)).astype(np.float32)
LOGGED = RNG.random((T, N)) > 0.15  # some samples not logged in some ticks: NaN
PIXELS = RNG.random((T, N, 3, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port of 127.0.0.1, its bucket, and the storage options to reach it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing", "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket="ledgers")
    yield options
    server.stop()


@pytest.fixture
def url() -> str:
    return f"s3://ledgers/{uuid.uuid4().hex[:8]}/digits.ll"


def write(ledger: ll.Ledger, ticks: range) -> None:
    with ledger.run("r", seed=1) as run:
        for t in ticks:
            ids = np.flatnonzero(LOGGED[t])
            run.log(ids, loss=LOSSES[t, ids], pix=PIXELS[t, ids])
            run.end_epoch(epoch=t, step=10 * (t + 1))


def create(path, **options) -> ll.Ledger:
    return ll.create(path, n_samples=N, labels=np.arange(N) % 4, storage_options=options or None)


def test_the_same_api_over_s3_gives_the_local_numbers(s3, url, tmp_path):
    local = create(tmp_path / "l.ll")
    write(local, range(T))
    remote = create(url, **s3)
    write(remote, range(3))
    write(ll.open(url, "a", storage_options=s3), range(3, T))  # resumed by another handle
    reader = ll.open(url, storage_options=s3)
    assert reader.runs == ["r"] and reader.path == url and "ledger at s3://" in reader.info()
    np.testing.assert_array_equal(reader.trajectories("r", "loss"), local.trajectories("r", "loss"))
    np.testing.assert_array_equal(reader.trajectories("r", "pix"), local.trajectories("r", "pix"))
    for dt in ("epoch", "step"):
        assert reader.scores("r", dt=dt).equals(local.scores("r", dt=dt))
    assert reader.scores("r", "pix", ticks=slice(1, 4)).equals(local.scores("r", "pix", ticks=slice(1, 4)))
    assert reader.top(5, "r").equals(local.top(5, "r"))
    query = "SELECT sample_id, count(*) AS n, sum(value) AS s FROM losses GROUP BY ALL ORDER BY sample_id"
    assert reader.sql(query).equals(local.sql(query))
    query = "SELECT run, stream, dt, sample_id, action, n_obs FROM scores WHERE dt <> 'wall' ORDER BY ALL"
    assert reader.sql(query).equals(local.sql(query))
    want = np.where(LOGGED, LOSSES, np.nan).astype(np.float64)
    np.testing.assert_allclose(reader.scores("r")["action"].to_numpy(), np.nansum(want, axis=0), rtol=1e-12)
    out = reader.export(tmp_path / "scores.parquet", "r")
    assert out.exists()


def test_create_refuses_other_objects_and_replaces_only_a_ledger(s3, url):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    other = url.replace("digits.ll", "photos")
    fs.pipe(f"{other}/cat.jpg"[5:], b"\xff\xd8")
    with pytest.raises(LedgerExistsError, match="not a ledger"):
        create(other, **s3)
    assert fs.cat(f"{other}/cat.jpg"[5:]) == b"\xff\xd8"
    create(url, **s3).close()
    with pytest.raises(LedgerExistsError, match="overwrite=True"):
        create(url, **s3)
    ll.create(url, n_samples=3, overwrite=True, storage_options=s3).close()
    assert ll.open(url, storage_options=s3).n_samples == 3
    with pytest.raises(NotALedgerError):
        ll.open(other, storage_options=s3)
    with pytest.raises(ll.errors.LedgerNotFoundError):
        ll.open(url.replace("digits.ll", "nothing.ll"), storage_options=s3)


def test_second_writer_is_refused_and_a_dead_writers_lease_expires(s3, url, monkeypatch):
    ledger = create(url, **s3)
    run = ledger.run("r")
    with pytest.raises(RunLockedError, match="another writer"):
        ll.open(url, "a", storage_options=s3).run("r")
    with ll.open(url, "a", storage_options=s3).run("other") as other:  # another run is fine
        other.log([0], loss=[1.0])
        other.end_epoch()
    run.close()
    with ll.open(url, "a", storage_options=s3).run("r") as again:  # released at close
        again.log([0], loss=[2.0])
        again.end_epoch()
    # A writer that stops renewing (killed) loses the lock once the store's clock says the lease is over;
    # a second writer then takes it over, and the first one's next commit is refused.
    monkeypatch.setattr(lossledger._remote, "LEASE_SECONDS", 2.0)
    first = ll.open(url, "a", storage_options=s3).run("r")
    first._lock._stop.set()  # its heartbeat stops, as in a killed process
    first.log([1], loss=[3.0])
    time.sleep(3.5)
    second = ll.open(url, "a", storage_options=s3).run("r")
    with pytest.raises(RunLockedError, match="lost its lock"):
        first.end_epoch()
    second.log([2], loss=[4.0])
    second.end_epoch()
    second.close()
    np.testing.assert_array_equal(ll.open(url, storage_options=s3).trajectories("r", "loss", ids=[0, 1, 2])[:, -1],
                                  [np.nan, np.nan, 4.0])


WRITER = textwrap.dedent("""
    import sys, json, numpy as np, lossledger as ll, lossledger._remote
    lossledger._remote.LEASE_SECONDS = 2.0
    url, options = sys.argv[1], json.loads(sys.argv[2])
    ledger = ll.open(url, "a", storage_options=options)
    with ledger.run("r") as run:
        t = run.ticks
        while True:
            run.log(np.arange(50), loss=np.full(50, t, np.float32))
            run.end_epoch()
            print(t, flush=True)
            t += 1
""")


def test_a_writer_killed_on_s3_keeps_every_committed_tick_and_resumes(s3, url):
    ll.create(url, n_samples=50, storage_options=s3).close()
    child = subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(s3)], stdout=subprocess.PIPE, text=True)
    for _ in range(4):
        child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    seen = ll.open(url, storage_options=s3).trajectories("r", "loss")
    committed = seen.shape[1]
    assert committed >= 4
    np.testing.assert_array_equal(seen, np.broadcast_to(np.arange(committed, dtype=np.float32), (50, committed)))
    with pytest.raises(RunLockedError, match="renewed"):  # the killed writer's lease is still running
        ll.open(url, "a", storage_options=s3).run("r")
    time.sleep(2.5)  # now it is over
    lossledger._remote.LEASE_SECONDS, old = 2.0, lossledger._remote.LEASE_SECONDS
    try:
        with warnings.catch_warnings():  # chunks of the tick the kill interrupted, if any, are removed (warns)
            warnings.simplefilter("ignore", ll.errors.LedgerWarning)
            with ll.open(url, "a", storage_options=s3).run("r") as run:
                run.log(np.arange(50), loss=np.full(50, committed, np.float32))
                run.end_epoch()
    finally:
        lossledger._remote.LEASE_SECONDS = old
    final = ll.open(url, storage_options=s3).trajectories("r", "loss")
    np.testing.assert_array_equal(final, np.broadcast_to(np.arange(committed + 1, dtype=np.float32), (50, committed + 1)))


def test_a_flipped_bit_on_s3_is_detected(s3, url):
    import s3fs

    ledger = create(url, **s3)
    write(ledger, range(2))
    fs = s3fs.S3FileSystem(**s3)
    key = f"{url[5:]}/runs/r/streams/loss/c/1/0"
    data = bytearray(fs.cat(key))
    data[len(data) // 2] ^= 4
    fs.pipe(key, bytes(data))
    with pytest.raises(CorruptLedgerError, match="crc32c"):
        ll.open(url, storage_options=s3).scores("r")


SHARD_WRITER = textwrap.dedent("""
    import sys, json, numpy as np
    from lossledger.shards import ShardWriter
    url, options, me = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    shards = ShardWriter(url, "r", storage_options=options)
    print("open", flush=True)
    for line in sys.stdin:                  # a tick to write, once the run's writer has committed the one before
        t = int(line)
        ids = np.flatnonzero((np.arange(40) + t) % 2 == me)  # this process's samples of tick t
        for batch in np.array_split(ids, 2):
            shards.write(t, batch, pix=batch[:, None, None] * 100.0 + t + np.arange(6).reshape(3, 2) / 8)
        print(t, flush=True)
""")


def shard_maps(t: int, ids) -> np.ndarray:
    """The maps SHARD_WRITER writes for ``ids`` at tick ``t`` (exact in float32)."""
    ids = np.asarray(ids)
    return (ids[:, None, None] * 100.0 + t + np.arange(6).reshape(3, 2) / 8).astype(np.float32)


def test_shard_writer_processes_write_disjoint_samples_on_s3_that_the_writer_commits(s3, url, monkeypatch):
    import s3fs

    from lossledger.shards import ShardWriter

    fs, n, ticks = s3fs.S3FileSystem(**s3), 40, 4
    chunks = f"{url[5:]}/runs/r/streams/pix/c"
    run = ll.create(url, n_samples=n, storage_options=s3).run("r")
    run.declare_stream("pix", (3, 2))
    children = [
        subprocess.Popen([sys.executable, "-c", SHARD_WRITER, url, json.dumps(s3), str(me)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for me in (0, 1)
    ]
    reader = ll.open(url, storage_options=s3)
    try:
        assert [c.stdout.readline().strip() for c in children] == ["open", "open"]
        for t in range(ticks):
            for child in children:
                child.stdin.write(f"{t}\n")
                child.stdin.flush()
            assert [c.stdout.readline().strip() for c in children] == [str(t)] * 2
            assert len(fs.ls(f"{chunks}/{t}", refresh=True)) == n  # one chunk object per sample
            assert reader.ticks("r").num_rows == t  # written, not committed: invisible
            assert run.end_epoch() == t
    finally:
        for child in children:
            child.stdin.close()
            child.wait(timeout=30)
    assert [c.returncode for c in children] == [0, 0]
    want = np.stack([shard_maps(t, np.arange(n)) for t in range(ticks)], axis=1)
    np.testing.assert_array_equal(reader.trajectories("r", "pix"), want)

    shards = ShardWriter(url, "r", storage_options=s3)
    assert shards.open_tick() == ticks and "pid" in repr(shards)
    with pytest.raises(ll.errors.RunClosedError, match="already committed"):
        shards.write(ticks - 1, [0], pix=shard_maps(ticks - 1, [0]))
    with pytest.raises(ll.errors.RunClosedError, match="not open yet"):
        shards.write(ticks + 1, [0], pix=shard_maps(ticks + 1, [0]))
    assert shards.write(ticks, [0, 1, 2], pix=shard_maps(ticks, [0, 1, 2])) == 3
    assert shards.discard() == 3 and not fs.exists(f"{chunks}/{ticks}/0/0/0")
    shards.write(ticks, [0, 1, 2], pix=shard_maps(ticks, [0, 1, 2]))
    run.close()  # without committing the open tick: its shard chunks are garbage
    assert reader.trajectories("r", "pix").shape == (n, ticks, 3, 2)
    with pytest.raises(ll.errors.RunClosedError, match="no writer holds"):
        shards.write(ticks, [3], pix=shard_maps(ticks, [3]))
    with pytest.raises(ll.errors.RunClosedError, match="no writer holds"):
        ShardWriter(url, "r", storage_options=s3)
    with pytest.warns(ll.errors.LedgerWarning, match="leftover"):
        run = ll.open(url, "a", storage_options=s3).run("r")
    assert not fs.exists(f"{chunks}/{ticks}/0/0/0")  # removed on resume
    with pytest.raises(RunLockedError, match="left over from a stopped job"):  # a shard writer of the old writer
        shards.write(ticks, [3], pix=shard_maps(ticks, [3]))
    fresh = ShardWriter(url, "r", storage_options=s3)
    fresh.write(ticks, [3], pix=shard_maps(ticks, [3]))
    assert run.end_epoch() == ticks
    stored = ll.open(url, storage_options=s3).trajectories("r", "pix")[:, ticks]
    assert np.isnan(stored[[0, 1, 2, *range(4, n)]]).all()  # the chunks of the closed writer's tick are gone
    np.testing.assert_array_equal(stored[3], shard_maps(ticks, [3])[0])
    # A writer that stops renewing its lease (killed) holds the run no longer once the lease is over.
    monkeypatch.setattr(lossledger._remote, "LEASE_SECONDS", 2.0)
    run._lock._stop.set()
    time.sleep(2.5)
    with pytest.raises(ll.errors.RunClosedError, match="no writer holds"):
        fresh.write(ticks + 1, [3], pix=shard_maps(ticks + 1, [3]))
    run.close()


def test_shard_writers_on_s3_write_the_bytes_the_run_writer_writes(s3, url):
    from lossledger.shards import ShardWriter

    ledger = create(url, **s3)
    with ledger.run("a") as run:
        run.log(ledger.sample_ids, pix=PIXELS[0])
        run.end_epoch()
    with ledger.run("b") as run:
        run.declare_stream("pix", (3, 2), samples_per_chunk=N)
        ShardWriter(url, "b", storage_options=s3).write(0, ledger.sample_ids[::-1], pix=PIXELS[0, ::-1])
        run.end_epoch()
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    assert fs.cat(f"{url[5:]}/runs/b/streams/pix/c/0/0/0/0") == fs.cat(f"{url[5:]}/runs/a/streams/pix/c/0/0/0/0")


def test_the_torch_recorders_pixel_streams_write_an_s3_ledger(s3, url):
    torch = pytest.importorskip("torch")
    from lossledger.adapters.torch import Recorder

    ledger = ll.create(url, n_samples=12, storage_options=s3)
    maps = torch.arange(12 * 6, dtype=torch.float32).reshape(12, 3, 2)
    with ledger.run("r") as run, Recorder(run, pixel_streams={"pix": (3, 2)}, distributed=False) as rec:
        for batch in torch.arange(12).split(5):
            rec.log(batch, maps[batch].mean((1, 2)), pix=maps[batch])
        assert rec.end_epoch() == 0
    np.testing.assert_array_equal(ll.open(url, storage_options=s3).trajectories("r", "pix")[:, 0], maps.numpy())
