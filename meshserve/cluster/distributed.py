"""Forming the torch.distributed world of the tensor-parallel ranks.

Node 0's launcher serves the rendezvous store on the cluster address (not on all interfaces,
as torch's own `tcp://` init would); every rank connects to it as a client and joins one world
(NCCL for CUDA tensors, gloo on CPU), plus a gloo group over the same ranks for host-side
collectives (the leader's per-step message broadcast). Then every named group of the layout is
formed (meshserve.cluster.groups), each with a device and a gloo CPU process group.
"""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshserve.cluster.comm import RankGroup
from meshserve.cluster.groups import ParallelGroups
from meshserve.cluster.layout import GROUP_KINDS, GroupLayout

logger = logging.getLogger("meshserve")


@dataclass
class RendezvousStore:
    """The master TCPStore and the listening socket it serves on (kept open with it)."""

    store: dist.TCPStore
    listener: socket.socket

    def close(self) -> None:
        self.listener.close()


def serve_rendezvous_store(host: str, port: int) -> RendezvousStore:
    """The master TCPStore, listening on host:port only. Keep the returned object alive while
    ranks may still connect."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    store = dist.TCPStore(host, port, is_master=True, master_listen_fd=listener.fileno(), wait_for_workers=False,
                          use_libuv=True)
    return RendezvousStore(store, listener)


def init_parallel_groups(*, layout: GroupLayout, rank: int, rendezvous: str | None, device: torch.device,
                         timeout_s: float) -> ParallelGroups:
    """Join the world of `layout.world_size` ranks as `rank` and form every named group.
    `rendezvous` is "host:port" of a running rendezvous store (IPv6 hosts in brackets); unused
    with a single rank."""
    if layout.world_size == 1:
        return ParallelGroups.single()
    assert rendezvous is not None
    host, _, port = rendezvous.rpartition(":")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    logger.info("joining the torch.distributed world at %s as rank %d/%d (%s)", rendezvous, rank,
                layout.world_size, backend)
    store = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, world_size=layout.world_size, rank=rank, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    world = tuple(range(layout.world_size))
    world_cpu = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    formed: dict[tuple[int, ...], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {world: (dist.group.WORLD, world_cpu)}
    mine: dict[str, RankGroup] = {}
    # new_group is collective over the whole world: every rank forms every group, in the same
    # order (GROUP_KINDS, then the layout's order), and keeps its own. Groups with the same ranks
    # share their process groups; single ranks need none.
    for kind in GROUP_KINDS:
        for ranks in layout.groups(kind):
            if len(ranks) > 1 and ranks not in formed:
                group = dist.new_group(list(ranks), timeout=timeout)
                cpu = group if backend == "gloo" else dist.new_group(list(ranks), backend="gloo", timeout=timeout)
                formed[ranks] = (group, cpu)
            if rank in ranks:
                group, cpu = formed.get(ranks, (None, None))
                mine[kind] = RankGroup(rank=ranks.index(rank), ranks=ranks, group=group, cpu_group=cpu)
    return ParallelGroups(layout=layout, rank=rank, **mine)
