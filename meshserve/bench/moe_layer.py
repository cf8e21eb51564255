"""Where an MoE layer's decode time goes on the GPU, and which tiles the grouped expert GEMM
should use: one Qwen3-30B-A3B layer's routed experts (128 experts, top 8, hidden 2048, expert
width 768, bf16) at several token counts, in CUDA graphs, beside the time its touched experts'
weights take to read at HBM speed.

  python -m meshserve.bench.moe_layer [--tokens 1 64 256] [--sweep] [--sort-paths] [--fp8 block|channel]

Columns: route (the router: gate GEMM, scoring, top-k, renormalisation), sort (the (token,
expert) pair ordering alone), experts (the whole fused_experts call: sort, the gated GEMM 1, GEMM 2,
sum), floor (touched experts' bytes / --bandwidth-tbs). --sweep times fused_experts for every
(BLOCK_N, BLOCK_K) of the grid below (GEMM 1's tiles are BLOCK_N / 2 wide, gate and up each). Several layers'
distinct weights are cycled so the 50 MB L2 does not hold a layer's experts between calls.
--fp8: the same experts in FP8 (W8A16, Qwen3-30B-A3B-FP8's 128 x 128 blocks or per-row scales);
the floor is then their FP8 bytes.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from meshserve.layers.fp8 import quantize_blockwise, quantize_per_channel
from meshserve.layers.moe import grouped_gemm, pair_sort
from meshserve.layers.moe.experts import ExpertScales
from meshserve.layers.moe.router import Routing, TopKRouter

EXPERTS, TOP_K, HIDDEN, WIDTH = 128, 8, 2048, 768
LAYERS = 4  # distinct weights cycled per timed call
SWEEP_N, SWEEP_K = (32, 64, 128), (64, 128, 256)


def _graph_ms(fn, iters: int = 20) -> float:
    """Mean time of one replay of `fn` captured in a CUDA graph (ms)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sort-paths", action="store_true",
                        help="time both pair-sort implementations at every size (to place KERNEL_MAX_PAIRS)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8)
    parser.add_argument("--fp8", choices=("block", "channel"), help="FP8 experts: 128x128 block or per-row scales")
    ns = parser.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = [torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device=dev, dtype=dt, generator=gen) * 0.02 for _ in range(LAYERS)]
    w2 = [torch.randn(EXPERTS, HIDDEN, WIDTH, device=dev, dtype=dt, generator=gen) * 0.02 for _ in range(LAYERS)]
    scales: list[ExpertScales | None] = [None] * LAYERS
    if ns.fp8 is not None:
        w13, w2, scales = _quantized(w13, w2, (128, 128) if ns.fp8 == "block" else None)
    expert_bytes = 3 * WIDTH * HIDDEN * (1 if ns.fp8 else 2)
    router = TopKRouter(HIDDEN, Routing(EXPERTS, TOP_K, renormalize=True), dtype=dt).to(dev)  # Qwen3-MoE's
    router.weight.data.normal_(0, 0.02, generator=gen)
    print(f"{'tokens':>6} {'touched':>8} {'floor ms':>9} {'route ms':>9} {'sort ms':>8} {'experts ms':>11} "
          f"{'x floor':>8}")
    for tokens in ns.tokens:
        x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt, generator=gen)
        logits = torch.randn(LAYERS, tokens, EXPERTS, device=dev, generator=gen)
        weights, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
        touched = sum(ids[layer].unique().numel() for layer in range(LAYERS)) / LAYERS
        floor = touched * expert_bytes / (ns.bandwidth_tbs * 1e9)

        def experts() -> None:
            for layer in range(LAYERS):
                grouped_gemm.fused_experts(x, w13[layer], w2[layer], weights[layer], ids[layer], scales[layer])

        def sort() -> None:
            for layer in range(LAYERS):
                pair_sort.sort_pairs(ids[layer], EXPERTS, grouped_gemm.BLOCK_M)

        sort_ms, experts_ms = _graph_ms(sort) / LAYERS, _graph_ms(experts) / LAYERS
        route_ms = _graph_ms(lambda: router(x))
        print(f"{tokens:>6} {touched:>8.1f} {floor:>9.4f} {route_ms:>9.4f} {sort_ms:>8.4f} {experts_ms:>11.4f} "
              f"{experts_ms / floor:>8.2f}")
        if ns.sort_paths:
            paths = {}
            for name, impl in (("kernel", pair_sort._sort_triton), ("torch", pair_sort._sort_torch)):
                def run(impl=impl) -> None:
                    for layer in range(LAYERS):
                        impl(ids[layer].flatten(), EXPERTS, grouped_gemm.BLOCK_M, None)

                paths[name] = _graph_ms(run) / LAYERS
            print(f"        {tokens * TOP_K} pairs: sort kernel {paths['kernel']:.4f} ms, "
                  f"torch {paths['torch']:.4f} ms (the kernel runs up to {pair_sort.KERNEL_MAX_PAIRS} pairs)")
        if ns.sweep:
            default = grouped_gemm.BLOCK_N, grouped_gemm.BLOCK_K
            results = []
            for block_n, block_k in itertools.product(SWEEP_N, SWEEP_K):
                grouped_gemm.BLOCK_N, grouped_gemm.BLOCK_K = block_n, block_k
                try:
                    results.append((_graph_ms(experts) / LAYERS, block_n, block_k))
                except Exception as err:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
                    print(f"        BLOCK_N {block_n} BLOCK_K {block_k}: {type(err).__name__}")
            grouped_gemm.BLOCK_N, grouped_gemm.BLOCK_K = default
            print("        " + "  ".join(f"{n}x{k}: {ms:.4f}" for ms, n, k in sorted(results)))


def _quantized(w13: list[torch.Tensor], w2: list[torch.Tensor], block: tuple[int, int] | None):
    """Each layer's experts in FP8 with their scales (per expert: block-wise, or per row)."""
    def one(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block is None:
            return quantize_per_channel(w)
        parts = [quantize_blockwise(expert, block) for expert in w]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    q13, q2 = [one(w) for w in w13], [one(w) for w in w2]
    return ([w for w, _ in q13], [w for w, _ in q2],
            [ExpertScales(a[1], b[1], block) for a, b in zip(q13, q2)])


if __name__ == "__main__":
    main()
