"""Reference attention backend: PyTorch SDPA over K/V gathered from the pool.

Runs on CPU and CUDA; the correctness reference, not the GPU fast path. Every SDPA call takes
4-D [batch, heads, tokens, head_dim] inputs: on the CPU only those reach PyTorch's flash kernel,
which never materialises the [queries, keys] score matrix (3-D inputs fall back to the math
path: 9 × 8191² float32 scores per layer for one 8k prompt of SmolLM2, 2.4 GB).

- Prompts (and chunks of them) attend one at a time, their queries in blocks of at most
  QUERY_BLOCK, so any mask is at most [QUERY_BLOCK, keys].
- Decodes (ForwardBatch.decode_rows: all sequences of a decode step, the decodes riding in a
  mixed extend step) attend together, in groups whose padded K/V gather is bounded
  (ForwardBatch.decode_groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from meshserve.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer

QUERY_BLOCK = 1024  # bounds the causal mask of a prompt to [QUERY_BLOCK, keys] booleans


class TorchNativeBackend(AttentionBackend):
    supports_latent_kv = True
    def extend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        assert batch.host is not None
        out = q.new_empty(*q.shape[:2], layer.v_head_dim)
        self._attend_decodes(layer, q, batch, out)
        pool = batch.kv_pool
        start = 0
        host = batch.host
        prompts = batch.batch_size - batch.decode_rows
        for row, total, new in zip(host.req_rows[:prompts], host.seq_lens[:prompts], host.extend_lens[:prompts]):
            # Without a cached prefix the new keys and values are the whole sequence (an FP8
            # pool's rounded copies are read instead, as every later step will read them).
            if new == total and not pool.quantized:
                ks, vs = k[start : start + new], v[start : start + new]
            else:
                ks, vs = pool.gather(layer.layer_id, batch.req_to_token.table[row, :total], q.dtype)
            self._attend_new_tokens(layer, q[start : start + new], ks, vs, out[start : start + new])
            start += new
        return out

    def decode(self, layer: AttentionLayer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, _ = layer.store_new_tokens(positions, q, k, v, batch)
        out = q.new_empty(*q.shape[:2], layer.v_head_dim)
        self._attend_decodes(layer, q, batch, out)
        return out

    @staticmethod
    def _attend_new_tokens(layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor) -> None:
        """One sequence: q [new, Hq, D] attends causally to k, v [total, Hkv, D] (its cached
        prefix, then the new tokens); writes out [new, Hq, D]."""
        new, prefix = q.shape[0], k.shape[0] - q.shape[0]
        k4, v4 = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, total, D]
        for begin in range(0, new, QUERY_BLOCK):
            end = min(begin + QUERY_BLOCK, new)
            keys = prefix + end  # the block's last query sees keys [0, keys)
            mask = None
            if keys != end - begin:
                # Query i of the block sits at position prefix + begin + i and sees keys up to itself.
                query_pos = torch.arange(prefix + begin, prefix + end, device=q.device)[:, None]
                mask = torch.arange(keys, device=q.device)[None, :] <= query_pos
            # Without a mask (the block is the whole sequence so far) plain causal attention,
            # which lets SDPA pick its flash kernel on the GPU too (a mask forces a slower one).
            o = F.scaled_dot_product_attention(
                q[begin:end].transpose(0, 1)[None], k4[:, :, :keys], v4[:, :, :keys], attn_mask=mask,
                is_causal=mask is None, scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
            out[begin:end] = o[0].transpose(0, 1)

    @staticmethod
    def _attend_decodes(layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch, out: torch.Tensor) -> None:
        """Every decode row (its new token already in the pool): its query row of q [T, Hq, D]
        attends to its whole K/V; the result goes to the same row of out."""
        for group in batch.decode_groups:
            k, v = batch.kv_pool.gather(layer.layer_id, group.slots, q.dtype)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D]
            o = F.scaled_dot_product_attention(
                q.index_select(0, group.tokens).unsqueeze(2), k, v, attn_mask=group.visible[:, None, None, :],
                scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
            out.index_copy_(0, group.tokens, o.squeeze(2))
