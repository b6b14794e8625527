"""The scripts in docs/examples run as documented and print numbers that the ledger they write agrees with."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lossledger as ll

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def test_autoencoder_logs_reconstruction_losses_and_prints_the_hardest(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = tmp_path / "ae.ll"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "autoencoder.py"), "--epochs", "4", "--top", "5", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f"ledger {out}: 1797 samples, 4 epochs" in text
    ledger = ll.open(out)
    assert ledger.ticks("autoencoder").num_rows == 4
    losses = ledger.trajectories("autoencoder", "loss")
    assert losses.shape == (1797, 4) and np.isfinite(losses).all() and (losses > 0).all()
    # The autoencoder learns: the mean reconstruction loss falls every epoch.
    assert np.all(np.diff(losses.mean(axis=0)) < 0)
    # The printed tables are the ledger's: 5 hardest then 5 easiest, with digit labels and actions.
    rows = [tuple(m.groups()) for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+(\d)\s+([\d.]+)$", text, re.MULTILINE)]
    assert len(rows) == 10
    action = losses.astype(np.float64).sum(axis=1)
    labels = ledger.samples["label"].to_numpy()
    ids = np.arange(action.size)
    assert [int(r[1]) for r in rows[:5]] == np.lexsort((ids, -action))[:5].tolist()
    assert [int(r[1]) for r in rows[5:]] == np.lexsort((ids, action))[:5].tolist()
    for rank, sample_id, digit, value in rows:
        assert int(digit) == labels[int(sample_id)]
        assert float(value) == pytest.approx(action[int(sample_id)], abs=1e-6)
    # Three loss-curve clusters that cover every sample.
    sizes = [int(s) for s in re.findall(r"cluster \d: (\d+) samples", text)]
    assert len(sizes) == 3 and sum(sizes) == 1797
