"""Attention of one mixed extend step alone (--enable-mixed-chunk; Llama-3.1-8B geometry: 32 query
heads, 8 KV heads, head_dim 128, bf16): a prompt chunk over a cached prefix plus B running
sequences' decodes, timed per layer two ways — every row through the extend kernel ("all
extend", before the split) and the decode rows through the decode kernel ("split", the Triton
backend's way, ForwardBatch.decode_rows) — and the split's decode launch alone, whose GB/s is
over the K/V bytes the decodes read. Each case first checks that both ways give the same output.

  python -m meshserve.bench.mixed_attention --decodes 64 256 --context-len 3000 --chunk 2048
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import triton.testing

from meshserve.layers.attention.triton_decode import decode_attention, num_splits
from meshserve.layers.attention.triton_extend import extend_attention


def mixed_step(decodes: int, ctx: int, chunk: int, prefix: int, heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One layer's attention of a mixed step: {"all extend", "split", "decodes"} -> a call
    returning its output (the decodes' rows only for "decodes")."""
    lens = [prefix + chunk] + [ctx] * decodes
    extend = [chunk] + [1] * decodes
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
    rows = torch.arange(len(lens), device=device)
    seq_lens = torch.tensor(lens, device=device)
    extend_lens = torch.tensor(extend, device=device)
    starts = extend_lens.cumsum(0) - extend_lens
    q = torch.randn(chunk + decodes, heads, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5

    def all_extend() -> torch.Tensor:
        return extend_attention(q, k, v, table, rows, seq_lens, extend_lens, starts, chunk, scale)

    def only_decodes(out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_attention(q[chunk:], None, k, v, table, rows[1:], seq_lens[1:], scale, out=out)

    def split() -> torch.Tensor:
        out = torch.empty_like(q)
        extend_attention(q[:chunk], k, v, table, rows[:1], seq_lens[:1], extend_lens[:1], starts[:1], chunk, scale,
                         out=out[:chunk])
        only_decodes(out[chunk:])
        return out

    return {"all extend": all_extend, "split": split, "decodes": only_decodes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--context-len", type=int, nargs="+", default=[512, 3000])
    parser.add_argument("--chunk", type=int, default=2048, help="the prompt's new tokens in the step")
    parser.add_argument("--prefix", type=int, default=0, help="the prompt's cached prefix")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    ns = parser.parse_args(argv)
    print(f"chunk {ns.chunk} over a prefix of {ns.prefix}; per layer")
    print(f"{'decodes':>8} {'context':>8} {'splits':>7} {'all extend us':>14} {'split us':>9} {'speedup':>8} "
          f"{'decodes us':>11} {'GB/s':>7}")
    device = torch.device("cuda")
    for ctx in ns.context_len:
        for decodes in ns.decodes:
            calls = mixed_step(decodes, ctx, ns.chunk, ns.prefix, ns.heads, ns.kv_heads, ns.head_dim, torch.bfloat16,
                               device)
            torch.testing.assert_close(calls["split"](), calls["all extend"](), rtol=2e-2, atol=2e-2)
            ms = {name: triton.testing.do_bench(call, return_mode="median") for name, call in calls.items()}
            kv_bytes = 2 * decodes * ctx * ns.kv_heads * ns.head_dim * 2
            print(f"{decodes:>8} {ctx:>8} {num_splits(decodes, ns.kv_heads, device):>7} "
                  f"{ms['all extend'] * 1e3:>14.1f} {ms['split'] * 1e3:>9.1f} {ms['all extend'] / ms['split']:>8.2f} "
                  f"{ms['decodes'] * 1e3:>11.1f} {kv_bytes / ms['decodes'] / 1e6:>7.0f}")


if __name__ == "__main__":
    main()
