from __future__ import annotations

import numpy as np
import pytest

import lossledger as ll


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
