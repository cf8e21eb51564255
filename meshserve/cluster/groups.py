"""ParallelGroups: this rank's named process groups, passed explicitly to the model runner, the
model and the scheduler (no global parallel state).

* world   — every rank; the cluster-wide collectives.
* tp      — this rank's replica: all the ranks that hold one copy of the weights (the world
            under DP attention; one of --dp-size replicas otherwise). Dense MLPs split over it.
* attn_tp — the ranks that run attention tensor-parallel over the same batch: one DP group,
            driven by one scheduler whose leader is the group's first rank. Equal to tp unless
            --enable-dp-attention.
* moe_ep  — the ranks that share the experts of a MoE layer (--ep).
* moe_tp  — the ranks that split each expert tensor-parallel (tp / ep).
* dp      — the ranks holding the same attention-TP position in every DP group; the per-step
            exchanges between DP groups (token counts, gathered hidden states) run over it.

The layout (which global ranks form each group) is meshserve.cluster.layout.GroupLayout.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.cluster.comm import SINGLE, RankGroup
from meshserve.cluster.layout import GroupLayout, KVHeadShare


@dataclass(frozen=True)
class ParallelGroups:
    layout: GroupLayout
    rank: int  # global rank
    world: RankGroup
    tp: RankGroup
    attn_tp: RankGroup
    moe_ep: RankGroup
    moe_tp: RankGroup
    dp: RankGroup
    # How MoE layers reach experts on other moe_ep ranks (--moe-a2a-backend; layers/moe/dispatch.py).
    moe_a2a_backend: str = "none"
    # Extra physical expert slots per MoE layer for copies of hot experts (--ep-num-redundant-experts;
    # layers/moe/placement.py).
    ep_num_redundant_experts: int = 0

    @classmethod
    def single(cls) -> ParallelGroups:
        """One process: every group is the identity."""
        return cls(layout=GroupLayout(), rank=0, world=SINGLE, tp=SINGLE, attn_tp=SINGLE, moe_ep=SINGLE,
                   moe_tp=SINGLE, dp=SINGLE)

    @property
    def dp_rank(self) -> int:
        """Which DP group (scheduler) this rank belongs to."""
        return self.layout.dp_rank(self.rank)

    def kv_heads(self, num_kv_heads: int) -> KVHeadShare:
        """How the model's KV heads spread over this rank's attention-TP group."""
        return KVHeadShare(num_kv_heads, self.attn_tp.size)
