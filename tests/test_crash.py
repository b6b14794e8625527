"""Crash safety: a writer process killed with SIGKILL at random moments never corrupts committed ticks.

Each trial starts a writer subprocess that resumes run "r" and commits ticks whose values are a pure
function of (tick, sample id, stream); the parent kills it at a random moment (before it has started,
between ticks, mid-log or mid-commit), then checks with a read-only ledger that every tick the writer
reported as committed is there, bit-exact, with NaN exactly where nothing was logged. The next trial's
writer resumes the same run, so ticks accumulate over trials and every resume runs the recovery.

Also: one writer per run (a second process or object gets RunLockedError; a SIGKILLed holder's lock is
freed by the OS), and two recovery cases with deterministic kill points: temp files Zarr leaves outside the
run, and a run killed while being created.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import lossledger as ll
from lossledger.errors import LedgerWarning, RunLockedError

# Shared by the parent and the writer subprocess (prepended to its script): what is logged at tick t.
COMMON = r'''
import numpy as np

N = 30
IDS = np.arange(N, dtype=np.int64) * 7 + 100  # not 0..N-1: ids are mapped to rows
PIX_SHAPE = (2, 3)


def loss_value(t, ids):
    return t * 1000.0 + np.asarray(ids, dtype=np.float64) + 0.25


def pix_value(t, ids):
    base = -(t * 1000.0 + np.asarray(ids, dtype=np.float64))
    return base[:, None, None] - np.arange(6, dtype=np.float64).reshape(PIX_SHAPE) / 8.0


def plan(t):
    """The log calls of tick t, [(ids, {stream: values})]: a pure function of t (some ticks log nothing)."""
    rng = np.random.default_rng(t)
    calls = []
    frac = rng.choice([0.0, 0.2, 0.6, 1.0])
    loss_ids = rng.permutation(IDS[rng.random(N) < frac])
    for batch in np.array_split(loss_ids, int(rng.integers(1, 4))):
        if batch.size:
            calls.append((batch, {"loss": loss_value(t, batch)}))
    if t >= 1 and t % 3 != 2:  # "pix" appears at tick 1 and skips every third tick
        pix_ids = rng.permutation(IDS[rng.random(N) < 0.5])
        if pix_ids.size:
            calls.append((pix_ids, {"pix": pix_value(t, pix_ids)}))
    return calls
'''

WRITER = COMMON + r'''
import sys
import warnings
from pathlib import Path

import lossledger as ll
import lossledger.format
import lossledger.run

# Tiny chunks (2 to 16 samples), so that a commit writes many files and a kill can land between them; the
# ticks/ arrays written every 3 commits (not 64), so that kills land in those writes and in close() too.
lossledger.format.CHUNK_TARGET_BYTES = 64
lossledger.run.TICKS_FLUSH = 3

path, max_new, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if kill_at:
    # SIGKILL this process at the |kill_at|-th file replacement (every store write is temp file + os.replace):
    # just before it (kill_at < 0: the temp file is left behind) or just after it (kill_at > 0).
    import os
    import signal

    _replace, _count = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        _count[0] += 1
        if _count[0] == -kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        _replace(src, dst, *args, **kwargs)
        if _count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ledger = ll.open(path, mode="a") if path.exists() else ll.create(path, sample_ids=IDS)
    run = ledger.run("r")
warnings.simplefilter("ignore")  # ticks with nothing logged warn
recovered = sum(issubclass(w.category, ll.LedgerWarning) and "leftover" in str(w.message) for w in caught)
partials = len(list((path / "runs" / "r").rglob("*.partial")))
start = run.ticks
print("start", start, recovered, partials, flush=True)
for t in range(start, start + max_new):
    for ids, values in plan(t):
        run.log(ids, **values)
    assert run.end_epoch() == t
    print("tick", t, flush=True)
run.close()
print("done", flush=True)
'''

HOLDER = r'''
import sys
import warnings

import lossledger as ll

warnings.simplefilter("ignore")
run = ll.open(sys.argv[1], mode="a").run("r")
run.log([0, 1], loss=[1.5, 2.5])
run.end_epoch()
run.log([2], loss=[3.5])  # logged, not yet committed
print("holding", flush=True)
sys.stdin.readline()
run.end_epoch()
print("committed", run.ticks, flush=True)
sys.stdin.readline()  # hold the run until killed
'''

CONTENDER = r'''
import sys

import lossledger as ll
from lossledger.errors import RunLockedError

ledger = ll.open(sys.argv[1], mode="a")
try:
    ledger.run("r")
except RunLockedError:
    print("locked", flush=True)
else:
    print("acquired", flush=True)
'''

shared: dict = {}
exec(COMMON, shared)  # noqa: S102 - the same plan the writer runs
N, IDS, PIX_SHAPE = shared["N"], shared["IDS"], shared["PIX_SHAPE"]
plan = shared["plan"]

TICK_COLUMNS = ("epoch", "step", "wall")
N_TRIALS = 24


class Lines:
    """Lines of a child's stdout, read with a timeout (a hung child fails the test instead of hanging it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.fd, self.buf, self.lines = proc, proc.stdout.fileno(), b"", []

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        data = os.read(self.fd, 65536)
        self.buf += data
        *done, self.buf = self.buf.split(b"\n")
        self.lines += [line.decode() for line in done]
        return bool(data)

    def next(self, timeout: float = 60.0) -> str | None:
        """The next line, or None at end of output."""
        deadline = time.monotonic() + timeout
        while not self.lines:
            if not self._pump(max(0.0, deadline - time.monotonic())):
                return None
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail("child process printed nothing for 60 s")
        return self.lines.pop(0)

    def rest(self) -> list[str]:
        """Every remaining line (call once the process has exited). A killed process's unterminated last line is
        left out: it was cut off mid-print (seen once in ~7 runs of the torture loop: "tick" without its number),
        so it says nothing; a process that exits on its own ends every line."""
        while self._pump(10.0):
            pass
        killed = self.proc.returncode == -signal.SIGKILL
        return self.lines + ([self.buf.decode()] if self.buf and not killed else [])


def start(script: str, *args: object, stdin=None) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return proc, Lines(proc)


def expected(n_ticks: int) -> tuple[dict[str, np.ndarray], dict[str, int], np.ndarray]:
    """Expected (N, T, ...) float32 values per stream (NaN where not logged), stream first ticks, steps."""
    values = {"loss": np.full((N, n_ticks), np.nan, np.float32),
              "pix": np.full((N, n_ticks, *PIX_SHAPE), np.nan, np.float32)}
    since: dict[str, int] = {}
    steps = np.zeros(n_ticks, np.int64)
    row_of = {int(i): r for r, i in enumerate(IDS)}
    for t in range(n_ticks):
        calls = plan(t)
        steps[t] = (steps[t - 1] if t else 0) + len(calls)
        for ids, logged in calls:
            rows = [row_of[int(i)] for i in ids]
            for stream, v in logged.items():
                values[stream][rows, t] = np.asarray(v, dtype=np.float64).astype(np.float32)
                since.setdefault(stream, t)
    return values, since, steps


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def check_ledger(path: Path) -> int:
    """Check every committed tick of run "r" against the plan; return the number of committed ticks."""
    if not path.exists():  # the first writer was killed while creating the ledger
        return 0
    ledger = ll.open(path)
    assert ledger.mode == "r"
    np.testing.assert_array_equal(ledger.sample_ids, IDS)
    if "r" not in ledger.runs:  # killed while creating the run
        return 0
    ticks = ledger.ticks("r")
    n = ticks.num_rows
    values, since, steps = expected(n)
    # Tick indices are contiguous from 0; epoch (default: previous + 1) and step (default: previous + calls)
    # continue across resumes; wall time (summed over resumes) never goes back.
    np.testing.assert_array_equal(ticks["tick"].to_numpy(), np.arange(n))
    np.testing.assert_array_equal(ticks["epoch"].to_numpy(), np.arange(n))
    np.testing.assert_array_equal(ticks["step"].to_numpy(), steps)
    wall = ticks["wall"].to_numpy()
    assert np.isfinite(wall).all() and (wall >= 0).all() and (np.diff(wall) >= 0).all(), wall

    streams = ledger.streams("r").to_pylist()
    assert {s["stream"]: (s["since"], s["dtype"], tuple(s["element_shape"])) for s in streams} == {
        name: (first, "float32", values[name].shape[2:]) for name, first in since.items()
    }
    for name, want in values.items():
        if name not in since:
            assert not np.isfinite(want).any()
            continue
        got = ledger.trajectories("r", name)
        assert got.dtype == np.float32 and got.shape == want.shape
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"stream {name}: NaN where not logged")
        np.testing.assert_array_equal(bits(got[~nan]), bits(want[~nan]), err_msg=f"stream {name}: values")
    # A few samples in a scrambled order read the same values.
    pick = IDS[[5, 0, 29, 5, 17]]
    np.testing.assert_array_equal(
        bits(ledger.trajectories("r", "loss" if "loss" in since else "pix", ids=pick)),
        bits(ledger.trajectories("r", "loss" if "loss" in since else "pix")[[5, 0, 29, 5, 17]]),
    )
    return n


def leftovers(path: Path) -> list[str]:
    """What a killed writer left past run "r"'s commit record (what a resume must remove, with a warning)."""
    run_dir = path / "runs" / "r"
    if not (run_dir / "zarr.json").exists():
        return []
    commit = json.loads((run_dir / "zarr.json").read_text())["attributes"]["commit"]
    n, streams = commit["ticks"], commit["streams"]
    out = [str(p.relative_to(path)) for p in run_dir.rglob("*.partial")]
    for stream in sorted((run_dir / "streams").iterdir()) if (run_dir / "streams").is_dir() else []:
        if not stream.is_dir():  # the group's zarr.json
            continue
        if stream.name not in streams:
            out.append(f"unrecorded stream {stream.name}")
        elif (stream / "c").is_dir():
            out += [f"{stream.name} tick {t.name}" for t in (stream / "c").iterdir() if int(t.name) >= n]
    flushed = n - len(commit.get("pending_ticks", {}).get("epoch", []))  # rows the ticks/ arrays must hold
    needed = {f"streams/{s}": n for s in streams} | {f"ticks/{c}": flushed for c in TICK_COLUMNS}
    for key, rows in needed.items():
        shape = json.loads((run_dir / key / "zarr.json").read_text())["shape"]
        if shape[0] < rows:  # shapes are capacities: at least the committed rows
            out.append(f"{key} has shape {shape}, short of {rows} rows")
    return out


def stray_partials(path: Path) -> list[str]:
    """``*.partial`` temp files outside run "r" (Zarr's parent-group writes; a resume removes them)."""
    found = [str(p.relative_to(path)) for p in path.rglob("*.partial") if "r" not in p.relative_to(path).parts[1:2]]
    assert all(re.fullmatch(r"(runs/)?zarr\.json\.[0-9a-f]{32}\.partial|(runs/)?zarr\.[0-9a-f]{32}\.partial", f)
               for f in found), found
    return found


def test_sigkill_at_random_moments_never_loses_or_corrupts_committed_ticks(tmp_path):
    path = tmp_path / "crash.ll"
    rng = np.random.default_rng(20240611)
    committed = 0  # ticks committed so far, as read back after the last kill
    garbage: list[str] = []  # leftovers of the last killed writer
    stats = dict.fromkeys(["killed", "recovered", "unprinted_commit", "before_start", "partial_left"], 0)
    for trial in range(N_TRIALS):
        # How the writer dies: "launch" a random time after launch (in import, open, recovery or a tick);
        # "ticks" a random short time after its k-th committed tick (mid-log or mid-commit); "write" by its own
        # hand at its k-th file write. Trial 0 waits for the run to exist (see test_reader_of_a_run_killed...).
        mode = "ticks" if trial == 0 else str(rng.choice(["launch", "ticks", "write"], p=[0.25, 0.45, 0.3]))
        kill_at = int(rng.integers(1, 80)) * int(rng.choice([-1, 1])) if mode == "write" else 0
        proc, out = start(WRITER, path, 12, kill_at)
        started = None
        printed: list[int] = []
        if mode == "launch":
            time.sleep(rng.uniform(0.0, 1.0))
        elif mode == "ticks":
            wait_ticks = int(rng.integers(0, 6))
            while started is None or len(printed) < wait_ticks:
                line = out.next()
                assert line is not None, proc.communicate()[1].decode()
                if line.startswith("start"):
                    started = [int(x) for x in line.split()[1:]]
                else:
                    printed.append(int(line.split()[1]))
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.003), rng.uniform(0.0, 0.03)]))
        if mode != "write":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), stderr
        stats["killed"] += proc.returncode == -signal.SIGKILL
        for line in out.rest():
            if line.startswith("start"):
                started = [int(x) for x in line.split()[1:]]
            elif line.startswith("tick"):
                printed.append(int(line.split()[1]))
            else:
                assert line == "done", line
        proc.stdout.close()

        n = check_ledger(path)
        if started is None:  # killed before the writer had resumed: nothing can have been committed
            assert not printed
            assert n == committed, (trial, n, committed)
            stats["before_start"] += 1
        else:
            first, recovered, partials = started
            # The writer continues right after the last committed tick; its resume removed what the
            # previous killed writer left (with one LedgerWarning), and warned only if there was something.
            assert first == committed, (trial, first, committed)
            assert partials == 0, trial
            assert recovered == (1 if garbage else 0), (trial, recovered, garbage)
            stats["recovered"] += recovered
            assert printed == list(range(first, first + len(printed))), printed
            # Every printed tick is committed; at most one more (killed between commit and print).
            assert first + len(printed) <= n <= first + len(printed) + 1, (trial, printed, n)
            stats["unprinted_commit"] += n == first + len(printed) + 1
        committed = n
        garbage = leftovers(path) + stray_partials(path)  # the next resume removes both, and warns
        stats["partial_left"] += any(g.endswith(".partial") for g in garbage)

        if trial % 4 == 3 and committed:
            # Resume in this process too: leftovers are removed loudly, exactly when there are some.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with ll.open(path, mode="a") as ledger:
                    run = ledger.run("r")
                    assert run.ticks == committed
                    assert leftovers(path) == []
            assert [issubclass(w.category, LedgerWarning) for w in caught] == ([True] if garbage else []), [
                str(w.message) for w in caught
            ]
            assert check_ledger(path) == committed
            stats["recovered"] += bool(garbage)
            garbage = []

    # The trials did reach the interesting states: kills, many ticks, and resumes that cleaned up.
    assert stats["killed"] >= N_TRIALS // 2, stats
    assert committed >= 30, (committed, stats)
    assert stats["recovered"] >= 1, stats


def test_second_writer_is_locked_out_until_the_holder_is_killed(tmp_path):
    path = tmp_path / "lock.ll"
    ll.create(path, n_samples=4).close()
    holder, out = start(HOLDER, path, stdin=subprocess.PIPE)
    try:
        assert out.next() == "holding", holder.communicate()[1].decode()

        # Another process is refused...
        contender = subprocess.run([sys.executable, "-c", CONTENDER, str(path)], capture_output=True, timeout=60)
        assert contender.returncode == 0, contender.stderr.decode()
        assert contender.stdout.decode().split() == ["locked"]
        # ... and so is a writer in this process; another run of the same ledger is not locked.
        ledger = ll.open(path, mode="a")
        with pytest.raises(RunLockedError, match="another writer"):
            ledger.run("r")
        with ledger.run("other") as other:
            assert other.ticks == 0

        # The refused writers disturbed nothing: the holder still commits its tick.
        holder.stdin.write(b"\n")
        holder.stdin.flush()
        assert out.next() == "committed 2", holder.communicate()[1].decode()
        assert ll.open(path).ticks("r").num_rows == 2

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert holder.returncode == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()
        holder.stdout.close()
        holder.stderr.close()

    # The OS released the killed holder's lock: the refused ledger object now opens the run. The holder
    # died after its commit with nothing written past it, so the resume has nothing to clean (no warning).
    with ledger.run("r") as run:
        assert run.ticks == 2
        run.log([3], loss=[4.5])
        assert run.end_epoch() == 2
    got = ll.open(path).trajectories("r")
    want = np.array([[1.5, np.nan, np.nan], [2.5, np.nan, np.nan], [np.nan, 3.5, np.nan], [np.nan, np.nan, 4.5]])
    np.testing.assert_array_equal(got, want.astype(np.float32))
    ledger.close()


# A writer that SIGKILLs itself at a chosen point: when Zarr is about to move a parent group's temp file into
# place (creating an array writes the parent groups' zarr.json "if not exists": root, runs/, runs/r/, ...),
# or just before ledger.run() creates the new run's ticks/ arrays.
KILLED_WRITER = r'''
import os, signal, sys
import zarr.storage._local as zlocal
import lossledger as ll
import lossledger._runs

def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "root-group":
    move = zlocal._safe_move
    zlocal._safe_move = lambda src, dst: kill() if dst.parent == zlocal.Path(sys.argv[1]) else move(src, dst)
else:
    lossledger._runs.ensure_tick_arrays = kill
run = ll.open(sys.argv[1], mode="a").run("r")
run.log([0], loss=[1.0])
run.end_epoch()
'''


def run_killed_writer(path: Path, where: str) -> None:
    ll.create(path, n_samples=3).close()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), where], capture_output=True, timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the writer was not killed where planned: {proc.stderr.decode()}")


def test_resume_removes_partial_files_outside_the_run(tmp_path):
    path = tmp_path / "stray.ll"
    run_killed_writer(path, "root-group")
    if [p.name.endswith(".partial") for p in path.iterdir()].count(True) != 1:
        pytest.fail("the killed writer left no temp file at the ledger root")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LedgerWarning)  # it may also clean temp files below runs/r/: legitimate
        with ll.open(path, mode="a").run("r") as run:  # the resume
            assert run.ticks == 0
    assert stray_partials(path) == []


def test_reader_of_a_run_killed_during_creation(tmp_path):
    path = tmp_path / "half.ll"
    run_killed_writer(path, "ticks-arrays")
    ledger = ll.open(path)
    assert ledger.runs == ["r"]
    assert ledger.ticks("r").num_rows == 0
