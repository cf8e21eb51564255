"""Topology: which ranks exist, where they run, and which one this process is.

Global rank = node_rank * ranks_per_node + local_rank, ranks_per_node = tp / nnodes. Rank 0
(node 0, local rank 0) is the leader: the only rank that talks to the TokenizerManager.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.config.server_args import ServerArgs


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    tp_size: int
    nnodes: int
    node_rank: int
    base_gpu_id: int = 0

    def __post_init__(self) -> None:
        if self.tp_size % self.nnodes:
            raise TopologyError(f"--tp {self.tp_size} must be divisible by --nnodes {self.nnodes} "
                                "(every node runs the same number of ranks)")
        if not 0 <= self.node_rank < self.nnodes:
            raise TopologyError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")

    @classmethod
    def from_args(cls, args: ServerArgs) -> Topology:
        p = args.parallel
        return cls(tp_size=p.tp_size, nnodes=p.nnodes, node_rank=p.node_rank, base_gpu_id=p.base_gpu_id)

    @property
    def world_size(self) -> int:
        return self.tp_size

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def is_leader_node(self) -> bool:
        return self.node_rank == 0

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
