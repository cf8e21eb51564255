"""The linear-layer floor of a decode step: a CUDA-graph replay of only the linear layers of a
Llama-shaped model (bf16, random weights, each weight read once per step), per batch size.
No attention, norms or sampling: no engine can run a decode step faster than this with cuBLAS.
With --fp8 the weights are FP8 (per channel, half the bytes; the LM head stays bf16, as meshserve
serves it) and each layer runs meshserve's FP8 path (per-token activation quantization +
torch._scaled_mm): the floor of `--quantization fp8`.

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --batch-size 1 64 256 [--fp8]

For a mixture-of-experts shape (qwen3-30b-a3b, deepseek-v2-lite) the floor is computed, not
measured: the bytes of the weights a decode step must read — attention, dense layers, shared
experts, router gates, the LM head, and the routed experts the batch's tokens touch (expected
E·(1 − (1 − k/E)^B) distinct experts per layer for B tokens routed uniformly to k of E) — over
the HBM bandwidth (--bandwidth-tbs, 4.8 TB/s for an H200):

  python -m meshserve.bench.linear_floor --shape qwen3-30b-a3b --batch-size 1 64 256
"""

from __future__ import annotations

import argparse

import torch

from meshserve.bench.random_model import SHAPES, is_sparse_layer, num_experts, tensor_shapes


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


def moe_active_bytes(shape: str, batch_size: int, bytes_per_param: int = 2) -> float:
    """Weight bytes one decode step of `batch_size` tokens reads (see the module docstring)."""
    cfg = SHAPES[shape]
    experts, top_k = num_experts(cfg), cfg["num_experts_per_tok"]
    touched = experts * (1 - (1 - top_k / experts) ** batch_size)
    params = 0.0
    for name, dims in tensor_shapes(cfg).items():
        size = float(torch.tensor(dims).prod()) if dims else 1.0
        if name == "model.embed_tokens.weight":
            continue  # a lookup reads batch_size rows, not the table
        if ".mlp.experts." in name:
            params += size * touched / experts  # each expert's tensors, weighted by the chance it is touched
        else:
            params += size
    return params * bytes_per_param


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--fp8", action="store_true", help="FP8 weights and meshserve's FP8 GEMM path")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM bandwidth for the MoE floor (TB/s)")
    ns = parser.parse_args(argv)
    if num_experts(SHAPES[ns.shape]):
        sparse = sum(is_sparse_layer(SHAPES[ns.shape], n) for n in range(SHAPES[ns.shape]["num_hidden_layers"]))
        print(f"{ns.shape}: {sparse} MoE layers; floor = active weight bytes / {ns.bandwidth_tbs} TB/s (bf16)")
        print(f"{'batch':>6} {'active GB':>10} {'floor ms/step':>14} {'tok/s':>10}")
        for bs in ns.batch_size:
            active = moe_active_bytes(ns.shape, bs)
            ms = active / (ns.bandwidth_tbs * 1e12) * 1e3
            print(f"{bs:>6} {active / 1e9:>10.2f} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")
        return
    print(f"{'batch':>6} {'floor ms/step':>14} {'tok/s':>10}")
    for bs in ns.batch_size:
        ms = linear_floor_ms(ns.shape, bs, fp8=ns.fp8)
        print(f"{bs:>6} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
