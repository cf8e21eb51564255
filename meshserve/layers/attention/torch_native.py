"""Reference attention backend: gathers each sequence's K/V from the pool and runs PyTorch SDPA.

Runs on CPU and CUDA; one SDPA call per sequence, so it is the correctness reference, not the
fast path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from meshserve.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer


class TorchNativeBackend(AttentionBackend):
    def extend(self, layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self._run(layer, q, batch)

    def decode(self, layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self._run(layer, q, batch)

    def _run(self, layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        k_cache, v_cache = batch.kv_pool.k[layer.layer_id], batch.kv_pool.v[layer.layer_id]
        start = 0
        for row, total, new in zip(batch.req_rows, batch.seq_lens, batch.extend_lens):
            slots = batch.req_to_token.slots(row, total)
            qs = q[start : start + new].transpose(0, 1)  # [Hq, new, D]
            ks = k_cache[slots].transpose(0, 1)  # [Hkv, total, D]
            vs = v_cache[slots].transpose(0, 1)
            mask = None
            if new > 1:
                # Query i sits at position total - new + i and sees keys up to and including itself.
                query_pos = torch.arange(total - new, total, device=q.device)[:, None]
                mask = torch.arange(total, device=q.device)[None, :] <= query_pos
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=layer.scaling,
                                               enable_gqa=layer.num_heads != layer.num_kv_heads)
            out[start : start + new] = o.transpose(0, 1)
            start += new
        return out
