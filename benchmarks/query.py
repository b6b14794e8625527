"""Query benchmark: scores + top-100 from disk, against numpy and against a naive long-table design; memory
while scoring; and how much of the ledger a ``losses`` query filtered on ``sample_id`` reads.

Everything is measured side by side in one run and reported as ratios against baselines measured in the
same run, never against absolute-time thresholds. Goals are printed next to each number; the script always
exits 0.

    python benchmarks/query.py                          # N = 1,000,000 samples x 100 ticks (400 MB), ~1.5 min
    python benchmarks/query.py --n 200000 --ticks 50 --repeat 3

The verdicts are meant for the default size: at small N the fixed costs of a call (a DuckDB connection, the
parquet file, starting threads) dominate and the ratios say little.

The ledger is written with the real writer (``ll.create(path, n_samples=N)``, ``run.log(ids, loss=v)`` in
batches of 65,536, ``run.end_epoch()``), every sample logged at every tick (exponential losses, a per-sample
scale drawn from a lognormal); the same (T, N) float32 matrix is saved with ``np.save``.

Sections:

1. ``ledger.scores(run)`` then ``ledger.top(100, run)``, with the parquet score cache
   (``<ledger>/cache/scores/``) deleted before every call, vs ``np.load`` of the .npy plus numpy action
   (``m.sum(0, dtype=float64)``), variance (``m.var(0, dtype=float64)``) and top-100 (``argpartition``).
   Median of ``--repeat`` calls of each, interleaved with rotating order. Done twice: with the page cache
   warm for both (every file read once just before), and cold for both (``posix_fadvise(DONTNEED)`` on each
   chunk file and on the .npy before every call). The share of the files' pages resident in the page cache
   just before each call is measured with ``mincore`` and printed.
2. The naive design: a long Arrow table (sample_id int64, tick int32, loss float32; N x T rows), built
   before timing (its build time is printed apart), registered in DuckDB; timed: ``GROUP BY sample_id``
   with ``sum`` / ``var_pop`` into an Arrow table, then the top 100 by action from it. Interleaved with
   section 1's warm calls (``--naive-repeat`` of them).
3. Peak RSS growth while scoring (scores + top-100, cache deleted), in a fresh child process after a warm-up
   call and a heap trim: RSS sampled every 0.5 ms by a thread (psutil, or /proc/self/statm), and the
   kernel's own high-water mark (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). The numpy
   reference is measured the same way in another child, for scale.
4. ``SELECT tick, sample_id, value FROM losses WHERE sample_id IN (<100 ids>)``: time, chunks decoded
   (counted by wrapping the real chunk reader, ``lossledger._scan.ChunkSource.read``, in a pass-through
   counter) and bytes read by the process (``rchar`` of /proc/self/io), against a full scan of the view
   (``SELECT count(*), sum(value) FROM losses``). Ids inside one chunk column (so T chunks are needed) and
   ids spread over all rows (every chunk holds one, so every chunk is needed), one id, and 100 ids with a tick
   range (ticks 10-19 of 100); results are checked against ``ledger.trajectories``. Each filtered query is also run against the view
   registered as a bare Arrow C stream (the design before: DuckDB filters every row itself), on the same
   connection type.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import median, print_table, rss_reader, trim_heap

import lossledger as ll

LOG_BATCH = 65_536
TOP_K = 100
#: Goals (ratios measured in the same run; printed, never asserted).
GOAL_NUMPY_RATIO = 2.0  # scores + top-100 (cold score cache) <= 2x np.load + numpy compute
GOAL_NAIVE_SPEEDUP = 5.0  # >= 5x faster than the long table + DuckDB GROUP BY
GOAL_PEAK_MB = 256.0  # peak RSS growth while scoring


# --- helpers -----------------------------------------------------------------------------------------------
def fmt_s(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 10 else f"{x:.1f} s"


def span(xs: list[float]) -> str:
    """Median, and the fastest and slowest call."""
    return f"{fmt_s(median(xs))} ({fmt_s(min(xs))}..{fmt_s(max(xs))})"


def vm_hwm() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rchar() -> int | None:
    """Bytes this process has read through read() calls so far (/proc/self/io), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (``mincore``), or None where that cannot be asked."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private, never written: no copy made
        try:
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            base = ctypes.c_char.from_buffer(mm)
            ok = libc.mincore(ctypes.c_void_p(ctypes.addressof(base)), ctypes.c_size_t(size), vec) == 0
            del base
            if not ok:
                return None
            total += pages
            resident += sum(v & 1 for v in vec)
        finally:
            mm.close()
    return resident / total if total else None


def drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def fsync_all(paths: list[Path]) -> None:
    """Write back our own files once, so that DONTNEED can drop their (then clean) pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- building the data ---------------------------------------------------------------------------------------
def build(folder: Path, n: int, n_ticks: int, seed: int) -> tuple[Path, Path, float]:
    """Write the ledger with the real writer and the same matrix as .npy; return (ledger, npy, write seconds)."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0.0, 0.5, n).astype(np.float32)
    matrix = np.empty((n_ticks, n), np.float32)
    path = folder / "bench.ll"
    ledger = ll.create(path, n_samples=n)
    ids = ledger.sample_ids
    t0 = time.perf_counter()
    with ledger.run("r") as run:
        for t in range(n_ticks):
            matrix[t] = rng.exponential(1.0, n).astype(np.float32) * scale
            for lo in range(0, n, LOG_BATCH):
                run.log(ids[lo : lo + LOG_BATCH], loss=matrix[t, lo : lo + LOG_BATCH])
            run.end_epoch()
    written = time.perf_counter() - t0
    npy = folder / "matrix.npy"
    np.save(npy, matrix)
    return path, npy, written


def chunk_files(ledger_path: Path) -> list[Path]:
    return sorted(p for p in (ledger_path / "runs" / "r" / "streams" / "loss" / "c").rglob("*") if p.is_file())


# --- the contenders ------------------------------------------------------------------------------------------
def ours(ledger: ll.Ledger) -> tuple[float, float, np.ndarray]:
    """scores + top-100 with the score cache deleted first; returns (scores s, total s, top ids)."""
    shutil.rmtree(ledger.path / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    scores = ledger.scores("r")
    t1 = time.perf_counter()
    top = ledger.top(TOP_K, "r")
    t2 = time.perf_counter()
    ids = top["sample_id"].to_numpy()
    del scores, top
    return t1 - t0, t2 - t0, ids


def numpy_ref(npy: Path) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    m = np.load(npy)
    action = m.sum(0, dtype=np.float64)
    variance = m.var(0, dtype=np.float64)
    top = np.argpartition(-action, TOP_K)[:TOP_K]
    top = top[np.argsort(-action[top], kind="stable")]
    elapsed = time.perf_counter() - t0
    del m, variance
    return elapsed, top


def naive(long) -> tuple[float, np.ndarray]:
    import duckdb

    t0 = time.perf_counter()
    con = duckdb.connect()
    try:
        con.register("long", long)
        agg = con.sql(
            "SELECT sample_id, sum(loss) AS action, var_pop(loss) AS variance FROM long GROUP BY sample_id"
        ).to_arrow_table()
        con.register("agg", agg)
        top = con.sql(f"SELECT * FROM agg ORDER BY action DESC, sample_id LIMIT {TOP_K}").to_arrow_table()
    finally:
        con.close()
    return time.perf_counter() - t0, top["sample_id"].to_numpy()


# --- section 3: memory, in a fresh child process ---------------------------------------------------------
def memory_child(kind: str, ledger_path: str, npy: str) -> dict:
    read_rss, source = rss_reader()
    ledger = ll.open(ledger_path)
    if kind == "ours":
        ours(ledger)  # warm-up: imports, zarr and DuckDB set-up
        shutil.rmtree(Path(ledger_path) / "cache", ignore_errors=True)
    else:
        numpy_ref(Path(npy))
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], read_rss())
            time.sleep(0.0005)

    gc.collect()
    trim_heap()
    base = read_rss()
    peak[0] = base
    hwm_ok = reset_hwm()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if kind == "ours":
        ours(ledger)
    else:
        numpy_ref(Path(npy))
    elapsed = time.perf_counter() - t0
    time.sleep(0.005)
    stop.set()
    sampler.join()
    hwm = vm_hwm() if hwm_ok else None
    return {"source": source, "peak": peak[0] - base, "hwm": None if hwm is None else hwm - base,
            "seconds": elapsed}


def run_memory_child(kind: str, ledger_path: Path, npy: Path) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", kind, "--_ledger", str(ledger_path),
           "--_npy", str(npy)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"memory child failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- section 4: filter pushdown into the losses view ------------------------------------------------------
class ChunkCounter:
    """Counts calls of the real chunk reader (a pass-through wrapper; None where the reader does not exist)."""

    def __init__(self) -> None:
        import lossledger._scan as scan

        self.count = 0
        self.source = getattr(scan, "ChunkSource", None)
        if self.source is None:
            return
        real = self.source.read
        counter = self

        def read(self, *args, **kwargs):
            counter.count += 1
            return real(self, *args, **kwargs)

        self._real = real
        self.source.read = read

    @property
    def available(self) -> bool:
        return self.source is not None


class StreamOnly:
    """The ``losses`` view as a bare Arrow C stream, which DuckDB can push no filter into (the design before)."""

    def __init__(self, ledger: ll.Ledger) -> None:
        from lossledger.sql import LossesView

        self.view = LossesView(ledger)
        self.schema = self.view.schema

    def __arrow_c_stream__(self, requested_schema=None):
        return self.view.__arrow_c_stream__(requested_schema)


def timed_query(ledger: ll.Ledger, sql: str, counter: ChunkCounter, *, pushdown: bool = True):
    """Run ``sql`` on a fresh connection; return (seconds, chunks decoded, bytes read, result)."""
    con = ledger.duckdb()
    try:
        if not pushdown:
            con.register("losses_stream", StreamOnly(ledger))
            sql = sql.replace("FROM losses", "FROM losses_stream")
        before_chunks, before_bytes = counter.count, rchar()
        t0 = time.perf_counter()
        table = con.sql(sql).to_arrow_table()
        elapsed = time.perf_counter() - t0
        after_bytes = rchar()
    finally:
        con.close()
    read_bytes = None if before_bytes is None or after_bytes is None else after_bytes - before_bytes
    return elapsed, counter.count - before_chunks, read_bytes, table


def check_against_trajectories(ledger: ll.Ledger, table, ids: np.ndarray, ticks: range | None = None) -> bool:
    traj = ledger.trajectories("r", "loss", ids=ids)  # (len(ids), T)
    want = {(int(i), t): float(v) for i, row in zip(ids, traj) for t, v in enumerate(row)
            if not np.isnan(v) and (ticks is None or t in ticks)}
    got = {(r["sample_id"], r["tick"]): r["value"] for r in table.to_pylist()}
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1e-6 * max(1.0, abs(want[k])) for k in got)


# --- main ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="samples (default 1,000,000)")
    parser.add_argument("--ticks", type=int, default=100, help="ticks (default 100)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per contender in section 1 (default 5)")
    parser.add_argument("--naive-repeat", type=int, default=3, help="timed naive GROUP BY calls (default 3)")
    parser.add_argument("--query-repeat", type=int, default=3, help="timed calls per query in section 4 (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="folder for the data (kept; reused when it already holds it)")
    parser.add_argument("--_memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--_ledger", help=argparse.SUPPRESS)
    parser.add_argument("--_npy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        print(json.dumps(memory_child(args._memory_child, args._ledger, args._npy)))
        return 0

    import duckdb
    import numcodecs
    import pyarrow as pa
    import zarr

    started = time.perf_counter()
    n, n_ticks = args.n, args.ticks
    print(f"lossledger query benchmark: N = {n:,} samples x {n_ticks} ticks float32 ({4 * n * n_ticks / 1e6:.0f} MB)")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, pyarrow {pa.__version__}, duckdb "
          f"{duckdb.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, lossledger "
          f"{ll.__version__}, {os.cpu_count()} CPUs ({sys.platform})")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lossledger-qbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    try:
        stamp = folder / f"built-{n}x{n_ticks}-{args.seed}"
        if stamp.exists():
            ledger_path, npy, written = folder / "bench.ll", folder / "matrix.npy", float("nan")
        else:
            for old in folder.glob("built-*"):
                old.unlink()
            shutil.rmtree(folder / "bench.ll", ignore_errors=True)
            ledger_path, npy, written = build(folder, n, n_ticks, args.seed)
            stamp.touch()
        files = chunk_files(ledger_path)
        fsync_all([*files, npy])
        ledger = ll.open(ledger_path)
        how = "reused from --dir" if math.isnan(written) else f"written with the real writer in {written:.1f} s"
        print(f"ledger {how}: {len(files)} chunk files, {sum(p.stat().st_size for p in files) / 1e6:.0f} MB; "
              f".npy {npy.stat().st_size / 1e6:.0f} MB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        # --- 2 (set-up): the naive long table, not timed --------------------------------------------------
        t0 = time.perf_counter()
        matrix = np.load(npy)
        long = pa.table({
            "sample_id": pa.array(np.tile(ledger.sample_ids, n_ticks)),
            "tick": pa.array(np.repeat(np.arange(n_ticks, dtype=np.int32), n)),
            "loss": pa.array(matrix.reshape(-1)),
        })
        del matrix
        long_build = time.perf_counter() - t0

        # --- 1 + 2: interleaved ----------------------------------------------------------------------------
        results: dict[str, dict[str, list[float]]] = {}
        residency: dict[str, list[float]] = {}
        tops: dict[str, np.ndarray] = {}
        for cache in ("warm", "cold"):
            times: dict[str, list[float]] = {"scores": [], "ours": [], "numpy": [], "naive": []}
            res: list[float] = []
            contenders = ["ours", "numpy"] + (["naive"] if cache == "warm" else [])
            if cache == "warm":
                read_all([*files, npy])
            for r in range(args.repeat):
                order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
                for who in order:
                    if who == "naive" and len(times["naive"]) >= args.naive_repeat:
                        continue
                    paths = files if who == "ours" else [npy] if who == "numpy" else []
                    if cache == "cold":
                        drop_page_cache(paths)
                    if paths:
                        frac = resident_fraction(paths)
                        if frac is not None:
                            res.append(frac)
                    gc.collect()
                    if who == "ours":
                        s, total, tops["ours"] = ours(ledger)
                        times["scores"].append(s)
                        times["ours"].append(total)
                    elif who == "numpy":
                        elapsed, tops["numpy"] = numpy_ref(npy)
                        times["numpy"].append(elapsed)
                    else:
                        elapsed, tops["naive"] = naive(long)
                        times["naive"].append(elapsed)
            results[cache] = times
            residency[cache] = res
        del long
        gc.collect()

        for cache in ("warm", "cold"):
            t = results[cache]
            ratio = median(t["ours"]) / median(t["numpy"])
            frac = residency[cache]
            where = (f"{min(frac) * 100:.0f}-{max(frac) * 100:.0f}% of pages cached" if frac else "residency n/a")
            label = "1." if cache == "warm" else "  "
            rows += [
                (f"{label} page cache {cache} ({where})", "", "", ""),
                ("   ledger.scores(run), cache deleted", span(t["scores"]), "", ""),
                ("   + ledger.top(100, run): ours, total", span(t["ours"]), "", ""),
                ("   np.load + numpy action, variance, top-100", span(t["numpy"]), "", ""),
                ("   ratio ours / numpy", f"{ratio:.2f}x", f"<= {GOAL_NUMPY_RATIO:.0f}x",
                 "met" if ratio <= GOAL_NUMPY_RATIO else "NOT met"),
                ("   ratio of the fastest of each", f"{min(t['ours']) / min(t['numpy']):.2f}x", "", "info"),
            ]
        t = results["warm"]
        speedup = median(t["naive"]) / median(t["ours"])
        same = {k: bool(np.array_equal(np.sort(v), np.sort(tops["numpy"]))) for k, v in tops.items()}
        rows += [
            ("2. naive: long table + DuckDB GROUP BY + top-100", span(t["naive"]), "", ""),
            ("   long table build (N x T rows, not timed above)", fmt_s(long_build), "", "info"),
            ("   speed-up of ours over naive (warm, medians)", f"{speedup:.1f}x", f">= {GOAL_NAIVE_SPEEDUP:.0f}x",
             "met" if speedup >= GOAL_NAIVE_SPEEDUP else "NOT met"),
            ("   speed-up, fastest naive / fastest ours", f"{min(t['naive']) / min(t['ours']):.1f}x", "", "info"),
            ("   top-100 ids equal numpy's (ours / naive)", f"{same['ours']} / {same.get('naive')}", "", ""),
        ]

        # --- 3: memory ------------------------------------------------------------------------------------
        rss_source = "RSS"
        for kind in ("ours", "numpy"):
            res3 = run_memory_child(kind, ledger_path, npy)
            label = "3. peak RSS growth, scores + top-100" if kind == "ours" else "   peak RSS growth, numpy reference"
            if res3 is None:
                rows.append((label, "child failed (see stderr)", "", ""))
                continue
            rss_source = res3["source"]
            hwm = "n/a" if res3["hwm"] is None else f"{res3['hwm'] / 1e6:.0f} MB"
            peak = res3["peak"] / 1e6
            goal = f"<= {GOAL_PEAK_MB:.0f} MB" if kind == "ours" else ""
            verdict = ("met" if max(peak, (res3["hwm"] or 0) / 1e6) <= GOAL_PEAK_MB else "NOT met") if kind == "ours" else "info"
            rows.append((label, f"{peak:.0f} MB (VmHWM {hwm})", goal, verdict))

        # --- 4: pushdown ----------------------------------------------------------------------------------
        counter = ChunkCounter()
        meta = json.loads((ledger_path / "runs" / "r" / "streams" / "loss" / "zarr.json").read_text())
        per_chunk = int(meta["chunk_grid"]["configuration"]["chunk_shape"][1])
        n_cols = -(-n // per_chunk)
        rng = np.random.default_rng(args.seed + 1)
        ids_all = ledger.sample_ids
        clustered = np.sort(ids_all[rng.choice(min(n, per_chunk), size=min(TOP_K, n), replace=False)])
        spread = np.sort(ids_all[rng.choice(n, size=min(TOP_K, n), replace=False)])
        w0, w1 = n_ticks // 10, n_ticks // 10 + max(1, min(10, n_ticks // 2))  # ticks 10..19 of 100
        queries: dict[str, tuple[str | None, np.ndarray | None, str]] = {
            "full scan: SELECT count(*), sum(value) FROM losses": (
                "SELECT count(*) AS n, sum(value) AS s FROM losses", None, ""),
            "IN (100 ids in one chunk column)": (None, clustered, ""),
            "IN (100 ids spread over all rows)": (None, spread, ""),
            "= (one id)": (None, clustered[:1], ""),
            f"IN (100 ids in one chunk column) AND tick BETWEEN {w0} AND {w1 - 1}": (None, clustered, f"{w0}:{w1}"),
        }
        timings: dict[str, dict[str, list]] = {}
        for _ in range(args.query_repeat):
            for name, (sql, ids, window) in queries.items():
                if sql is None:
                    cond = f"= {int(ids[0])}" if ids.size == 1 else f"IN ({', '.join(str(int(i)) for i in ids)})"
                    sql = f"SELECT tick, sample_id, value FROM losses WHERE sample_id {cond}"
                    if window:
                        a, b = map(int, window.split(":"))
                        sql += f" AND tick BETWEEN {a} AND {b - 1}"
                for pushdown in (True, False) if ids is not None else (True,):
                    elapsed, chunks, nbytes, table = timed_query(ledger, sql, counter, pushdown=pushdown)
                    entry = timings.setdefault(f"{name}|{pushdown}", {"t": [], "chunks": 0, "bytes": None, "ok": None})
                    entry["t"].append(elapsed)
                    entry.update(chunks=chunks, bytes=nbytes)
                    if ids is not None:
                        ticks = range(*map(int, window.split(":"))) if window else None
                        entry["ok"] = check_against_trajectories(ledger, table, ids, ticks)
        full_time = median(timings[f"{next(iter(queries))}|True"]["t"])
        for i, (name, (sql, ids, window)) in enumerate(queries.items()):
            entry = timings[f"{name}|True"]
            n_t = n_ticks if not window else len(range(*map(int, window.split(":"))))
            needed = n_t * (n_cols if ids is None else np.unique(np.searchsorted(ids_all, ids) // per_chunk).size)
            decoded = f"{entry['chunks']}/{n_ticks * n_cols} chunks" if counter.available else "chunks n/a"
            mb = "" if entry["bytes"] is None else f", {entry['bytes'] / 1e6:.0f} MB read"
            t = median(entry["t"])
            if ids is None:
                rows.append((f"{'4.' if i == 0 else '  '} {name}", f"{fmt_s(t)}, {decoded}{mb}", "", ""))
                continue
            only_needed = counter.available and entry["chunks"] == needed
            verdict = ("info: " if window else "") + "reads only needed: " + ("met" if only_needed else "NOT met")
            rows.append((f"   {name}", f"{fmt_s(t)}, {decoded}{mb}", f"needed {needed}",
                         f"{verdict}; rows match trajectories: {entry['ok']}"))
            off = timings[f"{name}|False"]
            rows.append(("     same query, no pushdown (bare Arrow stream)",
                         f"{fmt_s(median(off['t']))}, {off['chunks']} chunks", "",
                         f"pushdown {median(off['t']) / t:.1f}x faster; vs full scan {t / full_time:.2f}x"))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    print_table(rows)
    print(f"timings: median (fastest..slowest) of {args.repeat} calls (naive: {args.naive_repeat}, queries: "
          f"{args.query_repeat}), contenders interleaved in rotating order; score cache deleted before each ours call")
    print(f"memory: {rss_source} sampled every 0.5 ms by a thread and VmHWM, growth over the RSS after a warm-up "
          f"call and heap trim, in a fresh process; total {time.perf_counter() - started:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
