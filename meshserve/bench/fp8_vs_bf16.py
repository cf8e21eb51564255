"""One command for the FP8-vs-bf16 comparison on one GPU (8B shape by default):

  python -m meshserve.bench.fp8_vs_bf16 --model-path /tmp/llama-3.1-8b-random [--shape llama-3.1-8b]

1. writes a random bf16 model of `--shape` at --model-path unless a config.json is there already
   (pass a real bf16 checkpoint to measure agreement on real weights);
2. runs bench_one_batch (batch 1 and 64 by default, 256 prompt tokens, 64 decode steps) twice in
   fresh processes: bf16, then `--quantization fp8` (per-channel FP8 weights quantized at load;
   up to SKINNY_MAX_M rows the skinny W8A16 kernel, above per-token activation scales and
   torch._scaled_mm);
3. measures the linear-layer floor of a decode step (bench.linear_floor) in bf16 and in FP8,
   and prints the weight bytes each reads per step;
4. greedy agreement: both runs decode the same seeded random-token prompts greedily; for every
   sequence, the tokens before the first difference (after which greedy outputs are unrelated).

Prints one table and writes the raw rows as JSON lines to --output-file when given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _one_batch(model_path: str, batch_sizes: list[int], input_len: int, output_len: int,
               extra: list[str]) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        subprocess.run([sys.executable, "-m", "meshserve.bench.one_batch", "--model-path", model_path,
                        "--batch-size", *map(str, batch_sizes), "--input-len", str(input_len),
                        "--output-len", str(output_len), "--output-file", out.name, *extra], check=True)
        return [json.loads(line) for line in Path(out.name).read_text().splitlines()]


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(mean fraction of each sequence's tokens before the first difference, fraction of
    sequences identical throughout)."""
    prefixes = []
    for x, y in zip(a, b):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefixes.append(same / max(1, len(x)))
    return sum(prefixes) / len(prefixes), sum(p == 1.0 for p in prefixes) / len(prefixes)


def _linear_bytes(shape: str) -> tuple[int, int]:
    """(bytes of the linear layers' weights, bytes of the LM head) per decode step, in bf16."""
    from meshserve.bench.random_model import SHAPES

    cfg = SHAPES[shape]
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = (h + 2 * kv) * h + h * h + 2 * i * h + h * i
    return 2 * layers * per_layer, 2 * cfg["vocab_size"] * h


def main(argv: list[str] | None = None) -> None:
    from meshserve.bench.random_model import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--output-file")
    ns, extra = parser.parse_known_args(argv)  # extra: launch_server flags for both runs

    if not (Path(ns.model_path) / "config.json").is_file():
        from meshserve.bench.random_model import write_random_model

        write_random_model(ns.shape, Path(ns.model_path), dtype="bfloat16", device="cuda")
    runs = {name: _one_batch(ns.model_path, ns.batch_size, ns.input_len, ns.output_len, [*extra, *flags])
            for name, flags in (("bf16", []), ("fp8", ["--quantization", "fp8"]))}

    from meshserve.bench.linear_floor import linear_floor_ms

    linear, lm_head = _linear_bytes(ns.shape)
    print(f"\nweights read per decode step: bf16 {(linear + lm_head) / 2**30:.2f} GiB, "
          f"fp8 {(linear / 2 + lm_head) / 2**30:.2f} GiB (linear layers FP8, LM head and embedding bf16)")
    print(f"{'batch':>6} {'bf16 tok/s':>11} {'fp8 tok/s':>10} {'speedup':>8} {'bf16 floor ms':>14} "
          f"{'fp8 floor ms':>13} {'fp8 step ms':>12} {'agree prefix':>13} {'identical seqs':>15}")
    rows = []
    for bf16, fp8 in zip(runs["bf16"], runs["fp8"]):
        bs = bf16["batch_size"]
        floors = {kind: linear_floor_ms(ns.shape, bs, fp8=kind == "fp8") for kind in ("bf16", "fp8")}
        prefix, identical = _agreement(bf16["output_ids"], fp8["output_ids"])
        row = {"batch_size": bs, "bf16": bf16, "fp8": fp8, "bf16_floor_ms": floors["bf16"],
               "fp8_floor_ms": floors["fp8"], "agreement_prefix": prefix, "identical_sequences": identical}
        rows.append(row)
        print(f"{bs:>6} {bf16['decode_tok_s']:>11.1f} {fp8['decode_tok_s']:>10.1f} "
              f"{fp8['decode_tok_s'] / bf16['decode_tok_s']:>8.2f} {floors['bf16']:>14.3f} {floors['fp8']:>13.3f} "
              f"{fp8['decode_step_ms_median']:>12.3f} {prefix:>13.3f} {identical:>15.3f}")
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
