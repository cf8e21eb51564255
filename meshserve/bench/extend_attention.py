"""Paged extend (prefill) attention alone (Llama-3.1-8B geometry by default: 32 query heads, 8 KV
heads, head_dim 128, bf16): time per layer, replayed from a CUDA graph, and TFLOP/s over the
causal attention's multiply-adds (a query sees its prefix and the new tokens up to itself), for
the shapes a prefill step takes — one short prompt (first token), one long prompt, a step of
many prompts of random lengths, a later chunk over a cached prefix — under each tiling asked for.
With --torch, fresh prompts are also timed through PyTorch's own fused attention (SDPA with its
FlashAttention or cuDNN backend, one call per prompt, keys repeated to every query head outside
the timing) as a reference. Each variant's output is first compared with attention computed in
float32 from the same 16-bit inputs: its mean and largest absolute error are printed beside its time.

  python -m meshserve.bench.extend_attention --tiles 128,64,8,3 64,64,4,2 --torch
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from meshserve.bench.decode_attention import _graph_time_ms
from meshserve.layers.attention.triton_extend import ExtendTiles, extend_attention, extend_tiles
from meshserve.layers.kernels.device import max_shared_bytes


@dataclass(frozen=True)
class Case:
    name: str
    prefix_lens: list[int]
    extend_lens: list[int]

    @property
    def visible_keys(self) -> int:
        """Sum over the new tokens of the keys each one attends to."""
        return sum(n * p + n * (n + 1) // 2 for p, n in zip(self.prefix_lens, self.extend_lens))


def default_cases(seed: int = 0) -> list[Case]:
    # A saturated step of the 500-prompt workload: prompts of U[1, 4095] tokens filling an
    # 8,192-token chunk budget.
    gen = torch.Generator().manual_seed(seed)
    mixed: list[int] = []
    while sum(mixed) < 8192:
        mixed.append(min(int(torch.randint(1, 4096, (1,), generator=gen)), 8192 - sum(mixed)))
    return [
        Case("1 x 256", [0], [256]),
        Case("1 x 4096", [0], [4096]),
        Case(f"{len(mixed)} x U[1,4095]", [0] * len(mixed), mixed),
        Case("2048 over 2048 cached", [2048], [2048]),
    ]


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor
    rows: torch.Tensor
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    starts: torch.Tensor
    max_extend: int


def make_inputs(case: Case, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> Inputs:
    lens = [p + n for p, n in zip(case.prefix_lens, case.extend_lens)]
    slots = sum(lens) + 1
    k = torch.randn(slots, kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    # Each sequence's slots are a random part of the pool: pages are scattered, as in a busy pool.
    perm = torch.randperm(slots - 1, device=device) + 1
    table = torch.zeros(len(lens), max(lens), dtype=torch.int64, device=device)
    start = 0
    for row, n in enumerate(lens):
        table[row, :n] = perm[start : start + n]
        start += n
    extend_lens = torch.tensor(case.extend_lens, device=device)
    return Inputs(q=torch.randn(sum(case.extend_lens), heads, head_dim, device=device).to(dtype), k=k, v=v,
                  table=table, rows=torch.arange(len(lens), device=device), seq_lens=torch.tensor(lens, device=device),
                  extend_lens=extend_lens, starts=extend_lens.cumsum(0) - extend_lens, max_extend=max(case.extend_lens))


def triton_call(x: Inputs, tiles: ExtendTiles) -> Callable[[], torch.Tensor]:
    out = torch.empty_like(x.q)
    scale = x.q.shape[2] ** -0.5
    return lambda: extend_attention(x.q, x.k, x.v, x.table, x.rows, x.seq_lens, x.extend_lens, x.starts,
                                    x.max_extend, scale, out=out, tiles=tiles)


def torch_call(case: Case, x: Inputs, backend: SDPBackend) -> Callable[[], torch.Tensor]:
    """SDPA per fresh prompt on contiguous [1, H, n, D] copies, K/V repeated to every query head."""
    group = x.q.shape[1] // x.k.shape[1]
    per_seq = []
    start = 0
    for b, n in enumerate(case.extend_lens):
        slots = x.table[b, :n]
        q = x.q[start : start + n].transpose(0, 1).unsqueeze(0).contiguous()
        k = x.k[slots].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        v = x.v[slots].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        per_seq.append((q, k, v))
        start += n

    def call() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel([backend]):
            outs = [F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v in per_seq]
        return torch.cat([o.squeeze(0).transpose(0, 1) for o in outs])

    return call


def float32_reference(case: Case, x: Inputs) -> torch.Tensor:
    """The exact attention of the 16-bit inputs, computed in float32, sequence by sequence."""
    outs, start = [], 0
    for b, (prefix, n) in enumerate(zip(case.prefix_lens, case.extend_lens)):
        slots = x.table[b, : prefix + n]
        keys, queries = (torch.arange(a, prefix + n, device=x.q.device) for a in (0, prefix))
        mask = keys[None, :] <= queries[:, None]
        q, k, v = (t.float().transpose(0, 1) for t in (x.q[start : start + n], x.k[slots], x.v[slots]))
        with torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def parse_tiles(text: str) -> ExtendTiles:
    block_m, block_n, warps, stages = (int(part) for part in text.split(","))
    return ExtendTiles(block_m, block_n, warps, stages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", nargs="*", default=[], type=parse_tiles, metavar="BM,BN,WARPS,STAGES",
                        help="tilings to time besides the default (extend_tiles' choice)")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's SDPA on the fresh prompts")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ns = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), getattr(torch, ns.dtype)
    default = extend_tiles(ns.head_dim, dtype.itemsize, max_shared_bytes(device))
    tilings = [default] + [t for t in ns.tiles if t != default]
    print(f"{ns.heads}/{ns.kv_heads} heads, head_dim {ns.head_dim}, {ns.dtype}; per layer; default tiles {default}")
    print(f"{'case':>24} {'variant':>22} {'us':>9} {'TFLOP/s':>8} {'mean err':>9} {'max err':>8}")
    for case in default_cases():
        x = make_inputs(case, ns.heads, ns.kv_heads, ns.head_dim, dtype, device)
        flops = 4 * ns.heads * ns.head_dim * case.visible_keys
        calls: dict[str, Callable[[], torch.Tensor]] = {
            "triton " + ",".join(map(str, (t.block_m, t.block_n, t.warps, t.stages))): triton_call(x, t)
            for t in tilings}
        if ns.torch and not any(case.prefix_lens):
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                calls[f"torch {backend.name.lower()}"] = torch_call(case, x, backend)
        exact = float32_reference(case, x)
        for name, call in calls.items():
            try:
                err = (call().float() - exact).abs()
            except RuntimeError as e:  # a backend PyTorch lacks for this shape or build
                print(f"{case.name:>24} {name:>22} unavailable: {str(e).splitlines()[0][:60]}")
                continue
            ms = _graph_time_ms(call, repeat=5)
            print(f"{case.name:>24} {name:>22} {ms * 1e3:>9.1f} {flops / ms / 1e9:>8.1f} "
                  f"{err.mean().item():>9.2e} {err.max().item():>8.2e}")


if __name__ == "__main__":
    main()
