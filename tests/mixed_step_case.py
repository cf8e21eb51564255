"""A mixed extend step for attention tests (CPU interpreter and GPU): prompts over cached
prefixes, then the decodes riding in the step (one new token each), on one layer of a paged
KV pool — with the new tokens as the projections leave them (q and k not yet rotated, nothing
stored), and the float32 SDPA reference every backend must match."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
from meshserve.executor.forward_batch import ForwardBatch, ForwardMode, HostLens
from meshserve.layers.attention.base import AttentionBackend
from meshserve.layers.attention.layer import AttentionLayer
from meshserve.layers.rotary import RotaryEmbedding

# (cached prefix, new tokens) of each sequence, in batch order: three prompts (a fresh one, a
# one-token one over a prefix, a chunk over a prefix), then five decodes of lengths around the
# kernels' 64-key blocks and long enough for several splits.
SEQUENCES = [(0, 37), (5, 1), (20, 70), (1, 1), (63, 1), (64, 1), (299, 1), (1100, 1)]
PROMPT_ROWS = 3


@dataclass
class MixedStep:
    layer: AttentionLayer
    batch: ForwardBatch
    positions: torch.Tensor  # [T] of the new tokens
    q: torch.Tensor  # [T, Hq, D] as projected
    k: torch.Tensor  # [T, Hkv, D] as projected
    v: torch.Tensor  # [T, Hkv, Dv]

    def run(self, backend: AttentionBackend) -> torch.Tensor:
        """The backend's attention for the step (it stores the new tokens first, as in the
        engine; storing them again stores the same values)."""
        return backend.forward(self.layer, self.positions, self.q.clone(), self.k.clone(), self.v.clone(), self.batch)

    def rotated_q(self) -> torch.Tensor:
        if self.layer.rotary is None:
            return self.q
        return self.layer.rotary(self.positions, self.q, self.k)[0]

    def reference(self) -> torch.Tensor:
        """float32 SDPA of each sequence's rotated queries over its slots of the pool (read after
        a run has stored the new tokens), causal over the new tokens."""
        pool, host, table = self.batch.kv_pool, self.batch.host, self.batch.req_to_token.table
        assert host is not None
        q = self.rotated_q().float()
        out, start = [], 0
        for row, total, new in zip(host.req_rows, host.seq_lens, host.extend_lens):
            k, v = (x.float().transpose(0, 1) for x in pool.gather(0, table[row, :total], torch.float32))
            keys, query_pos = torch.arange(total, device=q.device), torch.arange(total - new, total, device=q.device)
            mask = keys[None, :] <= query_pos[:, None]
            out.append(F.scaled_dot_product_attention(q[start : start + new].transpose(0, 1), k, v, attn_mask=mask,
                                                      scale=self.layer.scaling, enable_gqa=True).transpose(0, 1))
            start += new
        return torch.cat(out)


def make_mixed_step(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, *,
                    v_head_dim: int | None = None, fp8_scales: tuple[float, float] | None = None,
                    seed: int = 0) -> MixedStep:
    """With v_head_dim (< head_dim) the latent layout: one KV head whose values are the keys'
    leading features, q and k arriving rotated (no rotary), as multi-head latent attention.
    With fp8_scales an FP8 pool with those (K, V) scales. Each sequence's slots are a random
    set of the pool; table rows are used out of order."""
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    totals = [prefix + new for prefix, new in SEQUENCES]
    kv_dtype = dtype if fp8_scales is None else torch.float8_e4m3fn
    pool = KVPool(size=sum(totals) + 50, num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, dtype=kv_dtype,
                  device=dev, latent_v_dim=v_head_dim, scales=None if fp8_scales is None else [fp8_scales])
    # The cached prefixes' (and stale) keys and values: random, as stored.
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=gen).to(kv_dtype))
    if v_head_dim is None:
        pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=gen).to(kv_dtype))
    rows_pool = ReqToTokenPool(max_requests=len(SEQUENCES) + 3, max_context=max(totals) + 1, device=dev)
    rows = torch.randperm(len(SEQUENCES) + 3, generator=gen)[: len(SEQUENCES)].tolist()
    free = torch.randperm(pool.size, generator=gen) + 1  # slot 0 is the padding slot
    taken = 0
    for row, total in zip(rows, totals):
        rows_pool.assign(row, 0, free[taken : taken + total])
        taken += total
    positions = torch.cat([torch.arange(prefix, prefix + new) for prefix, new in SEQUENCES])
    token_rows = torch.tensor([row for row, (_, new) in zip(rows, SEQUENCES) for _ in range(new)])
    out_cache_loc = rows_pool.table[token_rows.to(dev), positions.to(dev)]
    tokens = positions.numel()

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(dev)

    rotary = None
    if v_head_dim is None:
        rotary = RotaryEmbedding(LlamaConfig(rope_theta=10000.0), head_dim, max(totals) + 1).to(dev)
    layer = AttentionLayer(0, heads, kv_heads, head_dim, head_dim**-0.5, rotary, v_head_dim=v_head_dim)
    extend_lens = [new for _, new in SEQUENCES]

    def on_device(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=dev)

    batch = ForwardBatch(
        mode=ForwardMode.EXTEND, input_ids=on_device([0] * tokens), positions=positions.to(dev),
        out_cache_loc=out_cache_loc, req_rows=on_device(rows), seq_lens=on_device(totals), kv_pool=pool,
        req_to_token=rows_pool, attn_backend=None,  # type: ignore[arg-type]  # MixedStep.run names it
        host=HostLens(req_rows=rows, seq_lens=totals, extend_lens=extend_lens), extend_lens=on_device(extend_lens))
    k = randn(tokens, kv_heads, head_dim)
    # Latent: the new values are the new keys' leading features, as the model projects them.
    v = randn(tokens, kv_heads, head_dim) if v_head_dim is None else k[..., :v_head_dim].clone()
    return MixedStep(layer=layer, batch=batch, positions=positions.to(dev), q=randn(tokens, heads, head_dim), k=k, v=v)
