"""Reduce statistics states across processes with torch.distributed."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .stats import StatsState


def all_reduce_state(state: StatsState, group=None) -> StatsState:
    """Merge the states of every rank (Chan's merge in rank order); every rank gets the result.

    All ranks must hold states of the same shape (personas, channels, histogram bins). The
    gather goes through the state's device, so gloo (CPU) and NCCL (CUDA) both work.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
    world = dist.get_world_size(group)
    shape = torch.tensor([state.num_personas, state.num_channels, 0 if state.hist is None else state.hist.shape[-1]],
                         dtype=torch.int64, device=state.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"ranks hold statistics of different shapes (personas, channels, bins): {[s.tolist() for s in shapes]}")
    gathered = [dict() for _ in range(world)]
    for name, t in state.tensors().items():
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        for r in range(world):
            gathered[r][name] = parts[r]
    out = StatsState.from_tensors(gathered[0]).clone()
    for r in range(1, world):
        out.merge_(StatsState.from_tensors(gathered[r]))
    return out
