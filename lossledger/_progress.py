"""Progress of long scans. The library prints nothing; the command line shows a bar on a terminal.

:func:`scan` reports each slab it yields to the reporter installed with :func:`reporting` (none by default),
so a caller sees progress through every scan of a call (several streams, dt modes or runs) without
threading a callback through the API.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

#: (slabs done, slabs in this scan) -> None
Reporter = Callable[[int, int], None]

_reporter: ContextVar[Reporter | None] = ContextVar("lossledger_progress", default=None)


def report(done: int, total: int) -> None:
    """Tell the installed reporter (if any) that ``done`` of ``total`` slabs of the current scan are read."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(done, total)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install ``reporter`` for the scans run inside the ``with`` block (``None``: no reporting)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def terminal_bar(stream: TextIO | None = None, label: str = "reading", min_seconds: float = 0.5) -> Reporter | None:
    """A one-line bar on ``stream`` (default stderr), or None when it is not a terminal. Scans shorter than
    ``min_seconds`` draw nothing; the line is cleared when a scan ends."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        return None
    state = {"start": 0.0, "drawn": False}

    def draw(done: int, total: int) -> None:
        now = time.monotonic()
        if done <= 1:
            state["start"], state["drawn"] = now, False
        if done < total and now - state["start"] >= min_seconds:
            filled = int(30 * done / max(total, 1))
            out.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} slabs {now - state['start']:.0f}s")
            out.flush()
            state["drawn"] = True
        elif done >= total and state["drawn"]:
            out.write("\r" + " " * 72 + "\r")
            out.flush()

    return draw
