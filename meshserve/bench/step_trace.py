"""Summarise a --step-trace-file: where a run's time went, by step kind and decode batch size.

    python -m meshserve.bench.step_trace TRACE.jsonl [--pool-size N] [--kv-bytes-per-token B]

A step's time is the gap from its launch to the next step's launch (the last step has none and
is left out). Gaps longer than --idle-gap-s count as idle (no work), not as the step's time.

Decode steps are also fitted (least squares) as a fixed cost per step plus a cost per token of
KV the step reads: a decode step reads every running sequence's whole context, so the slope is
the engine's KV read rate in the run (in TB/s with --kv-bytes-per-token) and the intercept what
each step pays besides (weights, launches, sampling).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import msgspec

from meshserve.scheduler.step_log import StepRecord

BATCH_BANDS = (1, 2, 8, 32, 64, 128, 256, 512, 1024)


def load(path: Path) -> list[StepRecord]:
    decoder = msgspec.json.Decoder(StepRecord)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def band(n: int) -> str:
    low = 1
    for high in BATCH_BANDS:
        if n <= high:
            return f"{low}-{high}"
        low = high + 1
    return f">{BATCH_BANDS[-1]}"


def fit_decode(times_ms: list[float], kv_tokens: list[int]) -> tuple[float, float, float] | None:
    """(ms per step, ms per KV token, median relative error) of the least-squares line; None
    without spread in KV. One line for every batch size: at large batches the linear layers'
    time grows with the batch, which correlates with KV, so read it as a run's average."""
    n = len(times_ms)
    if n < 2:
        return None
    mean_kv, mean_t = sum(kv_tokens) / n, sum(times_ms) / n
    var = sum((k - mean_kv) ** 2 for k in kv_tokens)
    if var == 0:
        return None
    slope = sum((k - mean_kv) * (t - mean_t) for k, t in zip(kv_tokens, times_ms)) / var
    fixed = mean_t - slope * mean_kv
    errors = sorted(abs(fixed + slope * k - t) / t for k, t in zip(kv_tokens, times_ms))
    return fixed, slope, errors[n // 2]


def summarise(steps: list[StepRecord], idle_gap_s: float, pool_size: int | None,
              kv_bytes_per_token: int | None = None) -> str:
    lines: list[str] = []
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # steps, seconds, tokens
    bands: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    idle = 0.0
    decode_ms: list[float] = []
    decode_kv: list[int] = []
    for i, (step, following) in enumerate(zip(steps, steps[1:])):
        gap = following.t - step.t
        if gap > idle_gap_s:
            idle += gap
            continue
        # The fit takes decode steps amid decode steps only: with overlap scheduling a launch
        # waits for the step before, so a gap next to a prefill step holds some of its time.
        if step.mode == following.mode == "decode" and i > 0 and steps[i - 1].mode == "decode":
            decode_ms.append(1e3 * gap)
            decode_kv.append(step.kv_used)
        for table, key in ((kinds, step.mode), *(((bands, band(step.seqs)),) if step.mode == "decode" else ())):
            row = table[key]
            row[0] += 1
            row[1] += gap
            row[2] += step.tokens
    span = steps[-1].t - steps[0].t
    busy = span - idle
    lines.append(f"{len(steps)} steps over {span:.2f} s ({idle:.2f} s idle in gaps > {idle_gap_s} s); "
                 f"retractions {steps[-1].retracted - steps[0].retracted}")
    lines.append("kind     steps   seconds  share  tokens    ms/step  tokens/s")
    for kind in ("prefill", "mixed", "decode"):
        if kind in kinds:
            n, s, tok = kinds[kind]
            lines.append(f"{kind:8s} {n:6d} {s:9.2f} {s / busy:6.1%} {tok:8d} {1e3 * s / n:9.2f} {tok / s:9.0f}")
    if bands:
        lines.append("decode steps by batch size:")
        lines.append("batch      steps   seconds  share  ms/step  tokens/s")
        for key in sorted(bands, key=lambda k: int(k.lstrip(">").split("-")[0])):
            n, s, tok = bands[key]
            lines.append(f"{key:9s} {n:6d} {s:9.2f} {s / busy:6.1%} {1e3 * s / n:8.2f} {tok / s:9.0f}")
    fit = fit_decode(decode_ms, decode_kv)
    if fit is not None:
        fixed, per_token, error = fit
        line = f"decode step fit: {fixed:.2f} ms + {1e5 * per_token:.3f} ms per 100k KV tokens"
        if kv_bytes_per_token and per_token > 0:
            line += f" (KV read at {kv_bytes_per_token / (per_token * 1e-3) / 1e12:.2f} TB/s)"
        lines.append(f"{line}; median error {error:.1%} over {len(decode_ms)} steps amid decode steps")
    if pool_size:
        used = [step.kv_used / pool_size for step in steps if step.mode == "decode"]
        if used:
            used.sort()
            lines.append(f"KV usage at decode steps: median {used[len(used) // 2]:.2f}, "
                         f"p90 {used[int(len(used) * 0.9)]:.2f}, max {used[-1]:.2f}")
    last_waiting = max((i for i, step in enumerate(steps) if step.waiting), default=None)
    if last_waiting is not None and last_waiting + 1 < len(steps):
        drained_from = steps[last_waiting + 1].t
        tail = steps[-1].t - drained_from
        lines.append(f"queue empty from t={drained_from - steps[0].t:.2f} s: the last {tail:.2f} s "
                     f"({tail / span:.1%} of the span) drain the running sequences")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--idle-gap-s", type=float, default=1.0)
    parser.add_argument("--pool-size", type=int, default=None, help="KV pool size in tokens (the log's 'KV cache: N tokens')")
    parser.add_argument("--kv-bytes-per-token", type=int, default=None,
                        help="the model's KV bytes per token over all layers (Llama-3.1-8B in bf16: 131072)")
    args = parser.parse_args()
    print(summarise(load(args.trace), args.idle_gap_s, args.pool_size, args.kv_bytes_per_token))


if __name__ == "__main__":
    main()
