"""The paper's analyses over a ledger; every result is a ``pyarrow.Table`` or a small dataclass holding them.

- :func:`flag_noisy`: noisy-label candidates with a data-driven threshold.
- :func:`memorization_window`: the ticks to sum before the network memorizes wrong labels.
- :func:`auroc`, :func:`precision_at_k`, :func:`detection_table`: how well a score finds known positives.
- :func:`curriculum_chunks`, :func:`greedy_curriculum`: action-sorted class-balanced curricula (Fig 13).
- :func:`cluster_curves`: mini-batch k-means of loss curves (Fig 2).
- :func:`neighbours`: nearest neighbours of the hardest samples in a feature space (Fig 5).
- :func:`entropy_vs_action`, :func:`accuracy_vs_threshold`: ensemble uncertainty vs action (Fig 6b/6c/7).

See docs/analysis.md.
"""

from __future__ import annotations

from .clusters import Clusters, cluster_curves
from .curriculum import curriculum_chunks, greedy_curriculum
from .detection import auroc, detection_table, precision_at_k
from .neighbours import neighbours
from .noisy import NoisyLabels, flag_noisy
from .uncertainty import accuracy_vs_threshold, entropy_vs_action
from .window import Window, memorization_window

__all__ = [
    "Clusters",
    "NoisyLabels",
    "Window",
    "accuracy_vs_threshold",
    "auroc",
    "cluster_curves",
    "curriculum_chunks",
    "detection_table",
    "entropy_vs_action",
    "flag_noisy",
    "greedy_curriculum",
    "memorization_window",
    "neighbours",
    "precision_at_k",
]
