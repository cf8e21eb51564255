"""Paged decode attention alone (Llama-3.1-8B geometry: 32 query heads, 8 KV heads, head_dim 128,
bf16; the new token's rotation and store included): time per call (replayed from a CUDA graph,
as the engine runs it) and the bandwidth it reaches over the K/V bytes it must read, for each
batch size and context length, with the automatic split count and with a single split.

  python -m meshserve.bench.decode_attention --batch-size 1 16 64 256 --context-len 512 3000
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

from meshserve.layers.attention.triton_decode import NewTokens, decode_attention, num_splits


def _graph_time_ms(call, repeat: int = 20) -> float:
    """Median time of one call, replayed from a CUDA graph of `repeat` calls: kernel time, as in
    the engine's decode graphs, without the host's launch time."""
    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            call()
    return triton.testing.do_bench(graph.replay, return_mode="median") / repeat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context-len", type=int, nargs="+", default=[512, 3000])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    ns = parser.parse_args(argv)
    device = torch.device("cuda")
    # Rotary tables as the model holds them (float32, [positions, head_dim]); their values do not
    # change the time.
    cos = torch.rand(max(ns.context_len), ns.head_dim, device=device)
    sin = torch.rand_like(cos)
    print(f"{'batch':>6} {'context':>8} {'splits':>7} {'us':>9} {'GB/s':>8} {'1 split us':>11} {'GB/s':>8}")
    for ctx in ns.context_len:
        for bs in ns.batch_size:
            slots = bs * ctx + 1
            k = torch.randn(slots, ns.kv_heads, ns.head_dim, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            # Each sequence's slots are a random permutation: pages are scattered, as in a busy pool.
            table = (torch.randperm(slots - 1, device=device) + 1)[: bs * ctx].view(bs, ctx)
            rows = torch.arange(bs, device=device)
            lens = torch.full((bs,), ctx, device=device)
            q = torch.randn(bs, ns.heads, ns.head_dim, device=device, dtype=torch.bfloat16)
            new = NewTokens(k=torch.randn_like(k[:bs]), v=torch.randn_like(v[:bs]), positions=lens - 1,
                            slots=table[:, -1].contiguous(), cos=cos, sin=sin)
            kv_bytes = 2 * bs * ctx * ns.kv_heads * ns.head_dim * 2
            auto = num_splits(bs, ns.kv_heads, device)
            t_auto = _graph_time_ms(lambda: decode_attention(q, new, k, v, table, rows, lens, 0.088))
            t_one = _graph_time_ms(lambda: decode_attention(q, new, k, v, table, rows, lens, 0.088, splits=1))
            print(f"{bs:>6} {ctx:>8} {auto:>7} {t_auto * 1e3:>9.1f} {kv_bytes / t_auto / 1e6:>8.0f} "
                  f"{t_one * 1e3:>11.1f} {kv_bytes / t_one / 1e6:>8.0f}")


if __name__ == "__main__":
    main()
