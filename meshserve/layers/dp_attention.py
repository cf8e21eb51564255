"""DP attention's MLP step: each DP group attends over its own tokens, the MLP (dense or MoE)
runs over all of them.

Every rank of a DP group holds its group's tokens (attention-TP members hold the same ones), so
an all-gather over the `dp` group — the ranks with the same attention-TP position in every DP
group — gives every rank the tokens of every DP group, in DP-rank order. The MLP then runs
tensor-parallel over the whole `tp` group exactly as with plain tensor parallelism (identical
inputs on every rank), and each rank keeps the rows of its own DP group. Token counts differ
between DP groups, so every rank pads to the step's largest count (the counts were exchanged at
the start of the step: DPStep) and drops the padding after the gather.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshserve.cluster.comm import RankGroup


def mlp_over_dp_groups(mlp: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, counts: list[int],
                       dp: RankGroup) -> torch.Tensor:
    """`mlp` over the tokens of every DP group; returns this group's rows. x: [counts[dp.rank], H]
    (empty on an idle DP group, which still joins every collective)."""
    widest = max(counts)
    padded = x.new_zeros(widest, x.shape[-1])
    padded[: x.shape[0]] = x
    gathered = dp.all_gather(padded, dim=0)  # [D * widest, H], DP-rank order
    tokens = torch.cat([gathered[d * widest : d * widest + n] for d, n in enumerate(counts)])
    out = mlp(tokens)
    start = sum(counts[: dp.rank])
    return out[start : start + counts[dp.rank]]
