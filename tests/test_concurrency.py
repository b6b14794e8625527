"""Concurrency with real processes: readers during commits, one writer per run, writers of different runs.

- A reader process calls ``scores``, ``ticks`` and ``trajectories`` in a loop while a writer process commits
  ticks (growing arrays, flushing the ``ticks/`` rows, adding a stream mid-run). Every result must be that of
  some committed prefix of the plan (n_obs, actions, values, tick rows all agree with one tick count), the
  prefixes never go back, and nothing raises.
- A second writer of a run is refused with ``RunLockedError`` naming the run and the lock, in another process
  and in the holder's own; it gets the run once the holder closes it.
- Writers of different runs of one ledger, in two processes started together (both creating arrays, so both
  write Zarr's parent-group temp files at the ledger root at the same time), both succeed and read back exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import lossledger as ll
from lossledger.errors import RunLockedError

COMMON = r'''
import numpy as np

N = 48
IDS = np.arange(N, dtype=np.int64)


def plan(run, t):
    """(ids, losses, margins or None) logged at tick t of ``run``: a pure function of both."""
    rng = np.random.default_rng([t, len(run)])
    ids = IDS[rng.random(N) < 0.7]
    loss = (t + 1) * 1.5 + ids / 64.0 + (3.0 if run == "b" else 0.0)
    return ids, loss, (ids % 5 - t / 4.0) if t >= 6 else None  # "margin" starts at tick 6


def expected(run, n):
    """(N, n) float32 values of "loss" and "margin" in the first n ticks (NaN = not logged)."""
    loss, margin = np.full((N, n), np.nan, np.float32), np.full((N, n), np.nan, np.float32)
    for t in range(n):
        ids, l, m = plan(run, t)
        loss[ids, t] = l
        if m is not None:
            margin[ids, t] = m
    return loss, margin
'''

WRITER = COMMON + r'''
import sys
import time
import warnings
from pathlib import Path

import lossledger as ll
import lossledger.format
import lossledger.run

lossledger.format.CHUNK_TARGET_BYTES = 64  # 16 samples per chunk: 3 chunk files per tick and stream
lossledger.run.TICKS_FLUSH = 4
path, run_name, n_ticks, pause, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
Path(f"{go}.{run_name}").touch()  # ready
while not Path(go).exists():  # start together with the other writer, or once the reader reads
    time.sleep(0.001)
warnings.simplefilter("ignore")
with ll.open(path, mode="a") as ledger, ledger.run(run_name, seed=len(run_name)) as run:
    for t in range(n_ticks):
        ids, loss, margin = plan(run_name, t)
        run.log(ids, loss=loss)
        if margin is not None:
            run.log(ids, margin=margin)
        run.end_epoch()
        time.sleep(pause)
print("done", flush=True)
'''

READER = COMMON + r'''
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import lossledger as ll

path, stop, final, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
want_loss, want_margin = expected("a", final)
n_obs = np.cumsum(~np.isnan(want_loss), axis=1)  # n_obs[:, k - 1]: observations in the first k ticks
ledger = ll.open(path)
go.touch()  # the writer starts now
seen = {"ticks": [], "traj": [], "scores": [], "step": []}
held = []  # results stay alive, as a user's would


def prefix(table, k):
    """Check a scores table against the first k ticks of the plan."""
    x = want_loss[:, :k].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = {"action": np.nansum(x, axis=1), "mean": np.nanmean(x, axis=1), "max": np.nanmax(x, axis=1)}
    got_obs = table["n_obs"].to_numpy()
    assert (got_obs == (n_obs[:, k - 1] if k else 0)).all(), k
    for column, values in ref.items():
        got = table[column].to_numpy()
        ok = np.isclose(got, values, rtol=1e-12) | (np.isnan(got) & (got_obs == 0))
        assert ok.all(), (column, k)


def first_prefix(table, lowest):
    """The tick count k >= lowest whose n_obs the table has (n_obs grows with k for some sample)."""
    got = table["n_obs"].to_numpy()
    for k in range(lowest, final + 1):
        if (got == (n_obs[:, k - 1] if k else 0)).all():
            return k
    raise AssertionError(f"scores match no committed prefix at or after {lowest}")


try:
    while True:
        done = stop.exists()
        ticks = ledger.ticks("a") if "a" in ledger.runs else None
        k = 0 if ticks is None else ticks.num_rows
        if k == 0:  # the writer has not committed yet
            if done:
                break
            time.sleep(0.002)
            continue
        assert k >= max(seen["ticks"], default=0)
        assert ticks["epoch"].to_pylist() == list(range(k))
        seen["ticks"].append(k)
        traj = ledger.trajectories("a", "loss")
        assert traj.shape[1] >= k
        assert np.array_equal(traj, want_loss[:, : traj.shape[1]], equal_nan=True)
        seen["traj"].append(traj.shape[1])
        table = ledger.scores("a")
        k = first_prefix(table, max(seen["scores"], default=0))
        prefix(table, k)
        seen["scores"].append(k)
        held.append(table)
        step = ledger.scores("a", dt="step")  # reads the tick rows too (some pending, some flushed)
        k = first_prefix(step, 0)
        calls = 1 + (np.arange(k) >= 6)  # log calls per tick: loss, and margin from tick 6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nansum(want_loss[:, :k].astype(np.float64) * calls, axis=1)
        got = step["action"].to_numpy()
        assert (np.isclose(got, ref, rtol=1e-12) | (np.isnan(got) & (n_obs[:, k - 1] == 0))).all()
        seen["step"].append(k)
        ids = IDS[[47, 3, 3, 20]]
        np.testing.assert_array_equal(ledger.trajectories("a", "loss", ids=ids, ticks=[0]), want_loss[ids, :1])
        if done:
            break
    print(json.dumps({k: sorted(set(v)) for k, v in seen.items()}), flush=True)
except BaseException:
    traceback.print_exc()
    sys.exit(1)
'''

shared: dict = {}
exec(COMMON, shared)  # noqa: S102 - the plan the writers follow
N, plan, expected = shared["N"], shared["plan"], shared["expected"]


def _script(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-4000:]
    return out.decode()


def test_reader_sees_only_committed_prefixes_while_a_writer_commits(tmp_path):
    path = tmp_path / "c.ll"
    ll.create(path, sample_ids=np.arange(N)).close()
    final = 40
    stop, go = tmp_path / "writer-done", tmp_path / "go"
    reader = _script(READER, path, stop, final, go)
    writer = _script(WRITER, path, "a", final, 0.03, go)
    try:
        assert _finish(writer).split() == ["done"]
    finally:
        stop.touch()
    seen = json.loads(_finish(reader))
    # The reader interleaved with the commits (many distinct prefixes) and saw the last one at the end.
    assert len(seen["ticks"]) >= 4 and len(seen["scores"]) >= 4, seen
    assert max(seen["ticks"]) == max(seen["traj"]) == max(seen["scores"]) == final, seen
    led = ll.open(path)
    loss, margin = expected("a", final)
    np.testing.assert_array_equal(led.trajectories("a", "loss"), loss)
    np.testing.assert_array_equal(led.trajectories("a", "margin"), margin)


HOLDER = r'''
import sys
import warnings

import lossledger as ll

warnings.simplefilter("ignore")
ledger = ll.open(sys.argv[1], mode="a")
run = ledger.run("r")
run.log([0], loss=[1.0])
run.end_epoch()
print("holding", flush=True)
sys.stdin.readline()
run.close()
print("closed", flush=True)
sys.stdin.readline()
'''

CONTENDER = r'''
import sys

import lossledger as ll
from lossledger.errors import RunLockedError

ledger = ll.open(sys.argv[1], mode="a")
try:
    ledger.run("r")
except RunLockedError as err:
    print(type(err).__name__, isinstance(err, BlockingIOError), err, flush=True)
with ledger.run("other") as other:  # another run of the same ledger is free
    other.log([1], loss=[2.0])
    other.end_epoch()
'''


def test_second_writer_of_a_run_is_refused_clearly(tmp_path):
    path = tmp_path / "l.ll"
    ll.create(path, n_samples=4).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().decode().strip() == "holding", holder.stderr.read().decode()
        refused = subprocess.run([sys.executable, "-c", CONTENDER, str(path)], capture_output=True, timeout=120,
                                 check=False)
        assert refused.returncode == 0, refused.stderr.decode()
        name, is_blocking, message = refused.stdout.decode().strip().split(" ", 2)
        assert (name, is_blocking) == ("RunLockedError", "True")
        lock = path / "runs" / "r" / "writer.lock"
        assert f"run 'r' is being written by another writer (lock {lock} is held)" in message, message
        assert "close that writer first, or log to a run of another name" in message, message

        ledger = ll.open(path, mode="a")
        with pytest.raises(RunLockedError, match="another writer"):
            ledger.run("r")
        holder.stdin.write(b"\n")
        holder.stdin.flush()
        assert holder.stdout.readline().decode().strip() == "closed"
        with ledger.run("r") as run:  # the holder closed the run: it is free (the holder process still runs)
            assert run.ticks == 1
    finally:
        holder.kill()
        holder.communicate()
    assert ll.open(path).ticks("other").num_rows == 1


def test_writers_of_different_runs_at_once(tmp_path):
    path = tmp_path / "w.ll"
    ll.create(path, sample_ids=np.arange(N)).close()
    go = tmp_path / "go"
    writers = [_script(WRITER, path, name, 24, 0.0, go) for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{name}").exists() for name in ("a", "b")):  # both imported lossledger: go
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers), "a writer did not start"
        time.sleep(0.01)
    go.touch()
    for proc in writers:
        assert _finish(proc).split() == ["done"]
    led = ll.open(path)
    assert led.runs == ["a", "b"]
    for name in ("a", "b"):
        loss, margin = expected(name, 24)
        np.testing.assert_array_equal(led.trajectories(name, "loss"), loss)
        np.testing.assert_array_equal(led.trajectories(name, "margin"), margin)
        assert led.ticks(name)["epoch"].to_pylist() == list(range(24))
        assert led.run_attrs(name)["seed"] == 1
    assert sorted(p.name for p in path.rglob("*.partial")) == []


def test_resume_of_one_run_leaves_the_temp_files_of_another_live_writer(tmp_path, monkeypatch):
    """Zarr writes the parent groups of a new array "if not exists" through temp files at the ledger root; a
    resume of another run, which removes stray temp files there, must not delete a live writer's."""
    import zarr.storage._local as zlocal

    path = tmp_path / "r.ll"
    ll.create(path, n_samples=3).close()
    with ll.open(path, mode="a") as ledger, ledger.run("a") as a:
        a.log([0], loss=[1.0])
        a.end_epoch()
    writer = ll.open(path, mode="a")
    b = writer.run("b")
    move = zlocal._safe_move
    resumed = []

    def resume_a_meanwhile(src, dst):
        # Writer "b" is creating its first stream's array: its temp file for the root group is on disk now.
        if dst == path / "zarr.json" and not resumed:
            with ll.open(path, mode="a").run("a") as again:
                resumed.append(again.ticks)
        move(src, dst)

    monkeypatch.setattr(zlocal, "_safe_move", resume_a_meanwhile)
    b.log([1, 2], loss=[3.0, 4.0])
    b.end_epoch()  # raised FileNotFoundError when the resume of "a" deleted b's temp file
    b.close()
    writer.close()
    assert resumed == [1]
    np.testing.assert_array_equal(ll.open(path).trajectories("b")[1:, 0], [3.0, 4.0])


def test_stray_temp_files_are_removed_once_no_other_writer_is_alive(tmp_path):
    path = tmp_path / "s.ll"
    ll.create(path, n_samples=4).close()
    with ll.open(path, mode="a").run("a") as a:
        a.log([0], loss=[1.0])
        a.end_epoch()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stray = [path / "zarr.0123456789abcdef0123456789abcdef.partial", path / "runs" / "zarr.json.00ff.partial"]
    try:
        assert holder.stdout.readline().decode().strip() == "holding", holder.stderr.read().decode()
        for file in stray:  # what a writer killed inside Zarr leaves (or one alive is about to rename)
            file.write_text("{}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing removed, nothing to warn about
            with ll.open(path, mode="a").run("a"):
                pass
        assert all(file.exists() for file in stray)  # run "r" has a live writer
    finally:
        holder.kill()
        holder.communicate()
    with pytest.warns(ll.LedgerWarning, match="removed 2 leftover"), ll.open(path, mode="a").run("a"):
        pass
    assert not any(file.exists() for file in stray)


def test_scores_after_a_commit_that_landed_during_the_last_scores_call(tmp_path, monkeypatch):
    import lossledger._scoring as scoring

    ledger = ll.create(tmp_path / "s.ll", n_samples=4)
    run = ledger.run("r")
    run.log([0, 1, 2, 3], loss=[1.0, 2.0, 3.0, 4.0])
    run.end_epoch()
    real = scoring.stored_scores

    def commit_meanwhile(*args, **kwargs):
        table = real(*args, **kwargs)
        run.log([0, 1, 2, 3], loss=[1.0, 1.0, 1.0, 1.0])  # the writer commits while scores() finishes
        run.end_epoch()
        return table

    monkeypatch.setattr(scoring, "stored_scores", commit_meanwhile)
    held = ledger.scores("r")  # noqa: F841 - a user keeps the result
    monkeypatch.undo()
    assert ledger.ticks("r").num_rows == 2
    assert ledger.scores("r")["n_obs"].to_pylist() == [2, 2, 2, 2]
    run.close()
