"""lossledger: record every training sample's loss at every epoch, and ask which samples were hard.

>>> import lossledger as ll
>>> ledger = ll.create("runs/digits.ll", n_samples=1797, labels=y, classes=[str(c) for c in range(10)])
>>> with ledger.run("mlp-s0", model="mlp", seed=0) as run:
...     run.log(batch_ids, loss=per_sample_losses)
...     run.end_epoch()
"""

from __future__ import annotations

from . import analysis, dynamics, errors
from ._version import __version__
from .errors import LedgerError, LedgerWarning
from .ledger import Ledger, create, open
from .run import Run
from .shards import ShardWriter

__all__ = [
    "Ledger",
    "LedgerError",
    "LedgerWarning",
    "Run",
    "ShardWriter",
    "__version__",
    "analysis",
    "create",
    "dynamics",
    "errors",
    "open",
]
