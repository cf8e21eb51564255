"""Topology: which ranks exist, where they run, and which one this process is.

World size comes from the group layout (tp, or tp × dp for plain data parallelism);
global rank = node_rank * ranks_per_node + local_rank, ranks_per_node = world / nnodes. The
first rank of each DP group (meshserve.cluster.layout) leads it: only the leaders talk to the
main process (from nodes r > 0 through meshserve.cluster.scheduler_link).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.cluster.layout import GroupLayout
from meshserve.config.server_args import ServerArgs


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    layout: GroupLayout
    nnodes: int
    node_rank: int
    base_gpu_id: int = 0

    def __post_init__(self) -> None:
        if self.world_size % self.nnodes:
            raise TopologyError(f"{self.world_size} ranks (--tp × --dp-size without --enable-dp-attention, else --tp) "
                                f"must be divisible by --nnodes {self.nnodes} (every node runs the same number of ranks)")
        if not 0 <= self.node_rank < self.nnodes:
            raise TopologyError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")

    @classmethod
    def from_args(cls, args: ServerArgs) -> Topology:
        p = args.parallel
        return cls(layout=layout_from_args(args), nnodes=p.nnodes, node_rank=p.node_rank, base_gpu_id=p.base_gpu_id)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def is_leader_node(self) -> bool:
        return self.node_rank == 0

    @property
    def local_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.ranks_per_node:
            raise TopologyError(f"local rank {local_rank} out of range 0..{self.ranks_per_node - 1}")
        return self.node_rank * self.ranks_per_node + local_rank

    def gpu_id(self, local_rank: int) -> int:
        """CUDA device index (within CUDA_VISIBLE_DEVICES) of a local rank."""
        return self.base_gpu_id + local_rank

    def check_devices(self, device: str, visible_gpus: int) -> None:
        if device == "cuda" and self.base_gpu_id + self.ranks_per_node > visible_gpus:
            raise TopologyError(
                f"node {self.node_rank} needs {self.ranks_per_node} GPUs from --base-gpu-id {self.base_gpu_id}, "
                f"but {visible_gpus} are visible (CUDA_VISIBLE_DEVICES respected)")


def layout_from_args(args: ServerArgs) -> GroupLayout:
    p = args.parallel
    return GroupLayout(tp=p.tp_size, dp=p.dp_size, ep=p.ep_size, dp_attention=p.enable_dp_attention)
