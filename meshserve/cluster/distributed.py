"""Forming the torch.distributed world of the tensor-parallel ranks.

One world through `tcp://<rendezvous>` (NCCL for CUDA tensors, gloo on CPU), plus a gloo group
over the same ranks for host-side collectives (the leader's per-step message broadcast).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from meshserve.cluster.comm import SINGLE, TensorParallelGroup

logger = logging.getLogger("meshserve")


def init_tp_group(*, world_size: int, rank: int, rendezvous: str | None, device: torch.device,
                  timeout_s: float) -> TensorParallelGroup:
    """`rendezvous` is "host:port" (IPv6 hosts in brackets); unused when world_size == 1."""
    if world_size == 1:
        return SINGLE
    assert rendezvous is not None
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    logger.info("joining the torch.distributed world at tcp://%s as rank %d/%d (%s)", rendezvous, rank,
                world_size, backend)
    dist.init_process_group(backend=backend, init_method=f"tcp://{rendezvous}", world_size=world_size,
                            rank=rank, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TensorParallelGroup(rank=rank, size=world_size, group=group, cpu_group=cpu_group)
