"""Turn what users pass (numpy, sequences, ``__array__``/DLPack tensors) into checked numpy arrays.

No framework is imported: torch tensors that require grad are detached through their own ``detach``
method, and device tensors are rejected with a message that says to move them to the host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidDTypeError, ShapeMismatchError


def to_numpy(obj: Any, what: str) -> np.ndarray:
    """``obj`` as a numpy array without copying when possible."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "requires_grad") and getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
        obj = obj.detach()
    if hasattr(obj, "__array__"):
        try:
            return np.asarray(obj)
        except (TypeError, RuntimeError) as err:
            if not hasattr(obj, "__dlpack__"):
                raise _unconvertible(what, obj, err) from err
    if hasattr(obj, "__dlpack__"):
        try:
            return np.from_dlpack(obj)
        except (TypeError, RuntimeError, BufferError) as err:
            raise _unconvertible(what, obj, err) from err
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as err:
        raise _unconvertible(what, obj, err) from err


def _unconvertible(what: str, obj: Any, err: Exception) -> InvalidDTypeError:
    return InvalidDTypeError(
        f"{what} of type {type(obj).__name__} cannot be read as a host array ({err}); pass a numpy array, "
        "a sequence, or a CPU tensor (for a GPU tensor call .cpu() first, or use an adapter from "
        "lossledger.adapters)"
    )


def as_ids(obj: Any) -> np.ndarray:
    """Sample ids as a 1-D int64 array."""
    ids = to_numpy(obj, "ids")
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1:
        raise ShapeMismatchError(f"ids must be 1-D, got shape {ids.shape}; pass one id per sample")
    if ids.dtype.kind not in "iu":
        if ids.size == 0:
            return ids.astype(np.int64)
        raise InvalidDTypeError(
            f"ids must be integers, got dtype {ids.dtype}; pass dataset indices or other int64 ids "
            "(cast with np.asarray(ids, dtype=np.int64) if they are integral floats)"
        )
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InvalidDTypeError("ids do not fit in int64; map them to int64 ids first")
    return ids.astype(np.int64, copy=False)


#: Float types of the ``ml_dtypes`` package (JAX's bfloat16 and float8 arrays): numpy sees them as kind "V".
_ML_FLOATS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                        "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu"})


def as_values(obj: Any, stream: str, n_ids: int) -> np.ndarray:
    """Per-sample values of one stream: shape (n_ids, *element_shape), real numbers."""
    values = to_numpy(obj, f"values of stream {stream!r}")
    if values.dtype.kind == "V" and values.dtype.name in _ML_FLOATS:  # ml_dtypes (jax): bfloat16, float8_*
        values = values.astype(np.float32)
    if values.dtype.kind not in "fiub":
        raise InvalidDTypeError(
            f"stream {stream!r} got values of dtype {values.dtype}; log real numbers (float, int or bool), "
            "for example per-sample losses computed with reduction='none'"
        )
    if values.ndim == 0 or values.shape[0] != n_ids:
        got = "a scalar" if values.ndim == 0 else f"{values.shape[0]} values (shape {values.shape})"
        raise ShapeMismatchError(
            f"stream {stream!r} got {got} for {n_ids} ids; log one value per sample (reduction='none'), "
            "in the same order as the ids"
        )
    return values


def tick_positions(ticks: Any, n_ticks: int) -> np.ndarray:
    """A tick selection (None = all, a slice, or indices; negative from the end) as (k,) int64 positions."""
    if ticks is None:
        return np.arange(n_ticks, dtype=np.int64)
    if isinstance(ticks, slice):
        return np.arange(n_ticks, dtype=np.int64)[ticks]
    index = as_ids(ticks)
    if index.size and (index.min() < -n_ticks or index.max() >= n_ticks):
        raise ShapeMismatchError(
            f"ticks {index.tolist()[:5]} out of range: the run has {n_ticks} committed tick(s) (0..{n_ticks - 1})"
        )
    return np.where(index < 0, index + n_ticks, index)
