"""How a MoE block gets each token to its experts when the experts are spread over expert-
parallel ranks (moe_ep), behind one interface: `run(x, weights, slots, experts)` returns this
rank's partial output for every token of x, to be summed over `reduce_group`. Tokens go to
physical expert slots (placement.py), spread over moe_ep in contiguous ranges of `num_local`.

Every rank of the block's tensor-parallel group holds the same tokens at the MoE layer (with DP
attention they are gathered across DP groups first). Two ways:

* `LocalExperts` (--moe-a2a-backend none): each rank runs its own experts on the tokens routed to
  them, among all tokens; the partial outputs are summed by one all-reduce over the whole
  tensor-parallel group (moe_ep × moe_tp). No token moves; every rank routes every token.
* `AllToAllDispatch` (--moe-a2a-backend deepep; meshserve's own dispatcher): the tokens are split
  over the moe_ep ranks; each rank sends each (token, expert) pair of its share to the rank
  holding the expert (all_to_all_single of the rows, expert ids and weights — gloo supports it on
  the CPU, NCCL on the GPU), runs the pairs it received, sends the results back (the reverse
  all-to-all), sums them per token, and the shares are all-gathered over moe_ep; the moe_tp
  partial sums are then summed over moe_tp. Each pair crosses the network twice instead of the
  whole hidden state being all-reduced. The split sizes are exchanged first (one small
  all-to-all) and read on the host, so this path is not captured in CUDA graphs.

DeepEP (deepseek-ai/DeepEP) is not driven yet: with `deepep` requested, start-up says whether it
is importable and that meshserve's dispatcher runs.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.distributed as dist

from meshserve.cluster.comm import RankGroup

logger = logging.getLogger("meshserve")

A2A_BACKENDS = ("none", "deepep")

# (x [N, H], weights [N, k], local slots [N, k] with -1 for other ranks' slots) -> [N, H]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertDispatch(ABC):
    reduce_group: RankGroup  # the group over which run()'s partial outputs are summed

    @abstractmethod
    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertsFn,
            first_slot: int, num_local: int) -> torch.Tensor:
        """x [T, H], weights/ids [T, top_k] (physical slots) -> [T, H] partial outputs."""


class LocalExperts(ExpertDispatch):
    def __init__(self, tp: RankGroup) -> None:
        self.reduce_group = tp

    def run(self, x, weights, ids, experts, first_slot, num_local):
        local = ids - first_slot
        return experts(x, weights, local.masked_fill((local < 0) | (local >= num_local), -1))


class AllToAllDispatch(ExpertDispatch):
    def __init__(self, ep: RankGroup, moe_tp: RankGroup) -> None:
        self.ep = ep
        self.reduce_group = moe_tp

    def _all_to_all(self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=self.ep.group)
        return out

    def run(self, x, weights, ids, experts, first_slot, num_local):
        tokens, top_k = ids.shape
        size = self.ep.size
        share = -(-tokens // size)  # this rank's tokens: [rank * share, (rank + 1) * share) ∩ [0, T)
        begin = min(tokens, self.ep.rank * share)
        end = min(tokens, begin + share)
        mine_ids, mine_weights = ids[begin:end].flatten(), weights[begin:end].flatten().float()
        owner = mine_ids // num_local  # slots are spread in contiguous ranges of num_local
        order = owner.argsort(stable=True)
        send = torch.bincount(owner, minlength=size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        pair_token = begin + order // top_k
        rows = self._all_to_all(x[pair_token], send_counts, recv_counts)
        got_ids = self._all_to_all(mine_ids[order] - owner[order] * num_local, send_counts, recv_counts)
        got_weights = self._all_to_all(mine_weights[order], send_counts, recv_counts)
        # Each received pair is one row with one expert: experts() with top_k = 1.
        done = experts(rows, got_weights[:, None], got_ids[:, None])
        back = self._all_to_all(done, recv_counts, send_counts)
        partial = torch.zeros((share, x.shape[1]), dtype=x.dtype, device=x.device)
        partial.index_add_(0, pair_token - begin, back)
        return self.ep.all_gather(partial, dim=0)[:tokens]


def make_dispatch(backend: str, *, tp: RankGroup, moe_ep: RankGroup, moe_tp: RankGroup) -> ExpertDispatch:
    if backend not in A2A_BACKENDS:
        raise ValueError(f"--moe-a2a-backend {backend!r} is not supported (supported: {', '.join(A2A_BACKENDS)})")
    if backend == "none" or moe_ep.size == 1:
        return LocalExperts(tp)
    return AllToAllDispatch(moe_ep, moe_tp)


def announce(backend: str, moe_ep: RankGroup) -> None:
    """The start-up line that says which dispatcher runs (once per process, by the model runner)."""
    if moe_ep.size == 1:
        return
    if backend == "none":
        logger.info("MoE: experts over %d expert-parallel ranks, tokens replicated, partial outputs all-reduced",
                    moe_ep.size)
        return
    found = importlib.util.find_spec("deep_ep") is not None
    logger.info("MoE: --moe-a2a-backend deepep: DeepEP is %s; meshserve's own all-to-all dispatcher runs "
                "(torch.distributed all_to_all_single over %d expert-parallel ranks)",
                "importable but not driven by meshserve yet" if found else "not importable", moe_ep.size)
