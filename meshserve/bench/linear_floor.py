"""The linear-layer floor of a decode step: a CUDA-graph replay of only the linear layers of a
Llama-shaped model (bf16, random weights, each weight read once per step), per batch size.
No attention, norms or sampling: no engine can run a decode step faster than this with cuBLAS.
Every layer has weights of its own (32 distinct sets for the 8B shape, 7.5 to 15 GB), so the
50 MB L2 cannot hold a step's weights and the floor is the HBM stream, as in serving.
With --fp8 the weights are FP8 (per channel, half the bytes; the LM head stays bf16, as meshserve
serves it) and each layer runs meshserve's FP8 path as served (`fp8_linear`: the skinny W8A16
kernel up to SKINNY_MAX_M rows, per-token activation quantization + torch._scaled_mm above):
the floor of `--quantization fp8`.

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --batch-size 1 64 256 [--fp8]

--compare-fp8 times each FP8 GEMM at every batch size, whatever fp8_linear would choose (to
tune SKINNY_MAX_M): bf16 cuBLAS, FP8 `_scaled_mm` (with its activation quantization), and the
skinny W8A16 kernel, one CUDA graph per (GEMM, batch size), same weights for both FP8 columns:

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --compare-fp8

--compare-dense does the same for bf16 weights: cuBLAS, and the skinny kernel (layers/dense.py)
with and without programmatic dependent launch:

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --compare-dense

--read-floor replaces every GEMM of the step by a plain read of its weight (bench/weight_stream.py:
no activations, no arithmetic), in the same CUDA graph of one kernel per weight: the floor of any
decode step that launches a kernel per linear layer, whatever that kernel computes.

  python -m meshserve.bench.linear_floor --shape llama-3.1-8b --read-floor

For a mixture-of-experts shape (qwen3-30b-a3b, deepseek-v2-lite) the floor is computed, not
measured: the bytes of the weights a decode step must read — attention, dense layers, shared
experts, router gates, the LM head, and the routed experts the batch's tokens touch (expected
E·(1 − (1 − k/E)^B) distinct experts per layer for B tokens routed uniformly to k of E) — over
the HBM bandwidth (--bandwidth-tbs, 4.8 TB/s for an H200):

  python -m meshserve.bench.linear_floor --shape qwen3-30b-a3b --batch-size 1 64 256
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from meshserve.bench.random_model import SHAPES, is_sparse_layer, num_experts, tensor_shapes

# The GEMM each layer runs: bf16 cuBLAS; FP8 as meshserve serves it (fp8_linear); one FP8 GEMM at
# every batch size; or, for bf16 weights, the skinny kernel with and without programmatic
# dependent launch (LM head included).
GEMMS = ("bf16", "fp8", "scaled_mm", "skinny", "dense_skinny", "dense_skinny_nopdl", "read")
DENSE_GEMMS = ("bf16", "dense_skinny", "dense_skinny_nopdl")
COMPARE_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]


class LinearStack:
    """The linear layers of `shape` on the GPU: per layer qkv, o, gate_up, down, then the bf16
    LM head. Built once; `floor_ms` captures and times one decode step per (GEMM, batch)."""

    def __init__(self, shape: str, *, fp8: bool) -> None:
        cfg = SHAPES[shape]
        self.h, self.i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        h, i = self.h, self.i
        kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
        dev, dt = "cuda", torch.bfloat16
        from meshserve.layers.fp8 import quantize_per_channel

        def weight(n: int, k: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            w = torch.randn(n, k, device=dev, dtype=dt)
            return quantize_per_channel(w) if fp8 else w  # FP8: one bf16 weight alive at a time

        dims = ((h + 2 * kv, h), (h, h), (2 * i, h), (h, i))
        self.layers = [[weight(n, k) for n, k in dims] for _ in range(cfg["num_hidden_layers"])]
        self.lm_head = torch.randn(v, h, device=dev, dtype=dt)
        # Weight bytes a step reads (scales included): the HBM traffic the floor is bound by.
        self.weight_bytes = sum(t.numel() * t.element_size() for layer in self.layers for w in layer
                                for t in (w if fp8 else (w,))) + self.lm_head.numel() * self.lm_head.element_size()

    def _matmul(self, gemm: str) -> Callable:
        from meshserve.layers.fp8 import fp8_linear, scaled_mm_linear

        if gemm == "bf16":
            return lambda y, w: y @ w.T
        if gemm == "fp8":
            return lambda y, w: fp8_linear(y, w[0], w[1], path="scaled_mm", bias=None)
        if gemm == "scaled_mm":
            return lambda y, w: scaled_mm_linear(y, w[0], w[1], bias=None)
        from meshserve.layers.kernels.skinny_gemm import skinny_linear

        if gemm == "dense_skinny":
            return lambda y, w: skinny_linear(y, w, pdl=True)
        if gemm == "dense_skinny_nopdl":
            return lambda y, w: skinny_linear(y, w)
        return lambda y, w: skinny_linear(y, w[0], w[1])

    def _step(self, gemm: str, batch_size: int) -> Callable[[], object]:
        """One decode step's linear layers with `gemm`, each layer's output feeding the next; for
        "read", each weight streamed by a plain read instead (no activations)."""
        if gemm == "read":
            from meshserve.bench.weight_stream import stream as read_weight

            def read_step() -> None:
                for layer in self.layers:
                    for w in layer:
                        read_weight(w)
                read_weight(self.lm_head)

            return read_step
        matmul, h, i = self._matmul(gemm), self.h, self.i
        head = matmul if gemm in DENSE_GEMMS else self._matmul("bf16")
        x = torch.randn(batch_size, h, device="cuda", dtype=torch.bfloat16)

        def step() -> torch.Tensor:
            y = x
            for qkv, o, gate_up, down in self.layers:
                y = y + matmul(matmul(y, qkv)[:, :h].contiguous(), o)
                y = y + matmul(matmul(y, gate_up)[:, :i].contiguous(), down)
            return head(y, self.lm_head)

        return step

    def floor_ms(self, gemm: str, batch_size: int, iters: int = 50) -> float:
        """Median time of one CUDA-graph replay of a decode step's linear layers."""
        step = self._step(gemm, batch_size)
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
        del graph
        return sorted(times)[len(times) // 2]


def linear_floor_ms(shape: str, batch_size: int, *, iters: int = 50, fp8: bool = False) -> float:
    """The floor of one batch size, bf16 or FP8 as served (builds and frees the weights)."""
    return LinearStack(shape, fp8=fp8).floor_ms("fp8" if fp8 else "bf16", batch_size, iters)


def compare_fp8(shape: str, batch_sizes: list[int]) -> None:
    """Prints the floor of bf16, `_scaled_mm` and the skinny kernel at each batch size."""
    from meshserve.layers.fp8 import SKINNY_MAX_M

    floors: dict[str, dict[int, float]] = {}
    step_bytes = {}
    for fp8, gemms in ((False, ("bf16",)), (True, ("scaled_mm", "skinny"))):
        stack = LinearStack(shape, fp8=fp8)
        step_bytes[fp8] = stack.weight_bytes
        for gemm in gemms:
            floors[gemm] = {bs: stack.floor_ms(gemm, bs) for bs in batch_sizes}
        del stack
        torch.cuda.empty_cache()
    print(f"{shape}: linear floor ms/step in CUDA graphs (LM head bf16 in all); weights read per step: "
          f"bf16 {step_bytes[False] / 2**30:.2f} GiB, fp8 {step_bytes[True] / 2**30:.2f} GiB; "
          f"fp8_linear takes the skinny kernel up to SKINNY_MAX_M = {SKINNY_MAX_M} rows")
    print(f"{'batch':>6} {'bf16':>9} {'scaled_mm':>10} {'skinny':>9} {'bf16/skinny':>12} {'scaled_mm/skinny':>17} "
          f"{'bf16 TB/s':>10} {'skinny TB/s':>12}")
    for bs in batch_sizes:
        b, s, k = floors["bf16"][bs], floors["scaled_mm"][bs], floors["skinny"][bs]
        print(f"{bs:>6} {b:>9.3f} {s:>10.3f} {k:>9.3f} {b / k:>12.2f} {s / k:>17.2f} "
              f"{step_bytes[False] / b / 1e9:>10.2f} {step_bytes[True] / k / 1e9:>12.2f}")


def compare_dense(shape: str, batch_sizes: list[int]) -> None:
    """Prints the bf16 floor with cuBLAS and with the skinny kernel, PDL on and off, per batch size
    (dense.SKINNY_MAX_M says which rows meshserve gives the skinny kernel)."""
    from meshserve.layers.dense import SKINNY_MAX_M

    stack = LinearStack(shape, fp8=False)
    floors = {gemm: {bs: stack.floor_ms(gemm, bs) for bs in batch_sizes} for gemm in DENSE_GEMMS}
    print(f"{shape}: bf16 linear floor ms/step in CUDA graphs, {stack.weight_bytes / 1e9:.2f} GB of weights per "
          f"step; meshserve takes the skinny kernel up to SKINNY_MAX_M = {SKINNY_MAX_M} rows")
    print(f"{'batch':>6} {'cuBLAS':>9} {'skinny+PDL':>11} {'skinny':>9} {'cuBLAS/PDL':>11} {'cuBLAS TB/s':>12} "
          f"{'PDL TB/s':>9}")
    for bs in batch_sizes:
        c, p, n = (floors[gemm][bs] for gemm in DENSE_GEMMS)
        print(f"{bs:>6} {c:>9.3f} {p:>11.3f} {n:>9.3f} {c / p:>11.3f} {stack.weight_bytes / c / 1e9:>12.2f} "
              f"{stack.weight_bytes / p / 1e9:>9.2f}")
    print_read_floor(stack)


def print_read_floor(stack: LinearStack) -> None:
    read = stack.floor_ms("read", 1)
    print(f"weights streamed by a plain read, one kernel per weight (no arithmetic): {read:.3f} ms/step, "
          f"{stack.weight_bytes / read / 1e9:.2f} TB/s")


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
    parser.add_argument("--batch-size", type=int, nargs="+")
    parser.add_argument("--fp8", action="store_true", help="FP8 weights and meshserve's FP8 GEMM path")
    parser.add_argument("--compare-fp8", action="store_true",
                        help="bf16, _scaled_mm and the skinny FP8 kernel at each batch size (default 1..64)")
    parser.add_argument("--compare-dense", action="store_true",
                        help="bf16: cuBLAS and the skinny kernel with and without PDL at each batch size (default 1..64)")
    parser.add_argument("--read-floor", action="store_true",
                        help="bf16: a plain read of each weight in place of its GEMM (the floor below any GEMM)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM bandwidth for the MoE floor (TB/s)")
    ns = parser.parse_args(argv)
    sizes = ns.batch_size or (COMPARE_BATCH_SIZES if ns.compare_fp8 or ns.compare_dense else [1, 64, 256])
    if num_experts(SHAPES[ns.shape]):
        if ns.compare_fp8 or ns.compare_dense or ns.fp8 or ns.read_floor:
            parser.error(f"--fp8, --compare-fp8, --compare-dense and --read-floor measure dense shapes; {ns.shape} is a mixture of experts")
        sparse = sum(is_sparse_layer(SHAPES[ns.shape], n) for n in range(SHAPES[ns.shape]["num_hidden_layers"]))
        print(f"{ns.shape}: {sparse} MoE layers; floor = active weight bytes / {ns.bandwidth_tbs} TB/s (bf16)")
        print(f"{'batch':>6} {'active GB':>10} {'floor ms/step':>14} {'tok/s':>10}")
        for bs in sizes:
            active = moe_active_bytes(ns.shape, bs)
            ms = active / (ns.bandwidth_tbs * 1e12) * 1e3
            print(f"{bs:>6} {active / 1e9:>10.2f} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")
        return
    if ns.compare_fp8:
        compare_fp8(ns.shape, sizes)
        return
    if ns.compare_dense:
        compare_dense(ns.shape, sizes)
        return
    if ns.read_floor:
        print_read_floor(LinearStack(ns.shape, fp8=False))
        return
    print(f"{'batch':>6} {'floor ms/step':>14} {'tok/s':>10}")
    for bs in sizes:
        ms = linear_floor_ms(ns.shape, bs, fp8=ns.fp8)
        print(f"{bs:>6} {ms:>14.3f} {bs / ms * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
