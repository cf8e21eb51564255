"""Drive a real Scheduler in-process (no HTTP, no subprocess) for fast engine-level tests."""

from __future__ import annotations

from pathlib import Path

import torch

from meshserve.cluster.comm import SINGLE
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.model_runner import ModelRunner
from meshserve.messages import GenerateReq, ReqOutput
from meshserve.sampling_params import SamplingParams
from meshserve.scheduler.scheduler import Scheduler


def build_scheduler(model_dir: Path | str, *extra_args: str, device: str = "cpu") -> Scheduler:
    args = ServerArgs.parse_args(["--model-path", str(model_dir), "--device", device, *extra_args]).validate()
    model_config = ModelConfig.from_server_args(args)
    runner = ModelRunner(args, model_config, device=torch.device(device), tp=SINGLE)
    return Scheduler(args, model_config, runner)


def run_to_completion(scheduler: Scheduler, requests: dict[str, tuple[list[int], SamplingParams]]
                      ) -> dict[str, list[ReqOutput]]:
    """Submit all requests at once (so they batch) and step until every one has finished."""
    for rid, (input_ids, sampling) in requests.items():
        scheduler.add_request(GenerateReq(rid=rid, input_ids=input_ids, sampling=sampling))
    outputs: dict[str, list[ReqOutput]] = {rid: [] for rid in requests}
    for _ in range(100_000):
        if not scheduler.has_work:
            break
        scheduler.step()
        for out in scheduler.take_outputs():
            outputs[out.rid].append(out)
    else:
        raise AssertionError("scheduler did not finish")
    for out in scheduler.take_outputs():
        outputs[out.rid].append(out)
    assert all(outs and outs[-1].finish is not None for outs in outputs.values())
    return outputs


def output_ids(outs: list[ReqOutput]) -> list[int]:
    return [t for out in outs for t in out.new_ids]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
