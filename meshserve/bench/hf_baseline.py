"""Plain-transformers baseline for ``bench_serving``: the same prompts through ``model.generate``.

    python -m meshserve.bench.hf_baseline --model-path DIR --dataset-name random-ids \\
        --num-prompts 64 --random-input-len 1024 --random-output-len 1024 \\
        --random-range-ratio 1.0 --seed 1 --batch-size 8

Prompts come from :func:`meshserve.bench.datasets.generate_requests` with the model's own
tokenizer, so the same flags give exactly the prompts ``bench_serving`` sends to a server
serving the same model directory.

What is measured, and how it differs from a serving engine:

* Greedy decoding; EOS is ignored by ``min_new_tokens = max_new_tokens`` (the counterpart of
  ``ignore_eos``).
* Requests run in order, ``--batch-size`` at a time (left padding). ``generate`` cannot retire
  a request early, so a batch runs to its longest requested output; only each request's own
  requested tokens are counted as output, and each request's latency is its batch's time.
* Output token throughput = counted output tokens / total wall time of the timed batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from meshserve.bench.datasets import DATASET_NAMES, RANGE_RATIO_HELP, BenchRequest, generate_requests


@dataclass
class BaselineResult:
    model_path: str
    device: str
    dtype: str
    batch_size: int
    num_requests: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # requests / wall time
    input_throughput: float  # input tokens / wall time
    output_throughput: float  # output tokens / wall time
    total_throughput: float  # (input + output) tokens / wall time
    mean_latency_ms: float  # mean over requests of their batch's generate() time
    median_latency_ms: float
    p99_latency_ms: float


def pad_left(batch: Sequence[BenchRequest], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad token ids (decoder-only models continue from the right edge) + attention mask."""
    width = max(len(r.input_ids) for r in batch)
    ids = [[pad_id] * (width - len(r.input_ids)) + list(r.input_ids) for r in batch]
    mask = [[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch]
    return ids, mask


def _pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(model_path: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    # float32 on CPU (bf16 matmuls are slow and inexact there); on GPU the checkpoint's dtype,
    # which is what a serving engine would run.
    dtype: Any = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    return model, tokenizer


def _generate(model: Any, batch: Sequence[BenchRequest], pad_id: int, device: str) -> float:
    """Run one batch; returns its wall time in seconds (device work included)."""
    import torch

    ids, mask = pad_left(batch, pad_id)
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
    new_tokens = max(r.output_len for r in batch)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # suppresses EOS until the end: ignore_eos
            pad_token_id=pad_id,
        )
    sync()
    elapsed = time.perf_counter() - start
    produced = out.shape[1] - input_ids.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens, expected {new_tokens}")
    return elapsed


def run_baseline(args: argparse.Namespace) -> BaselineResult:
    device = _pick_device(args.device)
    model, tokenizer = _load(args.model_path, device)
    requests = generate_requests(
        tokenizer,
        dataset_name=args.dataset_name,
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        seed=args.seed,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # masked out by attention_mask, so any id will do

    print(
        f"HF baseline: {args.model_path} on {device} ({model.dtype}), batch size {args.batch_size}, "
        f"{len(requests)} prompts, dataset {args.dataset_name}, seed {args.seed}\n"
        f"Random range ratio: {args.random_range_ratio} (SGLang semantics: lengths uniform in "
        f"[max(1, int(LEN*{args.random_range_ratio})), LEN]); input LEN={args.random_input_len} "
        f"(mean {np.mean([r.prompt_len for r in requests]):.1f}), output LEN={args.random_output_len} "
        f"(mean {np.mean([r.output_len for r in requests]):.1f})",
        flush=True,
    )

    # Untimed warm-up (kernel selection, allocator growth), on the first prompt, few tokens.
    for _ in range(args.warmup_requests):
        first = requests[0]
        _generate(model, [BenchRequest(first.prompt, first.input_ids, first.prompt_len, min(first.output_len, 16))], pad_id, device)

    latencies: list[float] = []
    duration = 0.0
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i : i + args.batch_size]
        elapsed = _generate(model, batch, pad_id, device)
        duration += elapsed
        latencies.extend([elapsed] * len(batch))
        if not args.disable_tqdm:
            print(f"  batch {i // args.batch_size + 1}: {len(batch)} requests in {elapsed:.2f} s", file=sys.stderr, flush=True)

    total_in = sum(r.prompt_len for r in requests)
    total_out = sum(r.output_len for r in requests)
    lat_ms = np.asarray(latencies) * 1000.0
    return BaselineResult(
        model_path=args.model_path,
        device=device,
        dtype=str(model.dtype),
        batch_size=args.batch_size,
        num_requests=len(requests),
        duration_s=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(requests) / duration,
        input_throughput=total_in / duration,
        output_throughput=total_out / duration,
        total_throughput=(total_in + total_out) / duration,
        mean_latency_ms=float(lat_ms.mean()),
        median_latency_ms=float(np.median(lat_ms)),
        p99_latency_ms=float(np.percentile(lat_ms, 99)),
    )


def format_report(r: BaselineResult) -> str:
    width = 50
    rows = [" HF transformers Baseline Result ".center(width, "=")]

    def row(name: str, value: Any) -> None:
        rows.append(f"{name:<40} {value:<10}")

    row("Device / dtype:", f"{r.device} / {r.dtype}")
    row("Batch size:", r.batch_size)
    row("Successful requests:", r.num_requests)
    row("Benchmark duration (s):", f"{r.duration_s:.2f}")
    row("Total input tokens:", r.total_input_tokens)
    row("Total generated tokens:", r.total_output_tokens)
    row("Request throughput (req/s):", f"{r.request_throughput:.2f}")
    row("Input token throughput (tok/s):", f"{r.input_throughput:.2f}")
    row("Output token throughput (tok/s):", f"{r.output_throughput:.2f}")
    rows.append("  (output tokens / wall time, input excluded)")
    row("Total token throughput (tok/s):", f"{r.total_throughput:.2f}")
    rows.append(" End-to-End Latency ".center(width, "-"))
    row("Mean E2E Latency (ms):", f"{r.mean_latency_ms:.2f}")
    row("Median E2E Latency (ms):", f"{r.median_latency_ms:.2f}")
    row("P99 E2E Latency (ms):", f"{r.p99_latency_ms:.2f}")
    rows.append("=" * width)
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshserve.bench.hf_baseline",
        description="Run bench_serving's synthetic prompts through plain transformers generate().",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-path", required=True, help="Local HF model directory (its tokenizer builds the prompts).")
    p.add_argument("--dataset-name", choices=DATASET_NAMES, default="random-ids")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024, help="Input length LEN. " + RANGE_RATIO_HELP)
    p.add_argument("--random-output-len", type=int, default=1024, help="Output length LEN. " + RANGE_RATIO_HELP)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help=RANGE_RATIO_HELP)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="Requests per generate() call (left padding when > 1).")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N.")
    p.add_argument("--warmup-requests", type=int, default=1, help="Untimed generate() calls first (16 tokens each).")
    p.add_argument("--output-file", default=None, help="Append one JSON line with the result.")
    p.add_argument("--disable-tqdm", action="store_true", help="No per-batch progress lines.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    result = run_baseline(args)
    print(format_report(result), flush=True)
    if args.output_file:
        record = {"config": vars(args), "result": asdict(result)}
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
