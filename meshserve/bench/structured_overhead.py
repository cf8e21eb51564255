"""What structured output costs per decode step: the same batch decoded plain, under a regex and
under a JSON schema, in one engine (xgrammar masks, --grammar-backend xgrammar):

  python -m meshserve.bench.structured_overhead --model-path DIR [--batch-size 1 64] [launch_server flags]

Every request of a batch starts at once with the same prompt length and `--output-len` new
tokens; a step's time is the gap between two consecutive streamed outputs of a request. The
median gap of each mode, and its difference from the plain one, is the per-step overhead of the
grammar (mask fill on the host, the masked sampling on the device). The regex never has to end,
so those runs decode their full length under `ignore_eos`; a JSON schema closes when the model
closes its object, so its median covers however many steps its requests ran (the count is printed).
The model needs a real tokenizer (xgrammar reads its vocabulary); a random model of a shape with
`random_model --vocab-size` equal to the tokenizer's serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from meshserve.config.server_args import ServerArgs
from meshserve.engine import AsyncEngine

REGEX = r"[a-z]+( [a-z]+)*"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 100}},
    },
    "required": ["name", "tags", "scores"],
}
MODES: dict[str, dict] = {"plain": {}, "regex": {"regex": REGEX}, "json_schema": {"json_schema": json.dumps(SCHEMA)}}


async def _gaps(engine: AsyncEngine, prompt: str, params: dict) -> list[float]:
    """Seconds between consecutive outputs of one streamed request (its decode steps)."""
    stamps = []
    async for _ in engine.generate(prompt, params):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


async def _run(ns: argparse.Namespace, server_argv: list[str]) -> list[dict]:
    engine = await AsyncEngine.create(args=ServerArgs.from_cli(["--model-path", ns.model_path, *server_argv]))
    prompt = " ".join(["word"] * ns.input_len)
    rows = []
    try:
        for batch_size in ns.batch_size:
            plain_ms = None
            for mode, grammar in MODES.items():
                params = {"max_new_tokens": ns.output_len, "temperature": 0, "ignore_eos": mode != "json_schema",
                          **grammar}
                await asyncio.gather(*(_gaps(engine, prompt, params) for _ in range(batch_size)))  # warm-up
                runs = await asyncio.gather(*(_gaps(engine, prompt, params) for _ in range(batch_size)))
                gaps = [g for run in runs for g in run]
                step_ms = statistics.median(gaps) * 1e3 if gaps else float("nan")
                plain_ms = step_ms if mode == "plain" else plain_ms
                rows.append({"batch_size": batch_size, "mode": mode, "steps": len(gaps), "step_ms": step_ms,
                             "overhead_ms": step_ms - plain_ms})
                print(f"batch {batch_size:>4} {mode:>12}: {len(gaps):>6} steps, median {step_ms:7.3f} ms/step, "
                      f"overhead {step_ms - plain_ms:+7.3f} ms", flush=True)
    finally:
        await engine.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-len", type=int, default=64, help="prompt words")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-file", help="append one JSON line per (batch size, mode)")
    ns, server_argv = parser.parse_known_args(argv)
    rows = asyncio.run(_run(ns, server_argv))
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
