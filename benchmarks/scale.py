"""Scale benchmark: 10 ticks of N float32 losses written and scored out of core, at N = 1M and N = 100M.

The goal (issue 8): 100,000,000 samples x 10 ticks (4 GB of float32) written and scored on a 24 GB machine
with a peak RSS of at most 2 GB in every phase, and time growing linearly with the data: the time per
sample-tick at 100M over that at 1M is about 1. Both sizes run side by side in one invocation and only
their ratios and the RSS are judged, never absolute times; the script always exits 0.

    python benchmarks/scale.py                      # N = 1M and 100M x 10 ticks: ~15 min, ~35 GB of disk at peak
    python benchmarks/scale.py --quick              # N = 1M and 10M: ~2 min
    python benchmarks/scale.py --samples 1000000 30000000 --dir /big/disk

The data goes to a new folder under ``--dir`` (default: the system temp folder), which is checked for room
first and deleted at the end, also when a phase fails or the script is interrupted.

Each phase runs in a fresh child process, one after the other, so that each one's peak RSS is its own:

1. **write**: ``ll.create(path, n_samples=N)``, ``ledger.run("r")``, then per tick ``run.log(ids, loss=v)`` in
   batches of ``--batch`` (1,000,000) consecutive ids, as a data loader over a large dataset would hand them,
   and ``run.end_epoch()``. At ticks 1, 4 and 7 one sample in a thousand is not logged, so NaN appears.
   Losses: standard exponential float32 times a per-sample scale (0.5 to 1.5, from the id), made per batch
   (the benchmark holds no N-sized array of its own). Timed: the ``log`` and ``end_epoch`` calls only.
2. **score**: ``ll.open(path).scores("r")`` with no score cache yet: the engine reads the 10 ticks and writes
   the cache. Checked (untimed) against ``ledger.trajectories`` for 1,000 samples.
3. **scores, cached**: ``ll.open(path).scores("r")`` again in a new process, served from the cache.
4. **top**: ``ll.open(path).top(100, "r")`` (cache present). Checked (untimed) against a plain numpy top-100
   over the action column, read from the scores table batch by batch.
5. **export**: ``ledger.export(file)``: scores joined with the samples table, one parquet file. Its size is
   recorded and the file deleted.
6. **sql**: ``ledger.sql("SELECT count(*), count(action), avg(action) FROM scores WHERE dt = 'epoch'")``: the
   ``scores`` view computes the ``step`` and ``wall`` caches (one read) and DuckDB scans the epoch cache.
   ``--no-sql`` leaves it out (it writes two more score caches, ~14 GB at 100M).

Memory: peak RSS of the whole child (the kernel's ``VmHWM``, which counts every page the process ever had
resident, file-backed pages of memory maps included) and, for a cross-check, psutil RSS sampled every
millisecond by a thread during the phase. Disk: bytes of the ledger's chunk files, of the score cache, of
the export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import print_table, rss_reader

import lossledger as ll

TICKS = 10
LOG_BATCH = 1_000_000
TOP_K = 100
MISSING_TICKS = (1, 4, 7)  # ticks at which one sample in a thousand is not logged
MISSING_EVERY = 1000
#: Goals: peak RSS of every phase at the largest N; time per sample-tick, largest N over smallest (linear).
GOAL_RSS = 2 << 30
GOAL_LINEAR = 1.5
PHASES = ("write", "score", "cached", "top", "export", "sql")
#: Disk needed per sample, for the room check: 10 ticks of float32 (40 B, lz4 hardly shrinks random losses),
#: a score cache (~73 B; three with the SQL view) and the export (~75 B, deleted after it is measured).
DISK_PER_SAMPLE = 40 + 75 + 75
DISK_PER_SAMPLE_SQL = 2 * 75


# --- measuring, inside a child ---------------------------------------------------------------------------
def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Sampler:
    """Peak RSS sampled every millisecond by a thread, between start() and stop()."""

    def __init__(self) -> None:
        self.read, self.source = rss_reader()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def start(self) -> Sampler:
        self.base = self.read()
        self.peak = self.base
        self._thread.start()
        return self

    def stop(self) -> None:
        time.sleep(0.005)
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(Path(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def losses_for(ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 losses of a batch: standard exponential times a per-sample scale in [0.5, 1.5) from the id."""
    scale = (0.5 + (ids % 97) / np.float32(97)).astype(np.float32)
    return rng.standard_exponential(ids.size, dtype=np.float32) * scale


def phase_write(path: Path, n: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    sampler = Sampler().start()
    t0 = time.perf_counter()
    ledger = ll.create(path, n_samples=n)
    created = time.perf_counter() - t0
    rss_created = sampler.read()
    logging = committing = 0.0
    logged = 0
    with ledger.run("r") as run:
        for t in range(TICKS):
            for lo in range(0, n, batch):
                ids = np.arange(lo, min(n, lo + batch), dtype=np.int64)
                if t in MISSING_TICKS:
                    ids = ids[ids % MISSING_EVERY != t]
                values = losses_for(ids, rng)
                a = time.perf_counter()
                run.log(ids, loss=values)
                logging += time.perf_counter() - a
                logged += ids.size
            a = time.perf_counter()
            run.end_epoch()
            committing += time.perf_counter() - a
    sampler.stop()
    return {"seconds": logging + committing, "create_s": created, "log_s": logging, "commit_s": committing,
            "logged": logged, "rss_after_create": rss_created, "peak": sampler.peak, "base": sampler.base,
            "hwm": vm_hwm(), "rss_source": sampler.source,
            "disk": folder_bytes(path / "runs" / "r" / "streams")}


def phase_score(path: Path, n: int) -> dict:
    shutil.rmtree(path / "cache", ignore_errors=True)
    sampler = Sampler().start()
    t0 = time.perf_counter()
    ledger = ll.open(path)
    opened = time.perf_counter() - t0
    table = ledger.scores("r")
    seconds = time.perf_counter() - t0
    sampler.stop()
    out = {"seconds": seconds, "open_s": opened, "peak": sampler.peak, "base": sampler.base, "hwm": vm_hwm(),
           "rows": table.num_rows, "cache": folder_bytes(path / "cache")}
    out["check"] = check_scores(ledger, table, n)
    return out


def check_scores(ledger: ll.Ledger, table, n: int) -> bool:
    """Scores of 1,000 samples spread over the rows equal a numpy reference over their trajectories."""
    rows = np.unique(np.linspace(0, n - 1, 1000).astype(np.int64))
    traj = ledger.trajectories("r", "loss", ids=rows).astype(np.float64)  # (1000, T)
    picked = table.take(rows)
    ok = True
    with np.errstate(invalid="ignore"):
        want = {"action": np.nansum(traj, 1), "mean": np.nanmean(traj, 1), "variance": np.nanvar(traj, 1),
                "n_obs": (~np.isnan(traj)).sum(1)}
    for name, values in want.items():
        ok &= bool(np.allclose(picked[name].to_numpy(), values, rtol=1e-9))
    return ok and table["sample_id"][n - 1].as_py() == n - 1


def phase_cached(path: Path, n: int) -> dict:
    sampler = Sampler().start()
    t0 = time.perf_counter()
    table = ll.open(path).scores("r")
    seconds = time.perf_counter() - t0
    sampler.stop()
    return {"seconds": seconds, "peak": sampler.peak, "base": sampler.base, "hwm": vm_hwm(), "rows": table.num_rows}


def phase_top(path: Path, n: int) -> dict:
    sampler = Sampler().start()
    t0 = time.perf_counter()
    ledger = ll.open(path)
    top = ledger.top(TOP_K, "r")
    seconds = time.perf_counter() - t0
    sampler.stop()
    out = {"seconds": seconds, "peak": sampler.peak, "base": sampler.base, "hwm": vm_hwm(), "rows": top.num_rows}
    # Untimed check: a plain numpy top-k over the action column, batch by batch (ties broken by sample id).
    best_ids, best_values = np.empty(0, np.int64), np.empty(0)
    for batch in ledger.scores("r").to_batches():
        action = batch.column("action").to_numpy(zero_copy_only=False)
        ids = batch.column("sample_id").to_numpy()
        keep = ~np.isnan(action)
        best_ids = np.concatenate([best_ids, ids[keep]])
        best_values = np.concatenate([best_values, action[keep]])
        order = np.lexsort((best_ids, -best_values))[:TOP_K]
        best_ids, best_values = best_ids[order], best_values[order]
    out["check"] = top["sample_id"].to_pylist() == best_ids.tolist() and top["rank"].to_pylist() == list(
        range(1, TOP_K + 1))
    return out


def phase_export(path: Path, n: int) -> dict:
    import pyarrow.parquet as pq

    target = path.parent / "export.parquet"
    sampler = Sampler().start()
    t0 = time.perf_counter()
    ll.open(path).export(target)
    seconds = time.perf_counter() - t0
    sampler.stop()
    out = {"seconds": seconds, "peak": sampler.peak, "base": sampler.base, "hwm": vm_hwm(),
           "bytes": target.stat().st_size, "rows": pq.read_metadata(target).num_rows}
    target.unlink()
    return out


def phase_sql(path: Path, n: int) -> dict:
    sampler = Sampler().start()
    t0 = time.perf_counter()
    row = ll.open(path).sql(
        "SELECT count(*) AS n, count(action) AS observed, avg(action) AS mean FROM scores WHERE dt = 'epoch'"
    ).to_pylist()[0]
    seconds = time.perf_counter() - t0
    sampler.stop()
    return {"seconds": seconds, "peak": sampler.peak, "base": sampler.base, "hwm": vm_hwm(), "rows": row["n"],
            "check": row["n"] == n and row["observed"] == n, "cache": folder_bytes(path / "cache")}


CHILDREN = {"write": phase_write, "score": phase_score, "cached": phase_cached, "top": phase_top,
            "export": phase_export, "sql": phase_sql}


# --- the parent ------------------------------------------------------------------------------------------
def run_child(phase: str, path: Path, n: int, batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_phase", phase, "--_ledger", str(path), "--_n", str(n),
           "--batch", str(batch)]
    wall = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"failed": f"{why}: {proc.stderr.strip()[-1500:]}", "wall": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (5 min {five:.2f})"


def gb(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def secs(x: float) -> str:
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def fmt_n(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", help="sample counts (default: 1,000,000 and 100,000,000)")
    parser.add_argument("--quick", action="store_true", help="1,000,000 and 10,000,000 samples")
    parser.add_argument("--batch", type=int, default=LOG_BATCH, help=f"ids per run.log call (default {LOG_BATCH:,})")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="parent folder of the data (default: temp)")
    parser.add_argument("--no-sql", action="store_true", help="leave out the SQL scores view")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    parser.add_argument("--_ledger", help=argparse.SUPPRESS)
    parser.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._phase:
        path, n = Path(args._ledger), args._n
        result = phase_write(path, n, args.batch) if args._phase == "write" else CHILDREN[args._phase](path, n)
        print(json.dumps(result))
        return 0

    import duckdb
    import pyarrow as pa

    sizes = args.samples or ([1_000_000, 10_000_000] if args.quick else [1_000_000, 100_000_000])
    sizes = sorted(set(sizes))
    phases = [p for p in PHASES if not (p == "sql" and args.no_sql)]
    parent = Path(args.dir)
    need = max(sizes) * (DISK_PER_SAMPLE + (0 if args.no_sql else DISK_PER_SAMPLE_SQL))
    free = shutil.disk_usage(parent).free
    print(f"lossledger scale benchmark: N = {', '.join(fmt_n(n) for n in sizes)} samples x {TICKS} ticks float32 "
          f"({', '.join(gb(4 * n * TICKS) for n in sizes)}); run.log batches of {args.batch:,} ids")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, pyarrow {pa.__version__}, duckdb "
          f"{duckdb.__version__}, lossledger {ll.__version__}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    print(f"data under {parent}: {gb(free)} free, ~{gb(need)} needed at peak; load average {load()}")
    if free < need * 1.1:
        print(f"not enough room under {parent}: pass --dir on a larger disk, or --no-sql / smaller --samples")
        return 0
    folder = Path(tempfile.mkdtemp(prefix="lossledger-scale-", dir=parent))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the finally below deletes the data
    results: dict[int, dict[str, dict]] = {}
    started = time.perf_counter()
    try:
        for n in sizes:
            path = folder / f"n{n}.ll"
            results[n] = {}
            for phase in phases:
                res = run_child(phase, path, n, args.batch)
                results[n][phase] = res
                if "failed" in res:
                    print(f"  N = {fmt_n(n)} {phase}: FAILED ({res['failed']})", flush=True)
                    break
                print(f"  N = {fmt_n(n)} {phase}: {secs(res['seconds'])}, peak RSS {gb(res['hwm'])}; "
                      f"load {load()}", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(results, sizes, phases)
    print(f"total {time.perf_counter() - started:.0f} s; load average {load()} at the end; data deleted")
    return 0


def report(results: dict[int, dict[str, dict]], sizes: list[int], phases: list[str]) -> None:
    small, large = sizes[0], sizes[-1]
    label = {"write": "write (log + end_epoch)", "score": "scores(run), computed", "cached": "scores(run), cached",
             "top": "top(100, run)", "export": "export(file)", "sql": "sql: scores view, dt='epoch'"}
    # Linear growth is judged where the work is per sample-tick; a cached table (a memory map) and a top-k
    # over a cache are so short at 1M that fixed costs (imports aside, opening the ledger) dominate them.
    judged = {"write", "score", "export", "sql"}
    heads = " | ".join(f"N={fmt_n(n)}" for n in sizes)
    rows: list[tuple[str, str, str, str]] = []
    for phase in phases:
        got = [results.get(n, {}).get(phase) for n in sizes]
        if any(r is None or "failed" in r for r in got):
            rows.append((label[phase], "failed or not run", "", ""))
            continue
        per = [r["seconds"] / (n * TICKS) * 1e9 for r, n in zip(got, sizes)]
        ratio = per[-1] / per[0]
        verdict = f"{ratio:.2f}x " + (("met" if ratio <= GOAL_LINEAR else "NOT met") if phase in judged else "info")
        hwm = [r["hwm"] for r in got]
        slope = (hwm[-1] - hwm[0]) / (large - small)
        rows += [
            (f"{label[phase]}: time ({heads})", " | ".join(secs(r["seconds"]) for r in got), "", "info"),
            ("  ns per sample-tick, ratio", " | ".join(f"{p:.1f}" for p in per),
             f"<= {GOAL_LINEAR}x" if phase in judged else "", verdict),
            ("  peak RSS: VmHWM (sampled)", " | ".join(f"{gb(h)} ({gb(r['peak'])})" for h, r in zip(hwm, got)),
             f"<= {gb(GOAL_RSS)}", f"{'met' if hwm[-1] <= GOAL_RSS else 'NOT met'} at {fmt_n(large)}"),
            ("  peak RSS growth per sample", f"{slope:.1f} B", "", "info"),
        ]
        if "check" in got[-1]:
            rows.append(("  result checked against numpy", " | ".join(str(r["check"]) for r in got), "", ""))
    write, score, export = (results[large].get(p, {}) for p in ("write", "score", "export"))
    if "disk" in write:
        raw = write["disk"] / (4 * large * TICKS)
        rows.append((f"disk at {fmt_n(large)}: ledger chunks", f"{gb(write['disk'])} ({raw:.2f}x raw float32)", "", "info"))
        rows.append(("  create(n_samples=N)", f"{secs(write['create_s'])}, RSS after {gb(write['rss_after_create'])}",
                     "", "info"))
    if "cache" in score:
        rows.append(("  score cache, one dt", f"{gb(score['cache'])} ({score['cache'] / large:.0f} B per sample)", "",
                     "info"))
    if "bytes" in export:
        rows.append(("  export parquet", f"{gb(export['bytes'])} ({export['bytes'] / large:.0f} B per sample)", "",
                     "info"))
    print_table(rows)
    print("time: the call in a fresh process (write: the log and end_epoch calls only); RSS: the whole child process, "
          "the kernel's VmHWM (psutil RSS sampled every ms in brackets)")


if __name__ == "__main__":
    raise SystemExit(main())
