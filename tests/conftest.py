from __future__ import annotations

import os

import numpy as np
import pytest

import lossledger as ll

# Test the installed package: a checkout's lossledger/ folder lacks lossledger.adapters (installed from adapters/
# by setuptools), so child processes (python -c, python -m lossledger) must not put the working folder first on
# sys.path. The README runs pytest through its console script for the same reason.
os.environ["PYTHONSAFEPATH"] = "1"


@pytest.fixture
def ledger(tmp_path):
    """A fresh 10-sample ledger with labels in 3 classes, open for writing."""
    led = ll.create(tmp_path / "t.ll", n_samples=10, labels=np.arange(10) % 3, classes=["a", "b", "c"])
    yield led
    led.close()


@pytest.fixture
def store_files():
    """A function: every file below a path with its bytes (to check that a refused call wrote nothing)."""

    def snapshot(path) -> dict[str, bytes]:
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    return snapshot
