"""JAX adapter: per-sample losses out of a jitted train step, copied to the host without blocking.

A jitted step returns its per-sample losses next to the mean it differentiates (``has_aux``)::

    loss_fn = per_sample_loss(lambda params, x, y: cross_entropy(apply(params, x), y))   # -> (mean, (B,))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(params, x, y):
        (mean, losses), grads = grad_fn(params, x, y)
        return update(params, grads), losses

    rec = Recorder(run)
    for ids, x, y in batches:
        params, losses = step(params, x, y)
        rec.log(ids, loss=losses)     # starts the device->host copy; returns at once
    rec.end_epoch()                   # waits for the copies, logs them, commits the tick

:meth:`Recorder.log` never waits for the step to finish: it starts ``copy_to_host_async`` and queues the
arrays; queued entries are handed to :meth:`lossledger.Run.log` once they are ready (checked without blocking
at each ``log``), when more than ``max_pending`` are queued (the oldest is then waited for: by then its step
finished long ago), or at :meth:`Recorder.end_epoch`. Values are therefore checked (NaN, duplicate ids) by the
run when an entry is drained, not inside the ``log`` call that queued it.

Sharded arrays (``jax.jit`` with a ``NamedSharding``, ``jax.pmap`` outputs of shape (devices, B/devices))
are read whole on a single host. On several hosts only the process that owns the run logs, and it can read
only its own devices: return the per-sample values and ids replicated from the step
(``out_shardings=NamedSharding(mesh, P())``, an all-gather inside the compiled step) and log them on process 0,
which then reads one replica; see docs/adapters/jax.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lossledger.errors import InvalidDTypeError, ShapeMismatchError

if TYPE_CHECKING:
    from lossledger.run import Run

__all__ = ["Recorder", "per_sample_loss", "value_and_grad"]


def per_sample_loss(
    fn: Callable[..., jax.Array], *, reduce: Callable[[jax.Array], jax.Array] = jnp.mean
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Turn ``fn(params, *batch) -> (B,) losses`` into ``fn(...) -> (reduce(losses), losses)``.

    The result is what ``jax.value_and_grad(..., has_aux=True)`` and ``jax.grad(..., has_aux=True)`` expect:
    the scalar is differentiated, the per-sample losses ride along as auxiliary output (no extra forward
    pass). ``reduce`` defaults to the mean; for padded fixed-size batches pass a masked mean instead (the
    mask is then part of ``batch``, see :func:`value_and_grad`).
    """

    def wrapped(*args: Any, **kwargs: Any) -> tuple[jax.Array, jax.Array]:
        losses = fn(*args, **kwargs)
        return reduce(losses), losses

    return wrapped


def value_and_grad(
    fn: Callable[..., jax.Array],
    *,
    reduce: Callable[[jax.Array], jax.Array] = jnp.mean,
    argnums: int | tuple[int, ...] = 0,
) -> Callable[..., tuple[tuple[jax.Array, jax.Array], Any]]:
    """``jax.value_and_grad`` of the reduced loss of ``fn``, keeping the per-sample losses.

    ``fn(params, *batch)`` returns (B,) per-sample losses; the returned function gives
    ``((reduce(losses), losses), grads)``. Use inside ``jax.jit``.
    """
    return jax.value_and_grad(per_sample_loss(fn, reduce=reduce), argnums=argnums, has_aux=True)


class Recorder:
    """Logs device arrays into ``run`` without a host sync per step.

    ``max_pending``: queued steps before ``log`` waits for the oldest one (bounds host memory to that many
    batches of values). Host memory: the queued host copies, ``max_pending`` batches at most.
    """

    def __init__(self, run: Run, *, max_pending: int = 16) -> None:
        if max_pending < 1:
            raise ShapeMismatchError(f"max_pending must be at least 1, got {max_pending}")
        self.run = run
        self.max_pending = max_pending
        self._queue: deque[tuple[Any, Any, dict[str, Any]]] = deque()

    @property
    def pending(self) -> int:
        """Number of ``log`` calls queued and not yet handed to the run."""
        return len(self._queue)

    def log(self, ids: Any, /, *, valid: Any = None, **streams: Any) -> None:
        """Queue per-sample values of the current tick; returns without waiting for the device.

        ``ids``: sample ids of shape S (e.g. (B,), or (devices, B/devices) from ``pmap``), a numpy or jax
        array. Each stream: shape S + element_shape, any float dtype (bfloat16 is stored as float32).
        ``valid``: optional bool array of shape S; rows where it is False (padding of a fixed-size batch)
        are dropped and never stored. Shapes are checked here; values when the entry is drained.
        """
        if not streams:
            raise ShapeMismatchError("log() got ids but no stream; pass values as keywords, e.g. rec.log(ids, loss=l)")
        batch_shape = tuple(np.shape(ids))
        for name, values in streams.items():
            if tuple(np.shape(values))[: len(batch_shape)] != batch_shape:
                raise ShapeMismatchError(
                    f"stream {name!r} has shape {tuple(np.shape(values))} but ids have shape {batch_shape}; log one "
                    "value per id (reduction='none'), with the ids shaped like the batch"
                )
        if valid is not None and tuple(np.shape(valid)) != batch_shape:
            raise ShapeMismatchError(
                f"valid has shape {tuple(np.shape(valid))} but ids have shape {batch_shape}; pass one flag per id"
            )
        self._queue.append((_start_copy(ids), None if valid is None else _start_copy(valid),
                            {name: _start_copy(v) for name, v in streams.items()}))
        self._drain(block=False)

    def flush(self) -> None:
        """Wait for every queued copy and hand it to the run (blocks until the queued steps finished)."""
        self._drain(block=True)

    def end_epoch(self, *, epoch: int | None = None, step: int | None = None) -> int:
        """:meth:`flush`, then commit the tick with :meth:`lossledger.Run.end_epoch`; returns its index.

        ``step`` defaults to the previous step + the number of ``log`` calls of the tick.
        """
        self.flush()
        return self.run.end_epoch(epoch=epoch, step=step)

    def _drain(self, *, block: bool) -> None:
        queue = self._queue
        while queue:
            ids, valid, streams = queue[0]
            if not block and len(queue) <= self.max_pending and not _ready(ids, valid, *streams.values()):
                return
            queue.popleft()
            self._log_now(ids, valid, streams)

    def _log_now(self, ids: Any, valid: Any, streams: dict[str, Any]) -> None:
        host_ids = np.asarray(ids)
        batch_ndim = host_ids.ndim
        host_ids = host_ids.reshape(-1)
        values = {}
        for name, v in streams.items():
            host = np.asarray(v)
            if host.dtype.kind not in "fiub":  # bfloat16 and other ml_dtypes floats
                host = host.astype(np.float32)
            values[name] = host.reshape(host_ids.shape + host.shape[batch_ndim:])
        if valid is not None:
            keep = np.asarray(valid).reshape(-1).astype(bool)
            host_ids = host_ids[keep]
            values = {name: v[keep] for name, v in values.items()}
        self.run.log(host_ids, **values)


def _start_copy(x: Any) -> Any:
    """Start the device-to-host copy of a jax array; other inputs pass through."""
    if not isinstance(x, jax.Array):
        return x
    if x.sharding.is_fully_replicated:
        x = x.addressable_data(0)  # one replica: every process holds the whole array
    elif not x.is_fully_addressable:
        raise InvalidDTypeError(
            f"a sharded array of shape {x.shape} spans devices of other processes, so this process cannot read "
            "it; return it replicated from the step (out_shardings=NamedSharding(mesh, PartitionSpec())) or "
            "gather it with jax.experimental.multihost_utils.process_allgather before logging"
        )
    x.copy_to_host_async()
    return x


def _ready(*arrays: Any) -> bool:
    return all(not isinstance(a, jax.Array) or a.is_ready() for a in arrays)  # type: ignore[attr-defined]
