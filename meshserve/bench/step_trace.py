"""Summarise a --step-trace-file: where a run's time went, by step kind and decode batch size.

    python -m meshserve.bench.step_trace TRACE.jsonl [--pool-size N]

A step's time is the gap from its launch to the next step's launch (the last step has none and
is left out). Gaps longer than --idle-gap-s count as idle (no work), not as the step's time.
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


def summarise(steps: list[StepRecord], idle_gap_s: float, pool_size: int | None) -> str:
    lines: list[str] = []
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # steps, seconds, tokens
    bands: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    idle = 0.0
    for step, following in zip(steps, steps[1:]):
        gap = following.t - step.t
        if gap > idle_gap_s:
            idle += gap
            continue
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
    args = parser.parse_args()
    print(summarise(load(args.trace), args.idle_gap_s, args.pool_size))


if __name__ == "__main__":
    main()
