"""The attention module models use: fixed head geometry and the rotary embedding. It hands the
new tokens, as projected, to the batch's backend, and offers the backends the one way to rotate
them and store them in the KV pool (`store_new_tokens`).

Values may be narrower than keys (`v_head_dim`): multi-head latent attention attends with one
latent KV head whose keys are [c_kv | k_rope] and whose values are c_kv. Such a model rotates
its own rope part before the layer (rotary=None: q and k arrive rotated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.rotary import RotaryEmbedding


class AttentionLayer(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 rotary: RotaryEmbedding | None, v_head_dim: int | None = None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads  # local (this rank's) heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim  # of queries and keys
        self.v_head_dim = v_head_dim or head_dim  # of values and of the output
        self.scaling = scaling
        self.rotary = rotary  # shared by every layer of the model; None: q and k arrive rotated

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q [T, Hq, D], k [T, Hkv, D] (not yet rotated), v [T, Hkv * Dv] of the new tokens ->
        [T, Hq * Dv]. q and k may be rotated in place: they are fresh projections."""
        v = v.view(-1, self.num_kv_heads, self.v_head_dim)
        out = batch.attn_backend.forward(self, positions, q, k, v, batch)
        return out.reshape(-1, self.num_heads * self.v_head_dim)

    def store_new_tokens(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k, and write k and v to the new tokens' slots of the pool; returns the
        rotated (q, k). Backends call it unless their kernel does both itself."""
        pool = batch.kv_pool
        if self.rotary is None:  # already rotated by the model
            pool.write(self.layer_id, batch.out_cache_loc, k, v)
        elif q.is_cuda:  # one kernel rotates q and k and stores k and v
            from meshserve.layers.kernels.rotary import rotate_and_store_

            rotate_and_store_(q, k, v, self.rotary.cos, self.rotary.sin, positions, pool.k[self.layer_id],
                              pool.v[self.layer_id], batch.out_cache_loc, pool.k_scale[self.layer_id],
                              pool.v_scale[self.layer_id])
        else:
            q, k = self.rotary(positions, q, k)
            pool.write(self.layer_id, batch.out_cache_loc, k, v)
        return q, k
