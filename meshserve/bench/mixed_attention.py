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

from meshserve.bench.extend_attention import Case, make_inputs
from meshserve.layers.attention.triton_decode import decode_attention, num_splits
from meshserve.layers.attention.triton_extend import extend_attention


def mixed_step(decodes: int, ctx: int, chunk: int, prefix: int, heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One layer's attention of a mixed step: {"all extend", "split", "decodes"} -> a call
    returning its output (the decodes' rows only for "decodes")."""
    x = make_inputs(Case("mixed", [prefix] + [ctx - 1] * decodes, [chunk] + [1] * decodes), heads, kv_heads,
                    head_dim, dtype, device)
    scale = head_dim**-0.5

    def all_extend() -> torch.Tensor:
        return extend_attention(x.q, x.k, x.v, x.table, x.rows, x.seq_lens, x.extend_lens, x.starts, chunk, scale)

    def only_decodes(out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_attention(x.q[chunk:], None, x.k, x.v, x.table, x.rows[1:], x.seq_lens[1:], scale, out=out)

    def split() -> torch.Tensor:
        out = torch.empty_like(x.q)
        extend_attention(x.q[:chunk], x.k, x.v, x.table, x.rows[:1], x.seq_lens[:1], x.extend_lens[:1], x.starts[:1],
                         chunk, scale, out=out[:chunk])
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
