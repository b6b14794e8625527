"""Progress of long scans: reported per slab to an installed reporter; the CLI's bar draws on a tty only."""

from __future__ import annotations

import io

import numpy as np

from lossledger._progress import reporting, terminal_bar


def test_scores_report_every_slab_of_the_scan(ledger, monkeypatch):
    monkeypatch.setattr("lossledger.format.CHUNK_TARGET_BYTES", 8)  # 2 samples per chunk: 5 blocks
    with ledger.run("r") as run:
        for t in range(3):
            run.log(np.arange(10), loss=np.arange(10.0) + t)
            run.end_epoch()
    monkeypatch.setattr("lossledger._scan.SCAN_BUDGET_BYTES", 48)
    seen: list[tuple[int, int]] = []
    with reporting(lambda done, total: seen.append((done, total))):
        ledger.scores("r")
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, seen[-1][1] + 1))
    seen.clear()
    ledger.scores("r", ticks=[0, 1])  # no reporter installed: nothing reported
    assert seen == []


def test_terminal_bar_draws_only_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert terminal_bar(io.StringIO()) is None
    out = Tty()
    bar = terminal_bar(out, min_seconds=0.0)
    for done in range(1, 5):
        bar(done, 4)
    text = out.getvalue()
    assert "reading [" in text and "3/4 slabs" in text and text.endswith("\r")
