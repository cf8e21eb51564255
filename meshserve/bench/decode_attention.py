"""Paged decode attention alone (Llama-3.1-8B geometry: 32 query heads, 8 KV heads, head_dim 128,
bf16): time per layer (replayed from a CUDA graph, as the engine runs it) for each batch size
and context length, with the new tokens brought in two ways — by the attention kernel itself
("fused") and by the separate rotate-and-store kernel before it ("separate") — and, for the
latter, with a single split; GB/s is over the K/V bytes read. `--kv-cache-dtype fp8_e4m3` times
an FP8 pool (scales 0.5 and 2.0), whose K/V bytes are half as many. `--page-size P` lays each
sequence out in pages of P contiguous slots, the pages scattered through the pool (the
allocator's layout with `--page-size P`); 1 scatters every token.

  python -m meshserve.bench.decode_attention --batch-size 1 4 16 32 64 256 --context-len 512 3000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import triton.testing

from meshserve.cache.kv_pool import quantize_kv
from meshserve.layers.attention.triton_decode import NewTokens, decode_attention, num_splits
from meshserve.layers.kernels.rotary import rotate_and_store_


def _graph_time_ms(call: Callable[[], object], repeat: int = 20) -> float:
    """Median time of one call, replayed from a CUDA graph of `repeat` calls: kernel time, as in
    the engine's decode graphs, without the host's launch time."""
    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            call()
    return triton.testing.do_bench(graph.replay, return_mode="median") / repeat


def scattered_pages(batch: int, context: int, page_size: int, device: torch.device) -> torch.Tensor:
    """A request-to-token table [batch, context] whose sequences take whole pages of
    `page_size` slots, pages in random order through the pool, as in a busy pool; page 0 (the
    padding slots) is never used."""
    pages_per_seq = triton.cdiv(context, page_size)
    pages = torch.randperm(batch * pages_per_seq, device=device) + 1
    slots = pages.view(batch, pages_per_seq, 1) * page_size + torch.arange(page_size, device=device)
    return slots.view(batch, -1)[:, :context].contiguous()


def _time_case(bs: int, ctx: int, ns: argparse.Namespace) -> tuple[float, float, float]:
    """(fused, separate, separate with one split) milliseconds for one batch size and context."""
    device = torch.device("cuda")
    slots = (bs * triton.cdiv(ctx, ns.page_size) + 1) * ns.page_size
    k = torch.randn(slots, ns.kv_heads, ns.head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_scale, v_scale = 1.0, 1.0
    if ns.kv_cache_dtype == "fp8_e4m3":
        k_scale, v_scale = 0.5, 2.0
        k, v = quantize_kv(k, k_scale, torch.float8_e4m3fn), quantize_kv(v, v_scale, torch.float8_e4m3fn)
    table = scattered_pages(bs, ctx, ns.page_size, device)
    rows = torch.arange(bs, device=device)
    lens = torch.full((bs,), ctx, device=device)
    q = torch.randn(bs, ns.heads, ns.head_dim, device=device, dtype=torch.bfloat16)
    # Rotary tables as the model holds them (float32 [positions, head_dim]); values do not matter.
    cos = torch.rand(ctx, ns.head_dim, device=device)
    sin = torch.rand_like(cos)
    new_k, new_v = (torch.randn(bs, ns.kv_heads, ns.head_dim, device=device, dtype=torch.bfloat16) for _ in "kv")
    new = NewTokens(k=new_k, v=new_v, positions=lens - 1, slots=table[:, -1].contiguous(), cos=cos, sin=sin)

    def separate(splits: int | None = None) -> None:
        rotate_and_store_(q, new.k, new.v, cos, sin, new.positions, k, v, new.slots, k_scale, v_scale)
        decode_attention(q, None, k, v, table, rows, lens, 0.088, splits=splits, k_scale=k_scale, v_scale=v_scale)

    def fused() -> None:
        decode_attention(q, new, k, v, table, rows, lens, 0.088, k_scale=k_scale, v_scale=v_scale)

    return _graph_time_ms(fused), _graph_time_ms(separate), _graph_time_ms(lambda: separate(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256])
    parser.add_argument("--context-len", type=int, nargs="+", default=[512, 3000])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto")
    parser.add_argument("--page-size", type=int, default=1, help="contiguous slots per page (1: every token scattered)")
    ns = parser.parse_args(argv)
    print(f"{'batch':>6} {'context':>8} {'splits':>7} {'fused us':>9} {'separate us':>12} {'GB/s':>7} "
          f"{'1 split us':>11} {'GB/s':>7}")
    for ctx in ns.context_len:
        for bs in ns.batch_size:
            fused, separate, one_split = _time_case(bs, ctx, ns)
            kv_bytes = 2 * bs * ctx * ns.kv_heads * ns.head_dim * (1 if ns.kv_cache_dtype == "fp8_e4m3" else 2)
            splits = num_splits(bs, ns.kv_heads, torch.device("cuda"))
            print(f"{bs:>6} {ctx:>8} {splits:>7} {fused * 1e3:>9.1f} {separate * 1e3:>12.1f} "
                  f"{kv_bytes / separate / 1e6:>7.0f} {one_split * 1e3:>11.1f} {kv_bytes / one_split / 1e6:>7.0f}")


if __name__ == "__main__":
    main()
