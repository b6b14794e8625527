"""Writer benchmark: commit time, per-call log cost, memory while logging, and bytes on disk per tick.

Everything is measured side by side in one run and reported as ratios against a baseline measured in the
same run (``np.save`` of the tick's values to the same temporary folder), never against absolute-time
thresholds. The goals are printed next to each number; the script always exits 0.

    python benchmarks/write.py                 # N = 1,000,000 samples
    python benchmarks/write.py --n 200000 --repeat 5

Sections:

1. ``end_epoch`` of a tick in which all N samples were logged in batches of 256 (random permutation order),
   vs ``np.save`` of the tick's float32 (N,) values to a new file in the same temp folder. Median over
   ``--repeat`` ticks; the two are interleaved (order alternating) so both see the same page-cache state.
   Neither fsyncs (Zarr's LocalStore writes a temp file and renames it; ``np.save`` writes in place).
   ``--sync`` adds an untimed ``os.sync()`` before each pair. On a busy machine np.save of 4 MB swings
   between ~1 ms and ~10 ms while end_epoch only doubles, so the ratio of medians swings with it; the ratio
   of the fastest of each is printed beside it as the less load-sensitive check.
2. Per-call cost of ``run.log(ids, loss=values)`` for a 256-sample batch (int64 ids, float32 values):
   median over every call of the ticks of section 1; and for two streams in one call.
3. Memory while logging and committing ``--mem-ticks`` (60) ticks of N samples, in a fresh child process
   (heap trimmed before the first tick): RSS sampled every 0.5 ms by a thread (psutil, or /proc/self/statm
   without it); peak growth over the RSS just before the first tick, read after 5, 10, 20 and all ticks.
   Cross-checked with tracemalloc (peak of traced Python/numpy allocations over 3 more ticks, run apart).
   Repeated at N/4: the traced bytes per sample agree, so the memory is O(N); the peak stops rising after
   the first ticks, so it does not grow with the number of ticks. (Verdicts are meant for large N: at
   small N fixed costs of a few MB dominate.)
4. Bytes on disk per tick (chunk files of the tick) vs raw float32 size (4 N bytes), for exponential and
   lognormal float32 losses.
"""

from __future__ import annotations

import argparse
import json
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

BATCH = 256
#: Goals (ratios / per-call costs measured in the same run; printed, never asserted).
GOAL_COMMIT_RATIO = 3.0  # end_epoch <= 3x np.save of the same array
GOAL_LOG_US = 50.0  # run.log of 256 samples <= 50 us
#: Memory must not grow with ticks: from tick 20 to the last, peak RSS may rise by at most 1% of what keeping
#: each tick would cost (4 B per sample per tick), i.e. 0.04 B per sample per tick.
GOAL_MEM_SLOPE = 0.04
#: O(N): the traced peak per sample at N and at N/4 agree within this factor (the tick buffer is 5 B/sample).
GOAL_MEM_ON_FACTOR = 1.25
MEM_CHECKPOINTS = (5, 10, 20)


# --- helpers -------------------------------------------------------------------------------------------
def losses(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Per-sample losses as a training loop would log them (float32, positive, heavy-tailed)."""
    if kind == "exponential":  # cross-entropy mid-training: most samples small, a tail of hard ones
        return rng.exponential(0.7, n).astype(np.float32)
    if kind == "lognormal":
        return rng.lognormal(-2.0, 1.5, n).astype(np.float32)
    raise ValueError(kind)


def log_tick(run: ll.Run, perm: np.ndarray, streams: dict[str, np.ndarray], times: list[int] | None) -> None:
    """Log every sample once, in batches of BATCH in ``perm`` order; append each call's ns to ``times``."""
    clock = time.perf_counter_ns
    for lo in range(0, perm.size, BATCH):
        ids = perm[lo : lo + BATCH]
        batch = {name: values[ids] for name, values in streams.items()}
        t0 = clock()
        run.log(ids, **batch)
        t1 = clock()
        if times is not None:
            times.append(t1 - t0)


def tick_bytes(ledger_path: Path, run: str, stream: str, tick: int) -> tuple[int, int]:
    """(apparent size, allocated size) of the chunk files of one tick of one stream."""
    size = blocks = 0
    for dirpath, _, files in os.walk(ledger_path / "runs" / run / "streams" / stream / "c" / str(tick)):
        for name in files:
            st = os.stat(Path(dirpath, name))
            size += st.st_size
            blocks += st.st_blocks * 512
    return size, blocks


def mb(x: float) -> str:
    return f"{x / 1e6:.1f} MB"


# --- section 3: memory, in a fresh child process ----------------------------------------------------------
def memory_child(n: int, ticks: int, folder: str) -> dict:
    import gc
    import tracemalloc

    read_rss, rss_source = rss_reader()
    rng = np.random.default_rng(3)
    perm = rng.permutation(n)  # reused every tick: the benchmark itself allocates nothing per tick
    values = losses(rng, n, "exponential")
    ledger = ll.create(Path(folder) / f"mem-{n}.ll", n_samples=n)
    run = ledger.run("mem")

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            r = read_rss()
            if r > peak[0]:
                peak[0] = r
            time.sleep(0.0005)

    gc.collect()
    trim_heap()  # give back what setup freed, so the ticks cannot hide in it
    base = read_rss()
    peak[0] = base
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    checkpoints = sorted({t for t in MEM_CHECKPOINTS if t < ticks} | {ticks})
    peaks: dict[int, int] = {}
    for t in range(1, ticks + 1):
        log_tick(run, perm, {"loss": values}, None)
        run.end_epoch()
        if t in checkpoints:
            time.sleep(0.002)  # let the sampler see the end of the commit
            peaks[t] = peak[0] - base
    stop.set()
    sampler.join()
    retained = read_rss() - base

    # tracemalloc cross-check, run apart: its own tables would inflate the RSS above
    tm_ticks = 3
    gc.collect()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(tm_ticks):
        log_tick(run, perm, {"loss": values}, None)
        run.end_epoch()
    end, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    run.close()
    return {"n": n, "rss_source": rss_source, "peaks": peaks, "retained": retained, "tm_ticks": tm_ticks,
            "tm_peak": tm_peak - start, "tm_retained": end - start}


def run_memory_child(n: int, ticks: int, folder: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", "--n", str(n), "--mem-ticks", str(ticks),
           "--_dir", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory child failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["peaks"] = {int(k): v for k, v in res["peaks"].items()}
    return res


def profile(ledger: ll.Ledger, rng: np.random.Generator, n: int) -> None:
    """cProfile one tick of ``run.log`` calls and one ``end_epoch`` (after a warm-up tick)."""
    import cProfile
    import pstats

    run = ledger.run("profile")
    for t in range(2):
        values, perm = losses(rng, n, "exponential"), rng.permutation(n)
        prof = cProfile.Profile() if t else None
        if prof:
            prof.enable()
        log_tick(run, perm, {"loss": values}, None)
        if prof:
            prof.disable()
            print(f"\n--- cProfile: {-(-n // BATCH)} run.log calls of {BATCH} samples (tottime) ---")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
            prof = cProfile.Profile()
            prof.enable()
        run.end_epoch()
        if prof:
            prof.disable()
            print("--- cProfile: one end_epoch (cumtime) ---")
            pstats.Stats(prof).sort_stats("cumtime").print_stats(18)
    run.close()


# --- main ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="samples in the ledger (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=25, help="timed ticks for sections 1-2 (default 25)")
    parser.add_argument("--mem-ticks", type=int, default=60, help="ticks logged in the memory section (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sync", action="store_true",
                        help="os.sync() (untimed) before each timed end_epoch/np.save pair; flushes the whole machine")
    parser.add_argument("--profile", action="store_true", help="also cProfile one tick of log calls and one end_epoch")
    parser.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.n
    if args._memory_child:
        print(json.dumps(memory_child(n, args.mem_ticks, args._dir)))
        return 0

    import numcodecs
    import zarr

    started = time.perf_counter()
    print(f"lossledger writer benchmark: N = {n:,} samples, batches of {BATCH}, {args.repeat} timed ticks")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, zarr {zarr.__version__}, numcodecs "
          f"{numcodecs.__version__}, lossledger {ll.__version__}, {os.cpu_count()} CPUs ({sys.platform})")
    folder = tempfile.mkdtemp(prefix="lossledger-bench-")
    rows: list[tuple[str, str, str, str]] = []  # (measure, value, goal, verdict)
    rss_source = "RSS"
    try:
        root = Path(folder)
        rng = np.random.default_rng(args.seed)
        ledger = ll.create(root / "bench.ll", n_samples=n)

        # --- 1 + 2: end_epoch vs np.save, and run.log per call ------------------------------------------
        run = ledger.run("commit")
        log_ns: list[int] = []
        commit_s: list[float] = []
        save_s: list[float] = []
        first_commit = None
        for t in range(args.repeat + 1):  # tick 0 creates the stream's array: reported apart, not in the median
            values = losses(rng, n, "exponential")
            perm = rng.permutation(n)
            log_tick(run, perm, {"loss": values}, log_ns if t else None)
            path = root / f"save-{t}.npy"

            def commit() -> float:
                t0 = time.perf_counter()
                run.end_epoch()
                return time.perf_counter() - t0

            def save() -> float:
                t0 = time.perf_counter()
                np.save(path, values)
                return time.perf_counter() - t0

            if args.sync:
                os.sync()  # start each pair with no writeback in flight (as one tick per epoch would)
            if t == 0:
                first_commit = commit()
                save()
                continue
            if t % 2:
                c, s = commit(), save()
            else:
                s, c = save(), commit()
            commit_s.append(c)
            save_s.append(s)
        run.close()
        ratios = [c / s for c, s in zip(commit_s, save_s)]
        commit_ratio = median(commit_s) / median(save_s)
        min_ratio = min(commit_s) / min(save_s)

        # floor: the numpy scatter a log call cannot avoid (values + seen flag), same batches
        buf, seen = np.full(n, np.nan, np.float32), np.zeros(n, bool)
        perm = rng.permutation(n)
        floor_ns = []
        for lo in range(0, n, BATCH):
            ids = perm[lo : lo + BATCH]
            v = values[ids]
            t0 = time.perf_counter_ns()
            buf[ids] = v
            seen[ids] = True
            floor_ns.append(time.perf_counter_ns() - t0)

        # two streams in one call
        run2 = ledger.run("two-streams")
        log2_ns: list[int] = []
        for t in range(3):
            streams = {"loss": losses(rng, n, "exponential"), "margin": rng.standard_normal(n).astype(np.float32)}
            log_tick(run2, rng.permutation(n), streams, log2_ns if t else None)
            run2.end_epoch()
        run2.close()

        log_us = median(log_ns) / 1e3
        log2_us = median(log2_ns) / 1e3
        rows += [
            ("1. end_epoch, N samples logged (median)", f"{median(commit_s) * 1e3:.1f} ms", "", ""),
            ("   np.save of the same (N,) float32 (median)", f"{median(save_s) * 1e3:.1f} ms", "", ""),
            ("   ratio end_epoch / np.save", f"{commit_ratio:.2f}x", f"<= {GOAL_COMMIT_RATIO:.0f}x",
             "met" if commit_ratio <= GOAL_COMMIT_RATIO else "NOT met"),
            ("   per-tick ratio, min..max", f"{min(ratios):.2f}..{max(ratios):.2f}x", "", "info"),
            ("   ratio of the fastest end_epoch / fastest np.save", f"{min_ratio:.2f}x", f"<= {GOAL_COMMIT_RATIO:.0f}x",
             ("met" if min_ratio <= GOAL_COMMIT_RATIO else "NOT met") + ("" if (min_ratio <= GOAL_COMMIT_RATIO) ==
             (commit_ratio <= GOAL_COMMIT_RATIO) else " (medians disagree: busy machine, rerun)")),
            ("   first end_epoch (creates the array)", f"{first_commit * 1e3:.1f} ms", "", ""),
            ("2. run.log, 256 samples, 1 stream (median)", f"{log_us:.1f} us", f"<= {GOAL_LOG_US:.0f} us",
             "met" if log_us <= GOAL_LOG_US else "NOT met"),
            ("   p90 / per sample", f"{np.percentile(log_ns, 90) / 1e3:.1f} us / {log_us * 1e3 / BATCH:.0f} ns", "", ""),
            ("   run.log, 256 samples, 2 streams (median)", f"{log2_us:.1f} us", f"<= {GOAL_LOG_US:.0f} us",
             "met" if log2_us <= GOAL_LOG_US else "NOT met"),
            ("   numpy floor: buf[ids] = v; seen[ids] = True", f"{median(floor_ns) / 1e3:.1f} us",
             "", f"log = {log_us / (median(floor_ns) / 1e3):.0f}x floor"),
        ]

        # --- 4: bytes on disk per tick ---------------------------------------------------------------------
        raw = 4 * n
        disk = {"exponential": [tick_bytes(root / "bench.ll", "commit", "loss", t) for t in range(args.repeat + 1)]}
        run3 = ledger.run("lognormal")
        for _ in range(2):
            log_tick(run3, rng.permutation(n), {"loss": losses(rng, n, "lognormal")}, None)
            run3.end_epoch()
        run3.close()
        disk["lognormal"] = [tick_bytes(root / "bench.ll", "lognormal", "loss", t) for t in range(2)]
        npy = (root / "save-1.npy").stat().st_size
        for kind, sizes in disk.items():
            size = median([s for s, _ in sizes])
            alloc = median([b for _, b in sizes])
            label = "4." if kind == "exponential" else "  "
            rows.append((f"{label} bytes/tick, {kind} losses (files / allocated)", f"{mb(size)} / {mb(alloc)}",
                         "", f"{size / raw:.3f}x raw"))
        rows.append(("   raw float32 (4 N) / np.save file", f"{mb(raw)} / {mb(npy)}", "<= 1.00x raw (info)", ""))
        if args.profile:
            profile(ledger, rng, n)
        ledger.close()

        # --- 3: memory, in fresh child processes ------------------------------------------------------------
        mem_rows = []
        traced = {}
        for size in (n, max(1, n // 4)):
            res = run_memory_child(size, args.mem_ticks, folder)
            if res is None:
                mem_rows.append((f"3. memory at N = {size:,}", "child failed (see stderr)", "", ""))
                continue
            rss_source = res["rss_source"]
            peaks = res["peaks"]
            last = max(peaks)
            ref = 20 if 20 in peaks and last > 20 else min(peaks)
            mid = 20 if 20 in peaks else last
            slope = (peaks[last] - peaks[ref]) / max(1, last - ref) / size
            traced[size] = res["tm_peak"] / size
            head = (f"{'3.' if size == n else '  '} peak RSS growth, N = {size:,}, after "
                    + "/".join(map(str, peaks)) + " ticks", " / ".join(f"{v / 1e6:.1f}" for v in peaks.values()) + " MB")
            if size != n:  # N/4 only checks O(N); its slope is within the allocator's noise of a few 100 kB
                mem_rows += [(*head, "", ""), ("   traced peak per sample, N = {:,}".format(size),
                                               f"{traced[size]:.1f} B", "", "info")]
                continue
            mem_rows += [
                (*head, "", ""),
                (f"   peak RSS growth after {mid} / after {min(peaks)} ticks",
                 f"{peaks[mid] / max(1, peaks[min(peaks)]):.2f}x", "", "info"),
                (f"   growth from tick {ref} to {last}, per sample per tick", f"{slope:.3f} B",
                 f"<= {GOAL_MEM_SLOPE} B (keeping ticks: 4 B)", "met" if slope <= GOAL_MEM_SLOPE else "NOT met"),
                (f"   peak RSS growth per sample ({last} ticks)", f"{peaks[last] / size:.1f} B", "", "info"),
                (f"   traced peak per sample ({res['tm_ticks']} ticks, tracemalloc)",
                 f"{traced[size]:.1f} B", "few B (buffer: 5 B)", "info"),
                (f"   RSS retained after {last} ticks / traced retained",
                 f"{mb(res['retained'])} / {mb(res['tm_retained'])}", "", ""),
            ]
        if len(traced) == 2:
            big, small = traced[n], traced[max(1, n // 4)]
            factor = max(big, small) / min(big, small)
            mem_rows.append(("   O(N): traced B/sample at N vs N/4", f"{big:.1f} vs {small:.1f} B",
                             f"within {GOAL_MEM_ON_FACTOR}x", f"{factor:.2f}x: " +
                             ("met" if factor <= GOAL_MEM_ON_FACTOR else "NOT met")))
        idx = next(i for i, r in enumerate(rows) if r[0].startswith("4."))  # table order: 1, 2, 3, 4
        rows[idx:idx] = mem_rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print_table(rows)
    print(f"memory: {rss_source} sampled every 0.5 ms by a thread, growth over "
          f"the RSS before the first tick, in a fresh process; tracemalloc run separately")
    print(f"timings: median of {args.repeat} ticks (tick 0 excluded), end_epoch and np.save interleaved, "
          f"{'os.sync() before each pair' if args.sync else 'no os.sync()'}; "
          f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
