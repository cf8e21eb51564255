"""Greedy agreement of a quantized model with its bf16 original on real prompts: the same chat
prompts decoded greedily by two engines, one after the other (bf16, then the given flags), and
for every sequence the tokens before the first difference. Where they differ, the bf16 run's own
log-probabilities say whether it was a near-tie (its top two tokens within --tie-margin nats),
which any change of rounding may flip, or a real disagreement.

  python -m meshserve.bench.quant_agreement --model-path REAL_BF16_DIR [--quant-flags "--quantization fp8"]

Needs a real checkpoint and its tokenizer (random weights have flat logits: every step is a tie).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex

from meshserve.config.server_args import ServerArgs
from meshserve.engine import AsyncEngine
from meshserve.server.generation import GenerateRequest
from meshserve.sampling_params import SamplingParams

PROMPTS = [
    "Explain why the sky is blue in three sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it famous for?",
    "List five prime numbers and explain how you know they are prime.",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "What are the main differences between Python and C?",
    "Describe the water cycle to a ten-year-old.",
    "Why do we have seasons on Earth?",
    "Write a haiku about autumn leaves.",
    "What is machine learning?",
    "Give three tips for staying focused while studying.",
    "How many legs does a spider have, and why?",
    "Write a limerick about a cat who loves to code.",
]


@dataclasses.dataclass
class Decoded:
    ids: list[int]
    margins: list[float]  # top-1 minus top-2 logprob at each step (bf16 run)


async def _decode(argv: list[str], max_new_tokens: int) -> list[Decoded]:
    engine = await AsyncEngine.create(args=ServerArgs.from_cli(argv))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    async def one(prompt: str) -> Decoded:
        request = GenerateRequest(messages=[{"role": "user", "content": prompt}], sampling=sampling,
                                  return_logprob=True, top_logprobs_num=2)
        out = Decoded([], [])
        async for step in engine.stream(request):
            out.ids += step.token_ids
            out.margins += [top[0].logprob - top[1].logprob if len(top) > 1 else float("inf")
                            for top in step.top_logprobs]
        return out

    try:
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--quant-flags", default="--quantization fp8", help="launch_server flags of the second run")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    # bf16 logits of magnitude 16-32 lie 0.125 apart, so the bf16 run's own margins come in
    # steps of that size; two steps or less is within the rounding of the reference itself.
    parser.add_argument("--tie-margin", type=float, default=0.25, help="nats (default: two bf16 steps)")
    parser.add_argument("--output-file")
    ns, server_argv = parser.parse_known_args(argv)
    base = ["--model-path", ns.model_path, "--dtype", "bfloat16", *server_argv]
    ref = asyncio.run(_decode(base, ns.max_new_tokens))
    quant = asyncio.run(_decode([*base, *shlex.split(ns.quant_flags)], ns.max_new_tokens))
    rows = []
    for prompt, r, q in zip(PROMPTS, ref, quant):
        first = next((i for i, (a, b) in enumerate(zip(r.ids, q.ids)) if a != b), None)
        margin = r.margins[first] if first is not None else None
        rows.append({"prompt": prompt, "tokens": len(r.ids), "first_difference": first, "bf16_margin": margin,
                     "near_tie": margin is not None and margin <= ns.tie_margin})
        print(f"{'identical' if first is None else f'differs at {first:>3} (bf16 margin {margin:.3f})':>34}"
              f"  {len(r.ids):>3} tokens  {prompt[:48]}")
    same = sum(r["first_difference"] is None for r in rows)
    ties = sum(r["near_tie"] for r in rows)
    prefix = sum((r["first_difference"] if r["first_difference"] is not None else r["tokens"]) / max(1, r["tokens"])
                 for r in rows) / len(rows)
    print(f"{ns.quant_flags} vs bf16: {same}/{len(rows)} sequences identical, mean agreeing prefix {prefix:.1%}; "
          f"of the {len(rows) - same} that differ, {ties} first differ at a near-tie (<= {ns.tie_margin} nats)")
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
