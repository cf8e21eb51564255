"""Reference attention backend: gathers K/V from the pool and runs PyTorch SDPA.

Runs on CPU and CUDA. Extend runs one SDPA call per sequence (causal within the new tokens);
decode gathers every sequence's K/V into one padded batch and runs one masked SDPA call per
layer. It is the correctness reference, not the GPU fast path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from meshserve.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer


class TorchNativeBackend(AttentionBackend):
    def extend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        assert batch.host is not None
        out = torch.empty_like(q)
        k_cache, v_cache = batch.kv_pool.k[layer.layer_id], batch.kv_pool.v[layer.layer_id]
        start = 0
        host = batch.host
        for row, total, new in zip(host.req_rows, host.seq_lens, host.extend_lens):
            qs = q[start : start + new].transpose(0, 1)  # [Hq, new, D]
            if new == total:  # no cached prefix: the new keys and values are the whole sequence
                ks, vs = k[start : start + new].transpose(0, 1), v[start : start + new].transpose(0, 1)
            else:
                slots = batch.req_to_token.table[row, :total]
                ks = k_cache[slots].transpose(0, 1)  # [Hkv, total, D]
                vs = v_cache[slots].transpose(0, 1)
            mask = None
            if 1 < new < total:
                # Query i sits at position total - new + i and sees keys up to and including itself.
                query_pos = torch.arange(total - new, total, device=q.device)[:, None]
                mask = torch.arange(total, device=q.device)[None, :] <= query_pos
            # No cached prefix: plain causal attention, which lets SDPA pick its flash kernel on
            # the GPU (an explicit mask would force a slower one).
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=new > 1 and new == total,
                                               scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
            out[start : start + new] = o.transpose(0, 1)
            start += new
        return out

    def decode(self, layer: AttentionLayer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, _ = layer.store_new_tokens(positions, q, k, v, batch)
        slots, visible = batch.padded_kv_slots  # [B, L] each
        k = batch.kv_pool.k[layer.layer_id][slots].transpose(1, 2)  # [B, Hkv, L, D]
        v = batch.kv_pool.v[layer.layer_id][slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=visible[:, None, None, :],
                                             scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
        return out.squeeze(2)  # [B, Hq, D]
