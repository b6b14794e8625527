"""Helpers shared by the benchmark scripts: medians, RSS readings, heap trimming, the results table."""

from __future__ import annotations

import ctypes
import os
import statistics
from collections.abc import Callable, Sequence


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def rss_reader() -> tuple[Callable[[], int], str]:
    """A function returning this process's RSS in bytes (psutil, or /proc/self/statm without it), and its name."""
    try:
        import psutil

        proc = psutil.Process()
        return (lambda: proc.memory_info().rss), f"psutil {psutil.__version__} RSS"
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read, "/proc/self/statm RSS"


def trim_heap() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print (measure, value, goal, verdict) rows as an aligned table under a header."""
    header = ("measure", "value", "goal", "ratio / verdict")
    width = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in width)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, width)))
    print(line)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
    print(line)
