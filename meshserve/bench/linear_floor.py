"""The linear-layer floor of a decode step: a CUDA-graph replay of only the linear layers of a
Llama-shaped model (bf16, random weights, each weight read once per step), per batch size.
No attention, norms or sampling: no engine can run a decode step faster than this with cuBLAS.

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --batch-size 1 64 256
"""

from __future__ import annotations

import argparse

import torch

from meshserve.bench.random_model import SHAPES


def linear_floor_ms(shape: str, batch_size: int, *, iters: int = 50) -> float:
    cfg = SHAPES[shape]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    dev, dt = "cuda", torch.bfloat16
    layers = [(torch.randn(h + 2 * kv, h, device=dev, dtype=dt), torch.randn(h, h, device=dev, dtype=dt),
               torch.randn(2 * i, h, device=dev, dtype=dt), torch.randn(h, i, device=dev, dtype=dt))
              for _ in range(cfg["num_hidden_layers"])]
    lm_head = torch.randn(v, h, device=dev, dtype=dt)
    x = torch.randn(batch_size, h, device=dev, dtype=dt)

    def step() -> torch.Tensor:
        y = x
        for qkv, o, gate_up, down in layers:
            y = y + (y @ qkv.T)[:, :h] @ o.T
            y = y + (y @ gate_up.T)[:, :i] @ down.T
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
    ns = parser.parse_args(argv)
    print(f"{'batch':>6} {'floor ms/step':>14} {'tok/s':>10}")
    for bs in ns.batch_size:
        ms = linear_floor_ms(ns.shape, bs)
        print(f"{bs:>6} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
