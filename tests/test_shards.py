"""Shard writers: other processes write whole chunks of declared streams for the open tick; the run's writer commits.

Real processes on a real store: two spawned shard-writer processes and the writer's own process write disjoint
samples of every tick for 20 ticks (past the first capacity, 16), readers never see a tick before its commit, and a
writer SIGKILLed after the shard writers wrote a tick leaves garbage that the next writer's recovery removes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import lossledger as ll
from lossledger.errors import (
    DuplicateSampleError,
    LedgerWarning,
    NonFiniteValueError,
    ReadOnlyError,
    RunClosedError,
    RunLockedError,
    ShapeMismatchError,
    UnknownStreamError,
)
from lossledger.shards import ShardWriter

N, SHAPE, TICKS = 23, (3, 4), 20
IDS = np.arange(N, dtype=np.int64) * 5 + 7  # not 0..N-1: ids are mapped to rows


def pix_value(t: int, ids: np.ndarray) -> np.ndarray:
    """The map of sample ``ids`` at tick ``t``: a pure function, so every process can compute what is expected."""
    base = np.sin(t * 0.37 + np.asarray(ids, dtype=np.float64))[:, None, None]
    return (base * 10.0 + np.arange(12).reshape(SHAPE) / 7.0).astype(np.float32)


def owner(t: int) -> np.ndarray:
    """Who writes each sample at tick ``t``: process 0, 1 or 2 (the writer's own), or -1 (nobody: NaN)."""
    return np.random.default_rng(t).integers(-1, 3, N)


def _shard_process(path: str, me: int, start: mp.synchronize.Barrier, written: mp.synchronize.Barrier) -> None:
    shards = ShardWriter(path, "r")
    for t in range(TICKS):
        start.wait()
        assert shards.open_tick() == t
        mine = IDS[owner(t) == me]
        for batch in np.array_split(mine, 2):  # two calls per tick; one sample per chunk, so any split is whole
            if batch.size:
                shards.write(t, batch, pix=pix_value(t, batch))
        written.wait()


def test_processes_write_disjoint_chunks_that_the_writer_commits(tmp_path):
    path = tmp_path / "s.ll"
    ledger = ll.create(path, sample_ids=IDS)
    ctx = mp.get_context("spawn")
    start, written = ctx.Barrier(3), ctx.Barrier(3)
    run = ledger.run("r", stream_dtypes={"pix": "float16"})
    run.declare_stream("pix", SHAPE)  # float16 from stream_dtypes, one sample per chunk
    procs = [ctx.Process(target=_shard_process, args=(str(path), me, start, written)) for me in (0, 1)]
    for p in procs:
        p.start()
    mine = ShardWriter(path, "r")  # the writer's process writes its share too (its own lock does not fool the check)
    reader = ll.open(path)
    try:
        for t in range(TICKS):
            start.wait(timeout=60)
            ids = IDS[owner(t) == 2]
            if ids.size:
                assert mine.write(t, ids, pix=pix_value(t, ids)) == ids.size  # one chunk file per sample
            run.log(IDS[:3], loss=[t, t, t])
            written.wait(timeout=60)
            on_disk = sorted((path / "runs/r/streams/pix/c" / str(t)).iterdir())
            assert len(on_disk) == int((owner(t) >= 0).sum())
            assert reader.ticks("r").num_rows == t  # written, not committed: invisible
            assert run.end_epoch() == t
            assert _capacity(path / "runs/r/streams/pix") > t + 1  # the next tick is writable before anything commits it
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    run.close()
    expected = np.full((N, TICKS, *SHAPE), np.nan, dtype=np.float32)
    for t in range(TICKS):
        rows = np.flatnonzero(owner(t) >= 0)
        expected[rows, t] = pix_value(t, IDS[rows]).astype(np.float16)  # stored as float16: its rounding
    stored = ll.open(path).trajectories("r", "pix")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored.astype(np.float32), expected)
    assert ll.open(path).streams("r").to_pylist()[1] == {
        "stream": "pix", "dtype": "float16", "element_shape": [3, 4], "since": 0
    }


KILLED_WRITER = r"""
import sys
import warnings

import numpy as np
import lossledger as ll
from lossledger.shards import ShardWriter

warnings.simplefilter("ignore")
path = sys.argv[1]
run = ll.open(path, mode="a").run("r")
run.declare_stream("pix", (3, 4))
shards = ShardWriter(path, "r")
for t in range(2):
    shards.write(t, [7, 12], pix=np.full((2, 3, 4), float(t), np.float32))
    run.end_epoch()
run.declare_stream("late", (2,))  # declared at tick 2, never committed
print("ready", flush=True)
sys.stdin.readline()  # killed here, holding the run
"""


def test_chunks_of_a_tick_whose_writer_was_killed_are_removed_on_resume(tmp_path):
    path = tmp_path / "k.ll"
    ll.create(path, sample_ids=IDS).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        shards = ShardWriter(path, "r")
        assert shards.open_tick() == 2
        shards.write(2, IDS[:4], pix=pix_value(2, IDS[:4]))
        shards.write(2, IDS[:3], late=np.ones((3, 2)))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    streams = path / "runs/r/streams"
    assert len(list((streams / "pix/c/2").iterdir())) == 4 and (streams / "late").exists()  # the garbage
    reader = ll.open(path)
    assert reader.ticks("r").num_rows == 2 and reader.trajectories("r", "pix").shape == (N, 2, 3, 4)
    with pytest.raises(RunClosedError, match="no writer holds"):
        shards.write(2, IDS[4:5], pix=pix_value(2, IDS[4:5]))
    with pytest.warns(LedgerWarning, match="removed 2 leftover"):
        run = ll.open(path, mode="a").run("r")
    assert not (streams / "pix/c/2").exists() and not (streams / "late").exists()
    with pytest.raises(RunLockedError, match="left over from a stopped job"):
        shards.write(2, IDS[4:5], pix=pix_value(2, IDS[4:5]))  # a shard writer of the killed job
    fresh = ShardWriter(path, "r")  # the declared stream is still sharded after the resume: no new declaration
    fresh.write(2, IDS[4:5], pix=pix_value(2, IDS[4:5]))
    assert run.end_epoch() == 2
    run.close()
    stored = ll.open(path).trajectories("r", "pix")
    assert np.isnan(stored[:4, 2]).all()  # the killed tick's chunks did not survive into the new tick 2
    np.testing.assert_array_equal(stored[4, 2], pix_value(2, IDS[4:5])[0])
    np.testing.assert_array_equal(stored[:2, :2], np.broadcast_to(np.arange(2.0)[None, :, None, None], (2, 2, 3, 4)))


def test_bad_writes_are_refused_and_write_nothing(ledger, store_files):
    run = ledger.run("r")
    run.log([0, 1], loss=[0.5, 0.25])
    run.end_epoch()  # tick 1 is open
    run.log([0, 1], loss=[1.5, 1.25])
    run.declare_stream("pix", (2, 2))
    run.declare_stream("blocks", (2,), samples_per_chunk=4)  # chunks of samples 0-3, 4-7 and 8-9
    shards = ShardWriter(ledger.path, "r")
    maps, pairs = np.ones((10, 2, 2), np.float32), np.ones((10, 2), np.float32)
    before = store_files(ledger.path)
    bad = [
        (RunClosedError, "tick 0 .* already committed", lambda: shards.write(0, [0], pix=maps[:1])),
        (RunClosedError, "not open yet", lambda: shards.write(2, [0], pix=maps[:1])),
        (ShapeMismatchError, "tick must be an int", lambda: shards.write(1.0, [0], pix=maps[:1])),
        (ShapeMismatchError, r"chunk 1 lacks sample id\(s\) \[7\]", lambda: shards.write(1, [4, 5, 6], blocks=pairs[:3])),
        (UnknownStreamError, "declare it first", lambda: shards.write(1, [0], other=maps[:1])),
        (RunLockedError, "written by the run's writer", lambda: shards.write(1, [0], loss=[1.0])),
        (DuplicateSampleError, r"\[3\] given twice", lambda: shards.write(1, [3, 3], pix=maps[:2])),
        (ShapeMismatchError, r"element shape \(2, 2\)", lambda: shards.write(1, [0], pix=np.ones((1, 4)))),
        (NonFiniteValueError, "1 inf", lambda: shards.write(1, [0], pix=np.array([[[1, np.inf], [1, 1]]]))),
        # one good stream and one bad: nothing of either is written
        (ShapeMismatchError, "partial", lambda: shards.write(1, [0, 1, 2], pix=maps[:3], blocks=pairs[:3])),
        (RunLockedError, "declared for shard writers", lambda: run.log([0], pix=maps[:1])),
        (ShapeMismatchError, "exists with element shape", lambda: run.declare_stream("pix", (2, 3))),
        (RunLockedError, "values logged by run.log", lambda: run.declare_stream("loss", ())),
    ]
    for error, message, call in bad:
        with pytest.raises(error, match=message):
            call()
        assert store_files(ledger.path) == before, message
    # whole chunks (the last holds only samples 8 and 9), and NaN (an ignored pixel) in an element stream
    assert shards.write(1, [8, 9, 0, 1, 2, 3], blocks=pairs[:6]) == 2
    shards.write(1, [5], pix=np.array([[[np.nan, 1], [2, 3]]]))
    with pytest.raises(DuplicateSampleError, match=r"\[5\] were already written in tick 1"):
        shards.write(1, [4, 5], pix=maps[:2])
    assert shards.discard() == 3  # the 2 chunks of blocks and 1 of pix, not committed
    shards.write(1, [5], pix=np.array([[[np.nan, 1], [2, 3]]]))  # after discard the sample may be written again
    run.end_epoch()
    assert shards.discard() == 0  # committed: those chunks are the run's
    run.close()
    with pytest.raises(RunClosedError, match="no writer holds"):
        shards.write(2, [0], pix=maps[:1])
    with pytest.raises(RunClosedError, match="no writer holds"):
        ShardWriter(ledger.path, "r")
    with pytest.raises(ReadOnlyError, match="local folder or on s3:// only"):
        ShardWriter("gs://bucket/t.ll", "r")  # refused before anything is contacted (s3://: test_object_store.py)
    reader = ll.open(ledger.path)
    assert np.isnan(reader.trajectories("r", "pix")[:, 0]).all()  # declared at tick 1: NaN before
    np.testing.assert_array_equal(reader.trajectories("r", "pix", ids=[5])[0, 1], [[np.nan, 1], [2, 3]])
    assert np.isnan(reader.trajectories("r", "blocks")).all()  # discarded
    np.testing.assert_array_equal(reader.trajectories("r")[:2], [[0.5, 1.5], [0.25, 1.25]])


def test_a_committed_stream_declared_on_resume_becomes_sharded_and_stays_a_tick_ahead(ledger):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)
        with ledger.run("r") as run:
            for t in range(15):
                run.log([0], pix=np.full((1, 2), t, np.float32))
                run.end_epoch()
    assert _capacity(ledger.path / "runs/r/streams/pix") == 16  # holds ticks 0..15: tick 15 is the open one
    run = ledger.run("r")
    with pytest.raises(ShapeMismatchError, match="10 sample"):
        run.declare_stream("pix", (2,), samples_per_chunk=1)  # a stream's chunking is fixed
    run.declare_stream("pix", (2,))  # as it is: 10 samples per chunk
    shards = ShardWriter(ledger.path, "r")
    with pytest.raises(ShapeMismatchError, match="partial"):
        shards.write(15, [1], pix=np.ones((1, 2)))  # this stream's chunks hold all 10 samples
    shards.write(15, ledger.sample_ids, pix=np.full((10, 2), 15.0))
    run.end_epoch()
    assert _capacity(ledger.path / "runs/r/streams/pix") == 32  # tick 16 is writable now
    shards.write(16, ledger.sample_ids, pix=np.full((10, 2), 16.0))
    run.end_epoch()
    run.close()
    stored = ll.open(ledger.path).trajectories("r", "pix", ids=[0])[0, :, 0]
    np.testing.assert_array_equal(stored, np.arange(17.0))


def test_shard_writers_write_the_bytes_the_run_writer_writes(ledger):
    values = np.random.default_rng(0).random((10, 2, 3)).astype(np.float32)
    with ledger.run("a", stream_dtypes={"pix": "float16"}) as run:
        run.log(ledger.sample_ids, pix=values)
        run.end_epoch()
    per_chunk = json.loads((ledger.path / "runs/a/streams/pix/zarr.json").read_text())["chunk_grid"]
    with ledger.run("b", stream_dtypes={"pix": "float16"}) as run:
        run.declare_stream("pix", (2, 3), samples_per_chunk=per_chunk["configuration"]["chunk_shape"][1])
        ShardWriter(ledger.path, "b").write(0, ledger.sample_ids[::-1], pix=values[::-1])
        run.end_epoch()
    chunk = "streams/pix/c/0/0/0/0"
    assert (ledger.path / "runs/b" / chunk).read_bytes() == (ledger.path / "runs/a" / chunk).read_bytes()


def test_a_declared_stream_of_a_tick_never_committed_is_left_out_of_the_record(ledger):
    run = ledger.run("r")
    run.log([0], loss=[1.0])
    run.end_epoch()
    run.declare_stream("pix", (2,))
    run.close()  # moves the pending tick row into ticks/: a commit, which must not list the new stream
    assert ll.open(ledger.path).streams("r")["stream"].to_pylist() == ["loss"]
    with pytest.warns(LedgerWarning, match="removed 1 leftover"):
        ledger.run("r").close()  # the declared stream's array is garbage until it is declared again


def _capacity(array: Path) -> int:
    """Ticks the stream array at ``array`` is sized for (its shape[0])."""
    return json.loads((array / "zarr.json").read_text())["shape"][0]
