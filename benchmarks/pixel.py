"""Pixel-stream benchmark: storage, write throughput and memory of dense (H, W) loss streams, and a codec table.

Everything is measured side by side in one run and reported as ratios against baselines measured in the same
run; the goals are printed next to each number; the script always exits 0.

    python benchmarks/pixel.py                          # 500 samples x 256 x 512 pixels x 10 ticks (2.6 GB raw)
    python benchmarks/pixel.py --n 64 --ticks 4         # a quick look
    python benchmarks/pixel.py --write-only             # sections 1, 2 and 5 only (no memory children, no codecs)

Data: per-pixel cross-entropy-like losses of street-like scenes (sky, buildings, road, sidewalk, cars and
people, with the ego-vehicle band and a few blobs void, about 11% of the pixels NaN): the loss is
softplus(-margin) with margin = kappa_t * tanh(d / 6) + 1.5 eta + drift_t - 0.5, where d is the distance to the
nearest class boundary, eta a smooth per-sample field (bilinear upsampling of 1/32-resolution noise: regions
the model gets wrong), drift_t a smooth per-tick field (1/16) and kappa_t grows from 1 to 8 over the ticks;
float32, mean about 0.2. The maps are smooth but their low mantissa bits are noise, as real losses are.

Sections:

1. **Write**: each tick's (N, H, W) float32 losses are logged with ``run.log(ids, pixel=...)`` in batches of
   ``--batch`` and committed (``run.end_epoch()``), to a float16 run (``stream_dtypes={"pixel": "float16"}``)
   and to a float32 run; against ``np.save`` of the same float32 array to a new file in the same folder.
   The three are interleaved, order rotating per tick; throughput is raw float32 bytes per second, and the
   goal applies to the ratio of the median times (np.save / ledger >= 0.5). np.save is also timed ``--ticks``
   times back to back after the loop (on a VM its page-cache copy is fast only when pages were freed just
   before, as a commit that frees a big buffer does); the faster of the two medians is the baseline. Neither
   side fsyncs. Beside it: the ratio of the fastest of each, and of the process CPU seconds (all threads; less
   sensitive to other load on the machine, though the ledger's writer threads run in parallel, np.save in one
   thread). The ledger's time is also split: the ``run.log`` calls of a tick (where a float16 stream's values
   are cast, per batch, in real use while the GPU works) and ``end_epoch`` (encode and write the chunks), each
   against np.save.
   ``--fsync`` makes both sides durable (np.save's file, and the tick's chunk files and the commit record,
   fsynced inside the timing; ``os.sync()`` untimed before each write), where the compressed ledger writes
   fewer bytes to the disk.
2. **Storage**: the bytes of each run's stream chunk files against the raw float32 size (T x N x H x W x 4).
3. **Memory**: each pixel computation in a fresh child process (``pixel_summary`` over every sample,
   ``pixel_action`` of the 10 hardest, ``pixel_class_action`` with an (N, H, W) uint8 label memmap,
   ``pca_embedding`` of the maps), RSS sampled every 1 ms by a thread (psutil); the peak RSS of the whole
   process (interpreter and imports included) against 1 GB.
4. **Codecs**: the chunks of ``--codec-samples`` samples at every tick, encoded (one blosc thread) with lz4
   and zstd at two levels, without shuffle, byte shuffle and bitshuffle, as float32 and float16 (chunks of
   1 MiB, as the writer makes them): size against raw float32, encode and decode throughput (raw float32
   MB/s, median of ``--codec-repeat`` interleaved passes).
5. **Where the float16 write time goes**: CPU seconds (one thread) of each step of logging and committing a
   float16 tick (the inf and float16 range checks, the float32 -> float16 cast of each batch by pyarrow as
   ``run.log`` does it and by numpy for comparison, the copy into the float16 tick buffer, blosc encode, file
   writes), against ``np.save`` of the same values; measured on the codec samples and scaled to N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numcodecs
import numcodecs.blosc
import numpy as np
import zarr

import lossledger as ll
from lossledger import heatmaps, pixels
from lossledger.run import as_float16, check_finite

GOAL_STORAGE = 0.40  # stream bytes <= 40% of raw float32
GOAL_WRITE = 0.50  # ledger throughput >= 50% of np.save's
GOAL_RSS = 1 << 30  # peak RSS of a pixel computation <= 1 GB
CLASSES = ["unused", "sky", "building", "road", "sidewalk", "car", "person"]
VOID = 255


# --- data ---------------------------------------------------------------------------------------------------
def scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 label mask of a street-like scene; 255 = void (ego vehicle, a few blobs)."""
    y = np.zeros((h, w), np.uint8)
    horizon = int(h * rng.uniform(0.35, 0.5))
    y[:horizon] = 1
    edges = np.sort(rng.integers(0, w, 6))
    for a, b in zip(edges[::2], edges[1::2]):
        y[int(horizon * rng.uniform(0.1, 0.6)) : horizon, a:b] = 2
    y[horizon:] = 3
    y[horizon:, : int(w * rng.uniform(0.1, 0.25))] = 4
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.integers(horizon, h - 20), rng.integers(20, w - 20)
        bh, bw = rng.integers(10, 40), rng.integers(20, 80)
        y[max(0, cy - bh) : cy, max(0, cx - bw // 2) : cx + bw // 2] = 5
    for _ in range(rng.integers(1, 6)):
        cy, cx = rng.integers(horizon, h - 10), rng.integers(10, w - 10)
        y[((yy - cy) / 18.0) ** 2 + ((xx - cx) / 5.0) ** 2 <= 1] = 6
    y[int(h * 0.9) :] = VOID
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y[((yy - cy) / 12.0) ** 2 + ((xx - cx) / 20.0) ** 2 <= 1] = VOID
    return y


def smooth_noise(rng: np.random.Generator, b: int, h: int, w: int, scale: int) -> np.ndarray:
    """(b, h, w) float32 standard-normal noise at 1/scale resolution, bilinearly upsampled."""
    from scipy import ndimage

    low = rng.normal(0, 1, (b, h // scale + 1, w // scale + 1)).astype(np.float32)
    return ndimage.zoom(low, (1, scale, scale), order=1)[:, :h, :w]


class Scenes:
    """The fixed part of every sample: its label mask, boundary-distance term and hard-region field."""

    def __init__(self, rng: np.random.Generator, n: int, h: int, w: int) -> None:
        from scipy import ndimage

        self.h, self.w = h, w
        self.labels = np.empty((n, h, w), np.uint8)
        self.near = np.empty((n, h, w), np.float16)  # tanh(distance to a class boundary / 6)
        for i in range(n):
            y = scene(rng, h, w)
            lab = np.where(y == VOID, 0, y)
            boundary = ndimage.grey_dilation(lab, size=3) != ndimage.grey_erosion(lab, size=3)
            self.near[i] = np.tanh(ndimage.distance_transform_edt(~boundary) / 6.0)
            self.labels[i] = y
        self.eta = np.empty((n, h, w), np.float16)
        for lo in range(0, n, 64):
            self.eta[lo : lo + 64] = smooth_noise(rng, min(64, n - lo), h, w, 32)

    def tick(self, rng: np.random.Generator, t: int, ticks: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (N, H, W) float32 with the losses of tick ``t``."""
        kappa = 1.0 + 7.0 * t / max(1, ticks - 1)
        for lo in range(0, out.shape[0], 64):
            hi = min(out.shape[0], lo + 64)
            margin = kappa * self.near[lo:hi].astype(np.float32) + 1.5 * self.eta[lo:hi].astype(np.float32)
            margin += 0.5 * smooth_noise(rng, hi - lo, self.h, self.w, 16) - 0.5
            loss = np.logaddexp(np.float32(0.0), -margin)
            loss[self.labels[lo:hi] == VOID] = np.nan
            out[lo:hi] = loss
        return out


# --- helpers ------------------------------------------------------------------------------------------------
def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fsync_tick(run_dir: Path, tick: int) -> None:
    """fsync the chunk files of one tick of the pixel stream, then the run's commit record."""
    for path in [*sorted((run_dir / "streams" / "pixel" / "c" / str(tick)).rglob("*")), run_dir / "zarr.json"]:
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def rss_sampler(interval: float = 0.001):
    """Start a thread sampling this process's RSS; returns (stop() -> peak bytes, source name)."""
    try:
        import psutil

        proc = psutil.Process()
        read, source = (lambda: proc.memory_info().rss), f"psutil {psutil.__version__} RSS"
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        source = "/proc/self/statm RSS"
    peak = [read()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join()
        return max(peak[0], read())

    return stop, source, read


# --- section 3: memory, in a fresh child process ------------------------------------------------------------
def memory_child(path: str, run: str, op: str, labels: str) -> dict:
    stop, source, read = rss_sampler()
    base = read()
    ledger = ll.open(path)
    t0 = time.perf_counter()
    if op == "summary":
        result = pixels.pixel_summary(ledger, run)
        what = f"{result.num_rows} rows"
    elif op == "top10":
        ids = ledger.top(10, run, "pixel")["sample_id"].to_numpy()
        result = pixels.pixel_action(ledger, run, ids=ids)
        what = f"maps {result.action.shape}"
    elif op == "classes":
        result = pixels.pixel_class_action(ledger, run, labels=np.load(labels, mmap_mode="r"), ignore_index=VOID,
                                           classes=CLASSES)
        what = f"{result.num_rows} classes"
    elif op == "pca":
        result = heatmaps.pca_embedding(ledger, run, n_components=2)
        what = f"{result.num_rows} rows"
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - t0
    peak = stop()
    return {"op": op, "peak": peak, "base": base, "seconds": seconds, "what": what, "source": source}


def run_memory_child(path: Path, run: str, op: str, labels: Path) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", str(path), run, op, str(labels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"memory child {op} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- section 4: codecs --------------------------------------------------------------------------------------
CODECS = [(cname, level, shuffle) for cname, level in (("lz4", 1), ("lz4", 5), ("zstd", 1), ("zstd", 3))
          for shuffle in ("noshuffle", "shuffle", "bitshuffle")]


def codec_table(sample: np.ndarray, repeat: int) -> list[dict]:
    """sample (T, b, H, W) float32. One row per (dtype, codec): size / raw float32, encode/decode MB/s."""
    numcodecs.blosc.set_nthreads(1)
    raw = sample.nbytes
    rows = []
    configs = [(dtype, *c) for dtype in ("float32", "float16") for c in CODECS]
    chunks = {}
    for dtype in ("float32", "float16"):
        values = sample.astype(dtype)
        per = max(1, (1 << 20) // (values[0, 0].nbytes))
        chunks[dtype] = [np.ascontiguousarray(values[t, lo : lo + per]) for t in range(values.shape[0])
                         for lo in range(0, values.shape[1], per)]
    times: dict[tuple, dict[str, list[float]]] = {c: {"enc": [], "dec": []} for c in configs}
    sizes = {}
    for r in range(repeat):
        for config in configs[r % len(configs) :] + configs[: r % len(configs)]:  # rotate the order per pass
            dtype, cname, level, shuffle = config
            codec = numcodecs.Blosc(cname=cname, clevel=level, shuffle={"noshuffle": 0, "shuffle": 1,
                                                                        "bitshuffle": 2}[shuffle])
            t0 = time.perf_counter()
            encoded = [codec.encode(c) for c in chunks[dtype]]
            t1 = time.perf_counter()
            for e in encoded:
                codec.decode(e)
            t2 = time.perf_counter()
            times[config]["enc"].append(t1 - t0)
            times[config]["dec"].append(t2 - t1)
            sizes[config] = sum(len(e) for e in encoded)
    for config in configs:
        dtype, cname, level, shuffle = config
        rows.append({"dtype": dtype, "codec": f"{cname} {level} {shuffle}", "ratio": sizes[config] / raw,
                     "enc": raw / median(times[config]["enc"]) / 1e6, "dec": raw / median(times[config]["dec"]) / 1e6})
    numcodecs.blosc.set_nthreads(os.cpu_count() or 1)
    return rows


# --- section 5: where the float16 write time goes --------------------------------------------------------
def write_breakdown(sample: np.ndarray, n: int, batch: int, folder: Path, repeat: int) -> list[tuple[str, float]]:
    """CPU seconds per tick of ``n`` samples of each step of a float16 commit, one thread, scaled from ``sample``
    (b, H, W) float32: what ``run.log`` and ``end_epoch`` do, and ``np.save`` of the same values."""
    numcodecs.blosc.set_nthreads(1)
    b = sample.shape[0]
    per_chunk = max(1, (1 << 20) // (sample[0].size * 2))
    half = sample.astype(np.float16)
    buffer = np.full_like(half, np.nan)
    order = np.random.default_rng(0).permutation(b)  # the rows of a shuffled loader
    codec = numcodecs.Blosc(cname="lz4", clevel=1, shuffle=1)
    encoded = [codec.encode(half[lo : lo + per_chunk]) for lo in range(0, b, per_chunk)]
    out = folder / "breakdown"
    out.mkdir(exist_ok=True)

    def write_files() -> None:
        for i, data in enumerate(encoded):
            tmp = out / f"{i}.partial"
            tmp.write_bytes(data)
            os.replace(tmp, out / str(i))

    def batches(step):
        return lambda: [step(lo) for lo in range(0, b, batch)]

    steps = [
        ("run.log: inf and float16 range checks", batches(lambda lo: check_finite(
            "pixel", "float16", sample.shape[1:], sample[lo : lo + batch], allow_nonfinite=False))),
        ("run.log: float32 -> float16 cast (pyarrow)", batches(lambda lo: as_float16(sample[lo : lo + batch]))),
        ("  (the same cast by numpy, for comparison)", batches(lambda lo: sample[lo : lo + batch].astype(np.float16))),
        ("run.log: copy into the float16 tick buffer", batches(lambda lo: buffer.__setitem__(
            order[lo : lo + batch], half[lo : lo + batch]))),
        ("end_epoch: blosc lz4 1 shuffle encode", lambda: [codec.encode(half[lo : lo + per_chunk])
                                                           for lo in range(0, b, per_chunk)]),
        ("end_epoch: write the chunk files (temp + rename)", write_files),
        ("np.save of the float32 values", lambda: np.save(out / "x.npy", sample)),
    ]
    rows = []
    for name, step in steps:
        times = []
        for _ in range(repeat):
            c0 = time.process_time()
            step()
            times.append(time.process_time() - c0)
        rows.append((name, median(times) * n / b))
    shutil.rmtree(out, ignore_errors=True)
    numcodecs.blosc.set_nthreads(os.cpu_count() or 1)
    return rows


# --- main ---------------------------------------------------------------------------------------------------

def _timed_save(target: Path, data: np.ndarray, fsync: bool) -> tuple[float, float]:
    """Wall and CPU seconds of ``np.save(data)`` to ``target`` (with ``fsync``: after an untimed sync, and
    fsynced), then the file is removed."""
    if fsync:
        os.sync()
    c0, t0 = time.process_time(), time.perf_counter()
    with open(target, "wb") as f:
        np.save(f, data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    wall, used = time.perf_counter() - t0, time.process_time() - c0
    target.unlink()
    return wall, used

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="samples (default 500)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="samples per run.log call (default 8)")
    parser.add_argument("--codec-samples", type=int, default=16, help="samples per tick in the codec table")
    parser.add_argument("--codec-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsync", action="store_true",
                        help="durable writes: fsync np.save's file and the tick's chunk files and commit record "
                        "inside the timing (os.sync() untimed before each)")
    parser.add_argument("--write-only", action="store_true",
                        help="sections 1, 2 and 5 only: no memory children (3), no codec table (4)")
    parser.add_argument("--dir", default=None, help="folder for the ledger (default: a temp folder, removed)")
    parser.add_argument("--_memory-child", nargs=4, dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0

    n, h, w, ticks = args.n, args.height, args.width, args.ticks
    raw_tick = n * h * w * 4
    print(f"lossledger pixel benchmark: {n} samples x {h}x{w} pixels x {ticks} ticks "
          f"({raw_tick * ticks / 1e9:.2f} GB float32), batches of {args.batch}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, numcodecs "
          f"{numcodecs.__version__}, lossledger {ll.__version__}, {os.cpu_count()} CPUs ({sys.platform})")
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="ll-pixel-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        scenes = Scenes(rng, n, h, w)
        labels_path = folder / "labels.npy"
        np.save(labels_path, scenes.labels)
        ledger = ll.create(folder / "pixel.ll", n_samples=n, overwrite=True)
        runs = {"float16": ledger.run("f16", allow_nonfinite=True, stream_dtypes={"pixel": "float16"}),
                "float32": ledger.run("f32", allow_nonfinite=True)}
        data = np.empty((n, h, w), np.float32)
        codec_sample = np.empty((ticks, min(n, args.codec_samples), h, w), np.float32)
        ids = np.arange(n)
        timings: dict[str, list[float]] = {"float16": [], "float32": [], "np.save": []}
        cpu: dict[str, list[float]] = {"float16": [], "float32": [], "np.save": []}
        log_time: dict[str, list[float]] = {"float16": [], "float32": []}  # the run.log calls of a tick, s
        commit_time: dict[str, list[float]] = {"float16": [], "float32": []}  # its end_epoch, s
        log_cpu: dict[str, list[float]] = {"float16": [], "float32": []}
        commit_cpu: dict[str, list[float]] = {"float16": [], "float32": []}
        nan_fraction = []
        for t in range(ticks):
            scenes.tick(rng, t, ticks, data)
            codec_sample[t] = data[: codec_sample.shape[1]]
            nan_fraction.append(float(np.isnan(data).mean()))
            order = ["float16", "float32", "np.save"]
            order = order[t % 3 :] + order[: t % 3]
            for what in order:
                if what == "np.save":
                    wall, used = _timed_save(folder / f"tick{t}.npy", data, args.fsync)
                    timings[what].append(wall)
                    cpu[what].append(used)
                    continue
                run = runs[what]
                if args.fsync:
                    os.sync()
                c0, t0 = time.process_time(), time.perf_counter()
                for lo in range(0, n, args.batch):
                    run.log(ids[lo : lo + args.batch], pixel=data[lo : lo + args.batch])
                c1, t1 = time.process_time(), time.perf_counter()
                tick = run.end_epoch()
                if args.fsync:
                    fsync_tick(folder / "pixel.ll" / "runs" / run.name, tick)
                t2 = time.perf_counter()
                c2 = time.process_time()
                timings[what].append(t2 - t0)
                cpu[what].append(c2 - c0)
                log_time[what].append(t1 - t0)
                commit_time[what].append(t2 - t1)
                log_cpu[what].append(c1 - c0)
                commit_cpu[what].append(c2 - c1)
        for run in runs.values():
            run.close()
        # np.save's time depends on what ran before it (on a VM, pages freed just before make its page-cache
        # copy fast): the same saves back to back, nothing in between, as a second baseline.
        alone: dict[str, list[float]] = {"wall": [], "cpu": []}
        for t in range(ticks):
            wall, used = _timed_save(folder / "alone.npy", data, args.fsync)
            alone["wall"].append(wall)
            alone["cpu"].append(used)
        del data
        stream_bytes = {dtype: folder_bytes(folder / "pixel.ll" / "runs" / r / "streams" / "pixel")
                        for dtype, r in (("float16", "f16"), ("float32", "f32"))}

        memory: dict[str, dict | None] = {}
        codecs: list[dict] = []
        if not args.write_only:
            for op in ("summary", "top10", "classes", "pca"):
                memory[op] = run_memory_child(folder / "pixel.ll", "f16", op, labels_path)
            memory["summary f32"] = run_memory_child(folder / "pixel.ll", "f32", "summary", labels_path)
            codecs = codec_table(codec_sample, args.codec_repeat)
        breakdown = write_breakdown(codec_sample[-1], n, args.batch, folder, 5)

        # --- report -----------------------------------------------------------------------------------------
        rows: list[tuple[str, str, str, str]] = []
        interleaved, back_to_back = median(timings["np.save"]), median(alone["wall"])
        save = min(interleaved, back_to_back)  # the faster baseline: ratios below are against it
        rows.append(("1. np.save of a tick (N, H, W) float32 (median)",
                     f"{interleaved * 1e3:.0f} ms  {raw_tick / interleaved / 1e6:.0f} MB/s", "", "interleaved"))
        alone_text = (f"{back_to_back * 1e3:.0f} ms  {raw_tick / back_to_back / 1e6:.0f} MB/s; "
                      f"CPU {median(alone['cpu']):.2f} s")
        rows.append(("   np.save of a tick, back to back (median)", alone_text, "",
                     f"baseline: {'this' if save == back_to_back else 'above'}"))
        for dtype in ("float16", "float32"):
            t_ledger = median(timings[dtype])
            ratio = save / t_ledger
            rows.append((f"   ledger {dtype}: log + end_epoch (median)",
                         f"{t_ledger * 1e3:.0f} ms  {raw_tick / t_ledger / 1e6:.0f} MB/s", f">= {GOAL_WRITE:.0%} of np.save",
                         f"{ratio:.0%}: {'met' if ratio >= GOAL_WRITE else 'NOT met'}"))
            fastest = min(timings["np.save"] + alone["wall"]) / min(timings[dtype])
            save_cpu = median(cpu["np.save"]) if save == interleaved else median(alone["cpu"])
            cpu_ratio = save_cpu / median(cpu[dtype])
            cpu_text = f"{save_cpu:.2f} / {median(cpu[dtype]):.2f} s = {cpu_ratio:.0%}"
            rows.append((f"   {dtype}: fastest / fastest; CPU s np.save / ledger", f"{fastest:.0%}; {cpu_text}", "",
                         "info"))
            batches = -(-n // args.batch)
            for part, wall, cpu_s in (("run.log calls", log_time, log_cpu), ("end_epoch", commit_time, commit_cpu)):
                t_part = median(wall[dtype])
                per_batch = f" ({t_part / batches * 1e6:.0f} us a batch)" if part == "run.log calls" else ""
                rows.append((f"   {dtype}: {part} of a tick (median){per_batch}",
                             f"{t_part * 1e3:.0f} ms = {t_part / save:.2f}x np.save; CPU {median(cpu_s[dtype]):.2f} s",
                             "", "info"))
        rows.append(("2. raw float32 (T x N x H x W x 4)", f"{raw_tick * ticks / 1e6:.0f} MB", "", ""))
        for dtype in ("float16", "float32"):
            ratio = stream_bytes[dtype] / (raw_tick * ticks)
            rows.append((f"   ledger {dtype} stream, lz4 1 shuffle", f"{stream_bytes[dtype] / 1e6:.0f} MB",
                         f"<= {GOAL_STORAGE:.0%} of raw", f"{ratio:.1%}: {'met' if ratio <= GOAL_STORAGE else 'NOT met'}"))
        for op, res in memory.items():
            if res is None:
                rows.append((f"3. {op}", "failed", "", ""))
                continue
            rows.append((f"3. peak RSS: {op} ({res['what']})", f"{res['peak'] / 1e6:.0f} MB in {res['seconds']:.1f} s",
                         "<= 1 GB", f"{'met' if res['peak'] <= GOAL_RSS else 'NOT met'} (start {res['base'] / 1e6:.0f} MB)"))
        width = max(len(r[0]) for r in rows) + 2
        print()
        print(f"{'measure':<{width}}{'value':<40}{'goal':<22}verdict")
        print("-" * (width + 80))
        for measure, value, goal, verdict in rows:
            print(f"{measure:<{width}}{value:<40}{goal:<22}{verdict}")
        print("-" * (width + 80))
        sync = "fsync of every file written, os.sync() before each" if args.fsync else "no fsync"
        print(f"data: {n} street-like scenes, {np.mean(nan_fraction):.1%} void (NaN) pixels; timings: median of "
              f"{ticks} ticks, ledger f16 / f32 / np.save interleaved, {sync}; memory: "
              f"{next((r['source'] + ' sampled every 1 ms in a fresh process' for r in memory.values() if r), 'not measured')}")
        if codecs:
            print_codecs(codecs, codec_sample, ticks, args.codec_repeat)
        print(f"\n5. where a float16 tick's write time goes: CPU s per tick of {n} samples, one thread "
              f"(median of 5, scaled from {codec_sample.shape[1]} samples of the last tick)")
        for name, seconds in breakdown:
            print(f"   {name:<50}{seconds:6.3f} s")
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def print_codecs(codecs: list[dict], codec_sample: np.ndarray, ticks: int, repeat: int) -> None:
    print()
    print(f"4. codecs on {codec_sample.shape[1]} samples x {ticks} ticks ({codec_sample.nbytes / 1e6:.0f} MB "
          f"float32), 1 MiB chunks, one blosc thread, median of {repeat} passes")
    print(f"{'dtype':<9}{'codec':<22}{'size / raw f32':>15}{'encode MB/s':>13}{'decode MB/s':>13}  storage goal")
    for row in codecs:
        verdict = "met" if row["ratio"] <= GOAL_STORAGE else "-"
        print(f"{row['dtype']:<9}{row['codec']:<22}{row['ratio']:>15.1%}{row['enc']:>13.0f}{row['dec']:>13.0f}  "
              f"{verdict}")


if __name__ == "__main__":
    sys.exit(main())
