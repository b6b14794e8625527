"""The paper's analyses over a ledger; every result is a ``pyarrow.Table`` or a small dataclass holding one.

- :func:`flag_noisy`: noisy-label candidates with a data-driven threshold.
- :func:`memorization_window`: the ticks to sum before the network memorizes wrong labels.
- :func:`auroc`, :func:`precision_at_k`, :func:`detection_table`: how well a score finds known positives.
"""

from __future__ import annotations

from .detection import auroc, detection_table, precision_at_k
from .noisy import NoisyLabels, flag_noisy
from .window import Window, memorization_window

__all__ = [
    "NoisyLabels",
    "Window",
    "auroc",
    "detection_table",
    "flag_noisy",
    "memorization_window",
    "precision_at_k",
]
