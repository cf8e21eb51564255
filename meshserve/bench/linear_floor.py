"""The linear-layer floor of a decode step: a CUDA-graph replay of only the linear layers of a
Llama-shaped model (bf16, random weights, each weight read once per step), per batch size.
No attention, norms or sampling: no engine can run a decode step faster than this with cuBLAS.
With --fp8 the weights are FP8 (per channel, half the bytes; the LM head stays bf16, as meshserve
serves it) and each layer runs meshserve's FP8 path (per-token activation quantization +
torch._scaled_mm): the floor of `--quantization fp8`.

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --batch-size 1 64 256 [--fp8]
"""

from __future__ import annotations

import argparse

import torch

from meshserve.bench.random_model import SHAPES


def linear_floor_ms(shape: str, batch_size: int, *, iters: int = 50, fp8: bool = False) -> float:
    cfg = SHAPES[shape]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    dev, dt = "cuda", torch.bfloat16
    layers = [(torch.randn(h + 2 * kv, h, device=dev, dtype=dt), torch.randn(h, h, device=dev, dtype=dt),
               torch.randn(2 * i, h, device=dev, dtype=dt), torch.randn(h, i, device=dev, dtype=dt))
              for _ in range(cfg["num_hidden_layers"])]
    lm_head = torch.randn(v, h, device=dev, dtype=dt)
    x = torch.randn(batch_size, h, device=dev, dtype=dt)
    if fp8:
        from meshserve.layers.fp8 import fp8_linear, quantize_per_channel

        quantized = [[quantize_per_channel(w) for w in layer] for layer in layers]
        del layers

        def matmul(y: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return fp8_linear(y, w[0], w[1], path="scaled_mm", bias=None)

        layers = quantized
    else:
        def matmul(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return y @ w.T

    def step() -> torch.Tensor:
        y = x
        for qkv, o, gate_up, down in layers:
            y = y + matmul(matmul(y, qkv)[:, :h].contiguous(), o)
            y = y + matmul(matmul(y, gate_up)[:, :i].contiguous(), down)
        return y @ lm_head.T

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--fp8", action="store_true", help="FP8 weights and meshserve's FP8 GEMM path")
    ns = parser.parse_args(argv)
    print(f"{'batch':>6} {'floor ms/step':>14} {'tok/s':>10}")
    for bs in ns.batch_size:
        ms = linear_floor_ms(ns.shape, bs, fp8=ns.fp8)
        print(f"{bs:>6} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
