"""Torture: writers, exports and score caching killed with SIGKILL, many times, at random and at exact moments.

Each trial is a real process, forked from a zygote that has already imported lossledger (a fresh interpreter
costs ~1 s; a fork ~10 ms), so that dozens of kills fit in a few seconds. Writer trials resume run "r" of
one ledger and commit ticks whose values are a pure function of (tick, sample id, stream); each dies

- at a random moment (a random delay after it resumed, or after its k-th commit),
- mid-``log`` (inside ``Run._record``, between the streams of one call),
- at its k-th file write (every store write is a temp file + ``os.replace``: kills land between the chunk
  files of a tick, in array growth, in the ``ticks/`` flush every 3 commits, before or after the commit
  record, in the attribute write of a resume),
- mid-resume (at its k-th file deletion while ``ledger.run`` removes what the last killed writer left),
- mid-``close()`` (at its k-th file write while it flushes the pending tick rows).

After each, a read-only ledger opens and shows every committed tick bit-exact, NaN where nothing was
logged, and nothing of the uncommitted tick; the next writer resumes right after the last committed tick and
finds nothing left over once ``ledger.run`` returns. Exports and the score cache are killed the same way: the
target of an export is the old file or the whole new one (never a partial file), and ``scores`` after a
killed cache write gives the numpy reference.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lossledger as ll

# Shared by this process and the zygote (exec'd in both): the plan of every tick and what a resume must remove.
COMMON = r'''
import json
from pathlib import Path

import numpy as np

N = 30
IDS = np.arange(N, dtype=np.int64) * 5 + 11
PIX = (2, 3)


def plan(t, salt):
    """The log calls of tick t by writer ``salt``, [(ids, {stream: values})]: a pure function of both (tick 4
    logs nothing). Writers differ in the samples they log and the values, so that what a killed writer left
    of an uncommitted tick cannot pass for what the next writer commits there."""
    rng = np.random.default_rng([t, salt])
    if t == 4:
        return []
    calls = []
    ids = rng.permutation(IDS[rng.random(N) < rng.choice([0.3, 0.8, 1.0])])
    for batch in np.array_split(ids, int(rng.integers(1, 4))):
        if batch.size:
            streams = {"loss": t * 100.0 + batch / 4.0 + salt / 1024.0}
            if t % 3 != 1:  # a second stream in the same call: a kill can land between the two
                streams["pix"] = -(t + batch[:, None, None] / 2.0) - np.arange(6).reshape(PIX) / 4.0 - salt / 512.0
            calls.append((batch, streams))
    if t >= 5:  # a float16 stream appears at tick 5 (an array created mid-run)
        conf_ids = IDS[rng.random(N) < 0.4]
        calls.append((conf_ids, {"conf": np.full(conf_ids.size, (t % 16) / 8.0 + (salt % 8) / 64.0)}))
    return calls


def leftovers(path):
    """What a killed writer left past run "r"'s commit record: temp files, chunks of uncommitted ticks, arrays
    of uncommitted streams (what a resume must remove)."""
    run = Path(path) / "runs" / "r"
    out = [str(p.relative_to(path)) for p in Path(path).glob("*.partial")]
    out += [str(p.relative_to(path)) for p in (Path(path) / "runs").glob("*.partial")]
    if not (run / "zarr.json").exists():
        return out
    out += [str(p.relative_to(path)) for p in run.rglob("*.partial")]
    commit = json.loads((run / "zarr.json").read_text())["attributes"]["commit"]
    for stream in sorted((run / "streams").glob("*/")):
        if stream.name not in commit["streams"]:
            out.append(f"stream {stream.name}")
        elif (stream / "c").is_dir():
            out += [f"{stream.name} tick {t.name}" for t in (stream / "c").iterdir() if int(t.name) >= commit["ticks"]]
    return out
'''

ZYGOTE = COMMON + r'''
import os
import signal
import sys
import traceback
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

import lossledger as ll
import lossledger._scan
import lossledger.export
import lossledger.format
import lossledger.run


def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    """Wraps a function so that the process SIGKILLs itself at its k-th call while armed: just before the call
    (before=True) or just after it."""

    def __init__(self, k, before):
        self.k, self.before, self.count, self.armed = k, before, 0, True

    def wrap(self, real):
        def call(*args, **kwargs):
            if not self.armed:
                return real(*args, **kwargs)
            self.count += 1
            if self.count == self.k and self.before:
                die()
            out = real(*args, **kwargs)
            if self.count == self.k:
                die()
            return out
        return call


def writer(path, salt, new, kill, k, before):
    # Tiny chunks (2 to 16 samples), so a commit writes many files; ticks/ rows flushed every 3 commits.
    lossledger.format.CHUNK_TARGET_BYTES = 64
    lossledger.run.TICKS_FLUSH = 3
    killer = KillAt(k, before)
    if kill in ("replace", "close"):
        os.replace = killer.wrap(os.replace)
        killer.armed = kill == "replace"
    elif kill == "resume":  # the deletions of the recovery (shutil.rmtree and Path.unlink call these)
        os.unlink, os.rmdir = killer.wrap(os.unlink), killer.wrap(os.rmdir)
    elif kill == "log":
        lossledger.run.Run._record = killer.wrap(lossledger.run.Run._record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ledger = ll.open(path, mode="a")
        run = ledger.run("r", model="mlp", stream_dtypes={"conf": "float16"})
    if kill == "resume":
        killer.armed = False
    removed = sum("leftover" in str(w.message) for w in caught)
    say("start", run.ticks, removed, len(leftovers(path)))
    warnings.simplefilter("ignore")  # the empty tick 4 warns
    for t in range(run.ticks, run.ticks + new):
        for ids, streams in plan(t, salt):
            run.log(ids, **streams)
        assert run.end_epoch() == t
        say("tick", t)
    killer.armed = kill == "close"
    say("closing")
    run.close()
    say("done")


def exporter(path, target, kill, k, before):
    killer = KillAt(k, before)
    if kill == "write":
        pq.ParquetWriter.write_table = killer.wrap(pq.ParquetWriter.write_table)
    elif kill == "replace":
        lossledger.export.os.replace = killer.wrap(os.replace)
    say("start")
    ll.open(path).export(target)
    say("done")


def scorer(path, dt, kill, k, before):
    lossledger._scan.SCAN_BUDGET_BYTES = 512  # many sample blocks: the cache file is written in many batches
    killer = KillAt(k, before)
    if kill == "write":
        pa.ipc.RecordBatchFileWriter.write_batch = killer.wrap(pa.ipc.RecordBatchFileWriter.write_batch)
    elif kill == "replace":
        os.replace = killer.wrap(os.replace)
    say("start")
    ll.open(path).scores("r", "loss", dt=dt)
    say("done")


JOBS = {"writer": writer, "exporter": exporter, "scorer": scorer}
say("ready")
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            JOBS[job["job"]](**job["args"])
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    say("pid", pid)
    _, status = os.waitpid(pid, 0)
    say("exit", pid, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status))
'''

shared: dict = {}
exec(COMMON, shared)  # noqa: S102 - the plan the writers run
N, IDS, PIX, plan, leftovers = (shared[k] for k in ("N", "IDS", "PIX", "plan", "leftovers"))


class Zygote:
    """A process that has imported lossledger and forks one child per job; this process kills the children."""

    def __init__(self, tmp: Path) -> None:
        self.errors = tmp / "zygote.stderr"
        with open(self.errors, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err)
        self.buf, self.lines = b"", []
        assert self.next(120) == "ready", self.stderr()

    def stderr(self) -> str:
        return self.errors.read_text()

    def next(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                pytest.fail(f"no output from the zygote for {timeout} s: {self.stderr()[-3000:]}")
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                pytest.fail(f"the zygote died: {self.stderr()[-3000:]}")
            *done, self.buf = (self.buf + data).split(b"\n")
            self.lines += [line.decode() for line in done]
        return self.lines.pop(0)

    def start(self, job: str, **args) -> None:
        self.proc.stdin.write((json.dumps({"job": job, "args": args}) + "\n").encode())
        self.proc.stdin.flush()
        self.pid, self.status, self.seen = None, None, []

    def until(self, predicate) -> str | None:
        """Read the child's lines until one satisfies ``predicate`` (returned) or it exits (None)."""
        while True:
            line = self.next()
            if line.startswith("pid "):
                self.pid = int(line.split()[1])
                continue
            if line.startswith("exit "):
                self.status = int(line.split()[2])
                return None
            self.seen.append(line)
            if predicate(line):
                return line

    def kill_after(self, predicate, delay: float) -> None:
        """SIGKILL the child ``delay`` seconds after it printed a line satisfying ``predicate``."""
        if self.until(predicate) is None:
            return
        while self.pid is None:  # the zygote says the child's pid right after the fork
            line = self.next()
            assert line.startswith("pid ") or self.seen.append(line) is None
            self.pid = int(line.split()[1]) if line.startswith("pid ") else None
        time.sleep(delay)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished first (the zygote reaps it at once, so its pid is not reused yet)
            pass

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the child; return its status (the signal that killed it, or minus its exit code) and lines."""
        if self.status is None:
            self.until(lambda line: False)
        if self.status not in (0, signal.SIGKILL):
            pytest.fail(f"the child failed ({self.status}): {self.stderr()[-3000:]}")
        return self.status, self.seen

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture
def zygote(tmp_path):
    z = Zygote(tmp_path)
    yield z
    z.close()


def expected(salts: list[int]) -> tuple[dict[str, np.ndarray], dict[str, int], np.ndarray]:
    """Expected (N, n, ...) values per stream in its stored dtype (NaN where not logged), first ticks and steps
    of the ticks committed by the writers ``salts`` (one per tick)."""
    n = len(salts)
    values = {"loss": np.full((N, n), np.nan, np.float32), "pix": np.full((N, n, *PIX), np.nan, np.float32),
              "conf": np.full((N, n), np.nan, np.float16)}
    since: dict[str, int] = {}
    steps = np.zeros(n, np.int64)
    for t in range(n):
        calls = plan(t, salts[t])
        steps[t] = (steps[t - 1] if t else 0) + len(calls)
        for ids, streams in calls:
            rows = np.searchsorted(IDS, ids)
            for stream, v in streams.items():
                values[stream][rows, t] = v
                since.setdefault(stream, t)
    return values, since, steps


def check_ledger(path: Path, salts: list[int]) -> int:
    """Check every committed tick of run "r" against the plans of the writers that committed them (``salts``,
    at least as many as there are ticks), bit-exact; return the committed tick count."""
    ledger = ll.open(path)
    if "r" not in ledger.runs:  # killed while creating the run
        return 0
    ticks = ledger.ticks("r")
    n = ticks.num_rows
    values, since, steps = expected(salts[:n])
    np.testing.assert_array_equal(ticks["epoch"].to_numpy(), np.arange(n))
    np.testing.assert_array_equal(ticks["step"].to_numpy(), steps)
    wall = ticks["wall"].to_numpy()
    assert np.isfinite(wall).all() and (np.diff(wall) >= 0).all(), wall
    records = {s["stream"]: (s["since"], s["dtype"]) for s in ledger.streams("r").to_pylist()}
    assert records == {s: (first, str(values[s].dtype)) for s, first in since.items()}
    for stream in since:
        got, want = ledger.trajectories("r", stream), values[stream]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"), err_msg=stream)
    return n


# --- writers ---------------------------------------------------------------------------------------------
N_TRIALS = 75
MODES = ["timed", "log", "replace", "resume", "close"]


def test_writer_killed_anywhere_keeps_committed_ticks_and_resumes(zygote, tmp_path):
    path = tmp_path / "t.ll"
    ll.create(path, sample_ids=IDS).close()
    rng = np.random.default_rng(8)
    committed = 0
    salts: list[int] = []  # the writer that committed each tick
    stats = {"killed": 0, "kills": dict.fromkeys(MODES, 0), "removed": 0, "unprinted": 0}
    for trial in range(N_TRIALS):
        garbage = leftovers(path)
        mode = MODES[trial % len(MODES)]
        if mode == "resume" and not garbage:
            mode = "replace"  # nothing to recover: kill a commit instead
        k = int(rng.integers(1, {"resume": 4, "close": 5, "log": 9}.get(mode, 40)))
        before = bool(rng.integers(2))
        salt = trial + 1
        zygote.start("writer", path=str(path), salt=salt, new=int(rng.integers(1, 6)), kill=mode, k=k, before=before)
        if mode == "timed":
            after = "start" if rng.integers(3) == 0 else f"tick {committed + int(rng.integers(0, 2))}"
            zygote.kill_after(lambda line, after=after: line.startswith(after),
                              float(rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05)])))
        status, lines = zygote.finish()
        killed = status == signal.SIGKILL
        stats["killed"] += killed
        stats["kills"][mode] += killed
        # Ticks this writer may have committed are its own; a reader never shows one it did not commit.
        n = check_ledger(path, salts[:committed] + [salt] * 6)
        started = [line for line in lines if line.startswith("start")]
        printed = [int(line.split()[1]) for line in lines if line.startswith("tick")]
        if not started:  # killed inside ledger.run(): at most its attribute write happened, no tick
            assert killed and not printed and n == committed, (trial, mode, lines, n, committed)
        else:
            first, removed, left = map(int, started[0].split()[1:])
            # The writer resumed right after the last committed tick, after removing (with one warning)
            # exactly what the last killed writer left: nothing is left once ledger.run() returns.
            assert first == committed, (trial, mode, first, committed)
            assert left == 0 and removed == (1 if garbage else 0), (trial, mode, removed, left, garbage)
            stats["removed"] += removed
            assert printed == list(range(first, first + len(printed)))
            # Every tick it reported is committed; at most one more (killed between the commit and the print).
            assert first + len(printed) <= n <= first + len(printed) + 1, (trial, mode, printed, n)
            stats["unprinted"] += n == first + len(printed) + 1
            if not killed:
                assert lines[-1] == "done" and leftovers(path) == [], (trial, mode, lines)
        salts = salts[:committed] + [salt] * (n - committed)
        committed = n

    # Resume here: the last leftovers go (loudly, exactly when there are some), the run goes on.
    garbage = leftovers(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ll.open(path, mode="a") as ledger:
            run = ledger.run("r", stream_dtypes={"conf": "float16"})
            assert run.ticks == committed and leftovers(path) == []
            for ids, streams in plan(committed, 0):
                run.log(ids, **streams)
            run.end_epoch()
    assert sum(issubclass(w.category, ll.LedgerWarning) for w in caught) == (1 if garbage else 0)
    assert check_ledger(path, [*salts, 0]) == committed + 1
    # The trials reached the interesting states: kills of every kind, resumes that cleaned up, enough ticks
    # that arrays grew past their first capacities (16, 32) and the ticks/ rows were flushed many times.
    assert stats["killed"] >= 50 and all(v >= 5 for v in stats["kills"].values()), stats
    assert stats["removed"] >= 10 and committed >= 40, (committed, stats)


# --- exports -----------------------------------------------------------------------------------------------
def _ledger_with_runs(path: Path, ticks: int) -> None:
    with ll.create(path, sample_ids=IDS, labels=np.arange(N) % 3, classes=["a", "b", "c"]) as ledger:
        for name in ("a", "b"):
            with ledger.run(name) as run:
                for t in range(ticks):
                    run.log(IDS[t % 2 :: 1 + t % 3], loss=np.arange(len(IDS[t % 2 :: 1 + t % 3])) + t + 0.5,
                            margin=np.full(len(IDS[t % 2 :: 1 + t % 3]), t - 1.25))
                    run.end_epoch()


def test_export_killed_leaves_the_old_file_or_the_whole_new_one(zygote, tmp_path):
    path = tmp_path / "e.ll"
    _ledger_with_runs(path, 3)
    target = tmp_path / "out" / "scores.parquet"
    target.parent.mkdir()
    ll.open(path).export(target)
    old = target.read_bytes()
    with ll.open(path, mode="a") as ledger, ledger.run("a") as run:  # the next export differs
        run.log(IDS, loss=np.ones(N))
        run.end_epoch()
    new = pq.read_table(ll.open(path).export(tmp_path / "want.parquet"))
    rng = np.random.default_rng(3)
    outcomes = {"old": 0, "new": 0}
    for trial in range(12):
        kill, before = ["write", "replace", "timed"][trial % 3], trial // 3 % 2 == 0
        k = int(rng.integers(1, 5)) if kill == "write" else 1  # 4 tables: (2 runs) x (2 streams); 1 rename
        zygote.start("exporter", path=str(path), target=str(target), kill=kill, k=k, before=before)
        if kill == "timed":
            zygote.kill_after(lambda line: line == "start", rng.uniform(0, 0.03))
        status, _ = zygote.finish()
        assert status == signal.SIGKILL or kill == "timed", (trial, kill, status)
        if target.read_bytes() == old:
            outcomes["old"] += 1
        else:  # the rename happened: the file is whole
            got = pq.read_table(target)
            assert got.equals(new)
            outcomes["new"] += 1
            target.write_bytes(old)
        # Nothing half-written is visible: only hidden temp files of the killed writer sit beside the target.
        others = sorted(p.name for p in target.parent.iterdir() if p != target)
        assert all(name.startswith(".scores.parquet.") and name.endswith(".partial") for name in others), others
    assert outcomes["old"] >= 6 and outcomes["new"] >= 2, outcomes


# --- the score cache ---------------------------------------------------------------------------------------
def numpy_scores(traj: np.ndarray, dt: np.ndarray) -> dict[str, np.ndarray]:
    x = traj.astype(np.float64)
    seen = ~np.isnan(x)
    n_obs = seen.sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"action": np.where(n_obs, np.nansum(x * dt, axis=1), np.nan), "mean": np.nanmean(x, axis=1),
                "variance": np.nanvar(x, axis=1), "min": np.nanmin(x, axis=1), "max": np.nanmax(x, axis=1),
                "n_obs": n_obs}


def test_score_cache_write_killed_then_scores_are_right(zygote, tmp_path):
    path = tmp_path / "s.ll"
    _ledger_with_runs(path, 4)
    with ll.open(path, mode="a") as ledger, ledger.run("r") as run:
        for t in range(6):
            ids = IDS[(t % 4) :: 2]
            run.log(ids, loss=ids / 3.0 + t)
            run.end_epoch(step=10 * (t + 1) ** 2)
    ledger = ll.open(path)
    cache = path / "cache" / "scores" / "r"
    rng = np.random.default_rng(5)
    hit = {"none": 0, "old": 0, "whole": 0}
    for trial in range(12):
        dt = ["epoch", "step"][trial % 2]
        if trial == 6:  # from now on an older cache file sits at the target: kills must leave it whole
            ledger.scores("r", dt="epoch"), ledger.scores("r", dt="step")
            with ll.open(path, mode="a") as writer, writer.run("r") as run:
                run.log(IDS[:3], loss=[1.0, 2.0, 3.0])
                run.end_epoch(step=500)
        kill, before = ["write", "replace", "timed"][trial % 3], trial // 3 % 2 == 0
        k = int(rng.integers(1, 4)) if kill == "write" else 1  # many batches; 1 rename
        zygote.start("scorer", path=str(path), dt=dt, kill=kill, k=k, before=before)
        if kill == "timed":
            zygote.kill_after(lambda line: line == "start", rng.uniform(0, 0.02))
        zygote.finish()
        file = cache / f"loss.{dt}.arrow"
        others = sorted(p.name for p in cache.iterdir() if p.name not in ("loss.epoch.arrow", "loss.step.arrow"))
        assert all(n.startswith(".loss.") and n.endswith(".partial") for n in others), others  # hidden temp files
        if file.exists():  # whatever is at the cache path is a whole Arrow IPC file (old or new)
            with pa.ipc.open_file(file) as whole:
                stamp = json.loads(whole.schema.metadata[b"lossledger"])
                assert whole.read_all().num_rows == len(IDS)
            hit["whole" if stamp["ticks"] == ledger.ticks("r").num_rows else "old"] += 1
        else:
            hit["none"] += 1
        # The next scores call (reading the cache or recomputing it) gives the numpy reference.
        traj = ledger.trajectories("r", "loss")[:, :, ...]
        steps = ledger.ticks("r")["step"].to_numpy()
        durations = np.ones(steps.size) if dt == "epoch" else np.diff(steps, prepend=0).astype(float)
        want = numpy_scores(traj, durations)
        got = ll.open(path).scores("r", "loss", dt=dt)
        for column, values in want.items():
            np.testing.assert_allclose(got[column].to_numpy(), values, rtol=1e-12, err_msg=(trial, column))
    assert hit["none"] >= 1 and hit["old"] >= 1 and hit["whole"] >= 1, hit
