"""Decode-attention cases shared by the CPU (interpreter) and GPU kernel tests: a paged pool, a
request-to-token table, and one new token per sequence as the projections leave it (not yet
rotated, not yet stored), with the reference the kernel must match."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshserve.layers.attention.triton_decode import NewTokens, decode_attention


def rotary_tables(head_dim: int, max_positions: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables [max_positions, head_dim], laid out as RotaryEmbedding's."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.arange(max_positions).float()[:, None] * inv_freq[None, :]] * 2, dim=-1)
    return emb.cos(), emb.sin()


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference rotation, in x's dtype with cos/sin cast to it (as the models compute it)."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.to(x.dtype)


@dataclass
class DecodeCase:
    q: torch.Tensor  # [B, Hq, D], not rotated
    new: NewTokens
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    table: torch.Tensor
    rows: torch.Tensor
    seq_lens: torch.Tensor
    scale: float

    def run(self, splits: int | None = None, fused: bool = True) -> torch.Tensor:
        """Decode attention; fused: the kernel brings the new tokens in itself. Otherwise they
        are rotated and stored here first (by the reference) and the kernel only attends."""
        if fused:
            return decode_attention(self.q, self.new, self.k_cache, self.v_cache, self.table, self.rows,
                                    self.seq_lens, self.scale, splits=splits)
        k_cache, v_cache = self.expected_caches((self.k_cache, self.v_cache))
        self.k_cache.copy_(k_cache)
        self.v_cache.copy_(v_cache)
        return decode_attention(self.rotated_q(), None, self.k_cache, self.v_cache, self.table, self.rows,
                                self.seq_lens, self.scale, splits=splits)

    def expected_caches(self, before: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches `before` with the rotated new keys and the new values in their slots."""
        k_cache, v_cache = before[0].clone(), before[1].clone()
        k_cache[self.new.slots], v_cache[self.new.slots] = self._rotated(self.new.k), self.new.v
        return k_cache, v_cache

    def rotated_q(self) -> torch.Tensor:
        return self._rotated(self.q)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, heads, D] rotated to each sequence's new-token position, by the reference."""
        positions = self.new.positions
        return rotary_ref(x, self.new.cos[positions][:, None], self.new.sin[positions][:, None])

    def reference(self, caches: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """SDPA in float32 over the sequences' slots of `caches`, with the rotated queries."""
        q = self.rotated_q().float()
        out = []
        for b in range(q.shape[0]):
            slots = self.table[self.rows[b], : self.seq_lens[b]]
            k, v = caches[0][slots].float().transpose(0, 1), caches[1][slots].float().transpose(0, 1)
            out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=self.scale, enable_gqa=True)[:, 0])
        return torch.stack(out)


def make_decode_case(heads: int, kv_heads: int, head_dim: int, seq_lens: list[int], dtype: torch.dtype,
                     device: str, seed: int = 0) -> DecodeCase:
    """Every sequence's slots are distinct (a random permutation of the pool), as the allocator
    guarantees; table rows are used out of order; slot 0 is never used (the padding slot)."""
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(seq_lens), max(seq_lens) + 5
    num_slots = (batch + 2) * width + 1
    perm = torch.randperm(num_slots - 1, generator=gen) + 1
    table = perm[: (batch + 2) * width].view(batch + 2, width)
    rows = torch.randperm(batch + 2, generator=gen)[:batch]
    lens = torch.tensor(seq_lens)
    cos, sin = rotary_tables(head_dim, max(seq_lens) + 10)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    new = NewTokens(k=randn(batch, kv_heads, head_dim), v=randn(batch, kv_heads, head_dim),
                    positions=(lens - 1).to(device), slots=table[rows, lens - 1].to(device), cos=cos.to(device),
                    sin=sin.to(device))
    return DecodeCase(q=randn(batch, heads, head_dim), new=new, k_cache=randn(num_slots, kv_heads, head_dim),
                      v_cache=randn(num_slots, kv_heads, head_dim), table=table.to(device), rows=rows.to(device),
                      seq_lens=lens.to(device), scale=head_dim**-0.5)
