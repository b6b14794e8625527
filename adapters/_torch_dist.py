"""Distributed helpers of the PyTorch adapter: gather per-sample values of every rank to rank 0.

gloo's ``gather`` needs tensors of equal shape on every rank, so each rank pads to the longest and rank 0
strips the padding; ids that several ranks logged (``DistributedSampler`` repeats samples to even out the
ranks) are kept once, from the lowest rank.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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


def collective_device(group: Any) -> torch.device:
    """Where gathered tensors must live: the current CUDA device for NCCL, else the host (gloo, mpi)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
