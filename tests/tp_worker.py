"""Run requests on the ranks of an in-process tensor-parallel world (no HTTP), for tests of the
tensor-parallel layers and scheduler. With --dp-size D, prompt i goes to DP group i mod D and
every group's leader reports its outputs (and how many steps its group spent idle while others
worked); otherwise every rank runs every prompt and rank 0 reports."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import msgspec
import torch

from tests.server_process import free_port


def _rank_main(rank: int, world: int, port: int, model_dir: str, prompts: list[list[int]], new_tokens: int,
               extra: list[str], out_file: str, device_type: str) -> None:
    from meshserve.cluster.distributed import init_parallel_groups
    from meshserve.cluster.topology import layout_from_args
    from meshserve.config.model_config import ModelConfig
    from meshserve.config.server_args import ServerArgs
    from meshserve.executor.model_runner import ModelRunner
    from meshserve.scheduler.scheduler import Scheduler
    from tests.scheduler_driver import TEST_KV_ARGS, greedy, output_ids, run_to_completion

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args = ServerArgs.parse_args(["--model-path", model_dir, "--device", device_type, "--tp", str(world),
                                  *TEST_KV_ARGS, *extra])
    layout = layout_from_args(args)
    groups = init_parallel_groups(layout=layout, rank=rank, rendezvous=f"127.0.0.1:{port}",
                                  device=device, timeout_s=120)
    model_config = ModelConfig.from_server_args(args)
    scheduler = Scheduler(args, model_config, ModelRunner(args, model_config, device=device, groups=groups))
    mine = [i for i in range(len(prompts)) if i % layout.dp == groups.dp_rank]
    requests = {str(i): (prompts[i], greedy(new_tokens)) for i in mine}
    if layout.dp == 1:
        outs, idle_steps = run_to_completion(scheduler, requests), 0
    else:
        outs, idle_steps = _run_dp_group(scheduler, groups, requests)
    if groups.attn_tp.rank == 0:
        report = {"outputs": {i: output_ids(outs[str(i)]) for i in mine}, "idle_steps": idle_steps,
                  "stats": msgspec.to_builtins(scheduler.load())}
        Path(f"{out_file}.dp{groups.dp_rank}").write_text(json.dumps(report))
    # Leave together, then skip the interpreter's teardown: with gloo's threads still alive, C++
    # static destructors at exit were seen to abort a rank ("terminate called without an active
    # exception", exit -6) even after destroy_process_group. A served rank leaves the same way
    # (os._exit in launch_server). Rank 0's output is already on disk.
    if groups.world.cpu_group is not None:
        torch.distributed.barrier(group=groups.world.cpu_group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def _run_dp_group(scheduler, groups, requests):
    """Step this DP group's requests to completion while every rank keeps stepping until all DP
    groups are done (the DP step contract: an idle group still joins every step). Returns the
    outputs and the number of steps this group spent without work of its own."""
    from meshserve.messages import GenerateReq

    for rid, (input_ids, sampling) in requests.items():
        scheduler.add_request(GenerateReq(rid=rid, input_ids=input_ids, sampling=sampling))
    outputs = {rid: [] for rid in requests}
    idle_steps = 0
    for _ in range(100_000):
        if groups.world.min_over_ranks(0 if scheduler.has_work else 1):  # every group is done
            break
        idle_steps += not scheduler.has_work
        scheduler.step()
        for out in scheduler.take_outputs():
            outputs[out.rid].append(out)
    else:
        raise AssertionError("the DP groups did not finish")
    return outputs, idle_steps


def dp_generate(model_dir: Path, world: int, prompts: list[list[int]], new_tokens: int, tmp: Path,
                extra: tuple[str, ...] = (), device_type: str = "cpu") -> tuple[list[list[int]], list[int]]:
    """Greedy outputs of `world` = --tp ranks (processes; on CUDA, rank r on GPU r) split into the
    DP groups that `extra` asks for, by prompt; and each DP group's idle steps."""
    outputs, reports = _run_ranks(model_dir, world, prompts, new_tokens, tmp, extra, device_type)
    return outputs, [report["idle_steps"] for report in reports]


def _run_ranks(model_dir: Path, world: int, prompts: list[list[int]], new_tokens: int, tmp: Path,
               extra: tuple[str, ...], device_type: str) -> tuple[list[list[int]], list[dict]]:
    """The outputs by prompt, and each DP group leader's report."""
    from meshserve.cluster.distributed import serve_rendezvous_store
    from meshserve.cluster.topology import layout_from_args
    from meshserve.config.server_args import ServerArgs

    layout = layout_from_args(ServerArgs.parse_args(["--tp", str(world), *extra]))
    out_file = tmp / f"tp{world}.json"
    port = free_port()
    store = serve_rendezvous_store("127.0.0.1", port)  # noqa: F841 - must outlive the ranks
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(model_dir), prompts, new_tokens, list(extra),
                                                  str(out_file), device_type)) for r in range(layout.world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    reports = [json.loads(Path(f"{out_file}.dp{d}").read_text()) for d in range(layout.dp)]
    outputs = {int(i): ids for report in reports for i, ids in report["outputs"].items()}
    return [outputs[i] for i in range(len(prompts))], reports


def tp_generate(model_dir: Path, world: int, prompts: list[list[int]], new_tokens: int, tmp: Path,
                extra: tuple[str, ...] = (), device_type: str = "cpu") -> list[list[int]]:
    """Greedy outputs of `world` ranks (processes; on CUDA, rank r on GPU r)."""
    return dp_generate(model_dir, world, prompts, new_tokens, tmp, extra, device_type)[0]


def tp_generate_with_stats(model_dir: Path, world: int, prompts: list[list[int]], new_tokens: int, tmp: Path,
                           extra: tuple[str, ...] = ()) -> tuple[list[list[int]], dict]:
    """Greedy outputs of `world` ranks on the CPU, and the leader's SchedulerStats (as a dict)
    after the last step."""
    outputs, reports = _run_ranks(model_dir, world, prompts, new_tokens, tmp, extra, "cpu")
    return outputs, reports[0]["stats"]
