"""The thread pools of this process, one per job (writing chunks, reading chunks, folding score tiles)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # name: (pid that made it, pool)
_lock = threading.Lock()


def thread_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The pool ``name`` of this process, made with ``workers`` threads on first use. A forked child makes its
    own: the parent's threads are not in it."""
    with _lock:
        made = _pools.get(name)
        if made is None or made[0] != os.getpid():
            made = _pools[name] = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix=f"lossledger-{name}"))
        return made[1]
