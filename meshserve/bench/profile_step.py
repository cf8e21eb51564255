"""Where one engine step's time goes: runs a prefill of one prompt of each `--input-len` (and a
few decode steps) through the real Scheduler, times each prefill, and prints torch.profiler's
table of the heaviest operators of the last one. `--decode-batch-size B` instead profiles ten
decode steps of B sequences (kernels inside CUDA graphs are listed too; add
`--disable-cuda-graph` to see the eager launches).

  python -m meshserve.bench.profile_step --model-path DIR --input-len 256 2048 4096 [--top 25]
  python -m meshserve.bench.profile_step --model-path DIR --input-len 256 --decode-batch-size 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.model_runner import ModelRunner
from meshserve.messages import GenerateReq
from meshserve.sampling_params import SamplingParams
from meshserve.scheduler.scheduler import Scheduler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--input-len", type=int, nargs="+", default=[2048])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--decode-batch-size", type=int, default=0)
    ns, extra = parser.parse_known_args(argv)
    args = ServerArgs.parse_args(["--model-path", ns.model_path, "--skip-tokenizer-init", "--disable-radix-cache",
                                  *extra]).validate()
    model_config = ModelConfig.from_server_args(args)
    device = torch.device(args.resolved_device())
    scheduler = Scheduler(args, model_config, ModelRunner(args, model_config, device=device, groups=ParallelGroups.single()))
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)

    def prefill(n: int, rid: str) -> float:
        ids = torch.randint(0, model_config.vocab_size, (n,), generator=gen).tolist()
        scheduler.add_request(GenerateReq(rid=rid, input_ids=ids, sampling=sampling))
        torch.cuda.synchronize()
        start = time.perf_counter()
        scheduler.step()  # the extend step; it ends in a host read of the sampled token
        elapsed = time.perf_counter() - start
        while scheduler.has_work:
            scheduler.step()
        scheduler.take_outputs()
        return elapsed * 1e3

    for n in ns.input_len:
        times = [prefill(n, f"{n}-{i}") for i in range(4)]
        print(f"prefill of {n} tokens: {', '.join(f'{t:.1f}' for t in times)} ms "
              f"({n / min(times) * 1e3:.0f} tok/s at best)")
    if ns.decode_batch_size:
        decoding = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
        for i in range(ns.decode_batch_size):
            ids = torch.randint(0, model_config.vocab_size, (ns.input_len[-1],), generator=gen).tolist()
            scheduler.add_request(GenerateReq(rid=f"decode-{i}", input_ids=ids, sampling=decoding))
        for _ in range(16):  # the prefills, then a few decode steps to settle
            scheduler.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                scheduler.step()
            torch.cuda.synchronize()
        while scheduler.has_work:
            scheduler.step()
    else:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill(ns.input_len[-1], "profiled")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=ns.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
