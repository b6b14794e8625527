"""Format v2: names, layout keys, chunking and codecs of a ledger (the spec is ``docs/format.md``).

A ledger is a Zarr v3 group::

    zarr.json                      attrs {"format": "lossledger", "version": 2, "created": ISO-8601}
    samples/sample_id              (N,) int64, the user's ids, unique
    samples/label                  (N,) int32, optional; attrs {"classes": [...]}
    samples/split                  (N,) int8 codes, optional; attrs {"splits": [...]}
    runs/<run>/zarr.json           attrs {"lossledger": {commit record}, "attrs": {user attrs}}
    runs/<run>/ticks/{epoch,step,wall}   (T,) int64, int64, float64
    runs/<run>/streams/<name>      (T, N, *element_shape) float32 or float16, fill NaN
    runs/<run>/writer.lock         lock of the run's one writer (not a Zarr node): flock file, or S3 lease object
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

from .errors import InvalidNameError

FORMAT_NAME = "lossledger"
#: The version this library writes; it reads every version up to it.
FORMAT_VERSION = 2
#: The first version whose arrays end their codec pipeline with ``crc32c`` (v1: ``bytes`` + ``blosc`` only).
CHECKSUMS_SINCE = 2

OnDuplicate = Literal["error", "first", "last", "mean"]
ON_DUPLICATE: tuple[str, ...] = ("error", "first", "last", "mean")

STREAM_DTYPES: tuple[str, ...] = ("float32", "float16")

#: Uncompressed bytes aimed for in one chunk of a stream: large enough that a tick of a million
#: scalar samples is a handful of files, small enough that reading a few samples stays cheap.
CHUNK_TARGET_BYTES = 1 << 20
#: Ticks per chunk of the small ``ticks/`` arrays (rewritten whole by the run's single writer).
TICKS_CHUNK = 4096
#: The ``ticks/`` arrays are written every this many commits and when the writer closes; newer rows are held
#: in the commit record (``pending_ticks``), which saves a commit three small files.
TICKS_FLUSH = 64

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STREAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
#: Keyword names of ``Run.log`` and ``Ledger.run`` that cannot double as stream names.
RESERVED_STREAM_NAMES = frozenset({"ids"})


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a safe run name (a path component with no traversal), else raise."""
    if not isinstance(name, str) or not _RUN_NAME.match(name):
        raise InvalidNameError(
            f"run name {name!r} is not allowed: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (for example 'resnet18-seed0')"
        )
    return name


def check_stream_name(name: object) -> str:
    """Return ``name`` if it is a safe stream name (a Python identifier of at most 64 characters)."""
    if not isinstance(name, str) or not _STREAM_NAME.match(name) or name in RESERVED_STREAM_NAMES:
        raise InvalidNameError(
            f"stream name {name!r} is not allowed: use a Python identifier of at most 64 characters, "
            f"not one of {sorted(RESERVED_STREAM_NAMES)} (for example 'loss', 'loc', 'pixel')"
        )
    return name


def samples_per_chunk(n_samples: int, element_shape: tuple[int, ...], itemsize: int) -> int:
    """Samples in one chunk of a stream: about ``CHUNK_TARGET_BYTES`` uncompressed, at least 1."""
    element_bytes = itemsize * int(np.prod(element_shape, dtype=np.int64))
    return int(max(1, min(n_samples, CHUNK_TARGET_BYTES // max(1, element_bytes))))


def run_key(run: str) -> str:
    return f"runs/{run}"


def stream_key(run: str, stream: str) -> str:
    return f"runs/{run}/streams/{stream}"


def ticks_key(run: str, column: str) -> str:
    return f"runs/{run}/ticks/{column}"


TICK_COLUMNS: dict[str, tuple[str, float]] = {
    # column: (dtype, fill value)
    "epoch": ("int64", -1),
    "step": ("int64", -1),
    "wall": ("float64", float("nan")),
}
