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
