"""Distributed helpers of the PyTorch adapter: gather per-sample values of every rank to rank 0.

gloo's ``gather`` needs tensors of equal shape on every rank, so each rank pads to the longest and rank 0
strips the padding; ids that several ranks logged (``DistributedSampler`` repeats samples to even out the
ranks) are kept once, from the lowest rank. Streams that the ranks write themselves (``_torch_shards``) never
come here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#: One set of streams logged in the same calls: (ids, {stream: values}).
Group = tuple[Any, dict[str, Any]]


def gather_groups(groups: list[Group], group: Any, rank: int) -> list[Group]:
    """Gather every rank's values on rank 0 of ``group``, one stream at a time; there, drop ids a lower rank logged.

    A collective: every rank calls it. Returns the merged groups on rank 0, an empty list elsewhere.
    """
    mine = {name: (ids, values) for ids, streams in groups for name, values in streams.items()}
    layout = [(name, tuple(values.shape[1:]), int(ids.shape[0])) for name, (ids, values) in mine.items()]
    layouts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group)
    device = collective_device(group)
    merged: list[Group] = []
    for name, shape in dict.fromkeys((name, shape) for ranked in layouts for name, shape, _ in ranked):
        lengths = [next((n for s, sh, n in ranked if (s, sh) == (name, shape)), 0) for ranked in layouts]
        width = int(np.prod(shape, dtype=np.int64))
        ids, values = mine.get(name, (torch.empty(0, dtype=torch.int64), torch.empty((0, *shape))))
        flat = values.reshape(values.shape[0], width)
        all_ids = gather_padded(ids, max(lengths), device, first_rank(group), group, rank)
        all_values = gather_padded(flat, max(lengths), device, first_rank(group), group, rank)
        if all_ids is not None and all_values is not None:
            kept_ids, kept_values = first_rank_wins(all_ids, all_values, lengths)
            merged.append((kept_ids, {name: kept_values.reshape((-1, *shape))}))
    return merged


def gather_padded(
    t: torch.Tensor, length: int, device: torch.device, dst: int, group: Any, rank: int
) -> list[torch.Tensor] | None:
    """``dist.gather`` of tensors whose first dimension differs across ranks: pad to ``length``; rank 0 strips."""
    padded = torch.zeros((length, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))] if rank == 0 else None
    dist.gather(padded, out, dst=dst, group=group)
    return None if out is None else [o.cpu() for o in out]


def first_rank_wins(
    all_ids: list[torch.Tensor], all_values: list[torch.Tensor], lengths: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the ranks' values, keeping each id only from the lowest rank that logged it.

    Repeats within one rank are kept: they are the run's ``on_duplicate`` policy to apply, while repeats across
    ranks are the padding of ``DistributedSampler``.
    """
    kept_ids, kept_values = [], []
    seen = np.empty(0, dtype=np.int64)
    for ids_t, values_t, n in zip(all_ids, all_values, lengths, strict=True):
        ids, values = ids_t[:n].numpy(), values_t[:n].numpy()
        fresh = ~np.isin(ids, seen)
        kept_ids.append(ids[fresh])
        kept_values.append(values[fresh])
        seen = np.union1d(seen, ids)
    return np.concatenate(kept_ids), np.concatenate(kept_values)


def first_rank(group: Any) -> int:
    """The global rank of rank 0 of ``group`` (None: the default group)."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def broadcast_from_first(obj: Any, group: Any) -> Any:
    """``obj`` of rank 0 of ``group`` on every rank (a small picklable object; a collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=first_rank(group), group=group)
    return box[0]


def collective_device(group: Any) -> torch.device:
    """Where gathered tensors must live: the current CUDA device for NCCL, else the host (gloo, mpi)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
