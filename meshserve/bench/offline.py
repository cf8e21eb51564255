"""Offline throughput through the in-process Engine, after SGLang's bench_offline_throughput:
random token-id prompts (SGLang's --random-range-ratio semantics), every request submitted at
once (request rate infinite), ignore_eos, greedy.

  python -m meshserve.bench_offline_throughput --model-path DIR --num-prompts 500 \\
      --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from meshserve.bench.datasets import RANGE_RATIO_HELP, sample_lengths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--random-input-len", type=int, default=4096)
    parser.add_argument("--random-output-len", type=int, default=2048)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help=RANGE_RATIO_HELP)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-file")
    ns, extra = parser.parse_known_args(argv)

    from meshserve.config.server_args import ServerArgs
    from meshserve.engine import Engine

    # Any launch_server flag may follow (e.g. --mem-fraction-static 0.85 --cuda-graph-max-bs 256).
    args = ServerArgs.parse_args(["--model-path", ns.model_path, "--skip-tokenizer-init", *extra])
    rng = np.random.default_rng(ns.seed)
    input_lens = sample_lengths(rng, ns.random_input_len, ns.random_range_ratio, ns.num_prompts)
    output_lens = sample_lengths(rng, ns.random_output_len, ns.random_range_ratio, ns.num_prompts)
    with Engine(**{f: args.get(f) for f in args.explicit_flags}) as engine:
        vocab = engine.model_config.vocab_size
        prompts = [rng.integers(0, vocab, int(n)).tolist() for n in input_lens]
        params = [{"max_new_tokens": int(n), "ignore_eos": True, "temperature": 0} for n in output_lens]
        engine.generate(input_ids=[prompts[0][:16]], sampling_params=[{"max_new_tokens": 4}])  # warm-up
        start = time.perf_counter()
        results = engine.generate(input_ids=prompts, sampling_params=params)
        duration = time.perf_counter() - start
    out_tokens = sum(len(r["output_ids"]) for r in results)
    report = {"num_prompts": ns.num_prompts, "input_tokens": int(input_lens.sum()), "output_tokens": out_tokens,
              "duration_s": duration, "request_throughput": ns.num_prompts / duration,
              "output_throughput": out_tokens / duration,
              "total_throughput": (int(input_lens.sum()) + out_tokens) / duration,
              "random_range_ratio": ns.random_range_ratio}
    print(f"Offline: {ns.num_prompts} prompts, input {report['input_tokens']} tokens, output {out_tokens} tokens, "
          f"range ratio {ns.random_range_ratio} (SGLang semantics)")
    print(f"Duration {duration:.1f} s; output throughput {report['output_throughput']:.0f} tok/s "
          f"(output tokens / wall time); total {report['total_throughput']:.0f} tok/s; "
          f"{report['request_throughput']:.2f} req/s")
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
