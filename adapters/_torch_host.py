"""Host copies of the tensors the PyTorch Recorder logs: entries, non-blocking copies into pinned memory, merging.

Nothing here waits for the device: an accelerator tensor is copied with ``non_blocking=True`` and an event is
recorded after the copies; whoever needs the values waits on that event (once per epoch, or when it has fired).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lossledger.errors import InvalidDTypeError


@dataclass
class Entry:
    """One ``log`` call: host tensors, possibly still being filled by an asynchronous device copy."""

    ids: torch.Tensor  # (B,) int64 on the host
    streams: dict[str, torch.Tensor]  # name -> (B, *element_shape) float32 on the host
    event: Any = None  # torch.Event recorded after the copies were queued; None when already on the host

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


def as_tensor(obj: Any, what: str) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    try:
        return torch.as_tensor(np.asarray(obj))
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidDTypeError(f"{what} of type {type(obj).__name__} is not a tensor or array ({err})") from err


def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """The tensors on the host: accelerator tensors by non_blocking copies into pinned memory, plus an event.

    Returns the host tensors (those already on the host as they are) and the event to wait on (or None).
    """
    host, event_device = [], None
    for t in tensors:
        if t.is_cpu:
            host.append(t)
            continue
        try:
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:  # an accelerator without pinned host memory: a plain (blocking) copy
            host.append(t.to("cpu"))
            continue
        buffer.copy_(t, non_blocking=True)
        host.append(buffer)
        event_device = t.device
    if event_device is None:
        return host, None
    event = torch.Event(device=event_device)
    event.record(torch.accelerator.current_stream(event_device))
    return host, event


def concat(entries: Sequence[Entry]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The entries as few (ids, streams) groups, each stream's values in logging order.

    Streams logged in exactly the same calls share one group (and one ids array); a stream's values are never
    split across groups, so the run's ``on_duplicate="first"/"last"`` sees them in the order they were logged.
    """
    calls: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        for name in entry.streams:
            calls.setdefault(name, []).append(i)
    by_calls: dict[tuple[int, ...], list[str]] = {}
    for name, indices in calls.items():
        by_calls.setdefault(tuple(indices), []).append(name)
    out = []
    for where, names in by_calls.items():
        if len(where) == 1:
            only = entries[where[0]]
            out.append((only.ids, {name: only.streams[name] for name in names}))
            continue
        ids = torch.cat([entries[i].ids for i in where])
        out.append((ids, {name: torch.cat([entries[i].streams[name] for i in where]) for name in names}))
    return out
