"""GPU attention backend: Triton kernels reading the paged KV pool through the request-to-token
table — decode (split over the sequence, CUDA-graph safe; at small batches it rotates and
stores the new token itself) and extend (cached prefix + new tokens, every sequence of the
batch in one launch).

An extend step's decode rows (ForwardBatch.decode_rows: the decodes riding in a mixed extend
step) go through the decode kernel, not the extend kernel: the extend kernel spends a whole
query tile and one program per query head on each of them and reads its K/V unsplit, once per
query head; the decode kernel reads it once per KV head, split over the sequence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from meshserve.layers.attention.base import AttentionBackend

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer


class TritonBackend(AttentionBackend):
    supports_cuda_graph = True
    supports_latent_kv = True

    def extend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        from meshserve.layers.attention.triton_decode import decode_attention
        from meshserve.layers.attention.triton_extend import extend_attention

        pool, i, table = batch.kv_pool, layer.layer_id, batch.req_to_token.table
        out = q.new_empty(*q.shape[:2], layer.v_head_dim)
        decodes = batch.decode_rows
        prompts, prompt_tokens = batch.batch_size - decodes, q.shape[0] - decodes  # a decode row is one token
        if prompts:
            # max_extend_len is a prompt's (the last prompt row has more than one new token); inside
            # an extend CUDA graph (no host lengths) the grid covers a sequence holding every token.
            max_extend_len = batch.host.max_extend_len if batch.host is not None else q.shape[0]
            extend_attention(q[:prompt_tokens], pool.k[i], pool.v[i], table, batch.req_rows[:prompts],
                             batch.seq_lens[:prompts], batch.extend_lens[:prompts], batch.extend_starts[:prompts],
                             max_extend_len, layer.scaling, k_scale=pool.k_scale[i], v_scale=pool.v_scale[i],
                             out=out[:prompt_tokens])
        if decodes:
            # Their new tokens are in the pool already (stored with the prompts' before extend).
            decode_attention(q[prompt_tokens:], None, pool.k[i], pool.v[i], table, batch.req_rows[prompts:],
                             batch.seq_lens[prompts:], layer.scaling, k_scale=pool.k_scale[i],
                             v_scale=pool.v_scale[i], out=out[prompt_tokens:])
        return out

    def decode(self, layer: AttentionLayer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        from meshserve.layers.attention.triton_decode import NewTokens, decode_attention, fuses_new_token

        # The fused path rotates whole heads and stores K and V apart: not for latent attention,
        # whose model rotates the rope part itself (rotary None).
        if fuses_new_token(batch.batch_size) and layer.rotary is not None and layer.v_head_dim == layer.head_dim:
            new = NewTokens(k, v, positions, batch.out_cache_loc, layer.rotary.cos, layer.rotary.sin)
        else:
            q, _ = layer.store_new_tokens(positions, q, k, v, batch)
            new = None
        pool, i = batch.kv_pool, layer.layer_id
        return decode_attention(q, new, pool.k[i], pool.v[i], batch.req_to_token.table, batch.req_rows,
                                batch.seq_lens, layer.scaling, k_scale=pool.k_scale[i], v_scale=pool.v_scale[i])
