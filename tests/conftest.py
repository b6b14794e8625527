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


def store_files(path) -> dict[str, bytes]:
    """Every file below ``path`` with its bytes (to check that a refused call wrote nothing)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
