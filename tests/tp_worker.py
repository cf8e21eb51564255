"""Run the same requests on every rank of an in-process tensor-parallel world (no HTTP), for
tests of the tensor-parallel layers and scheduler. Rank 0 reports its outputs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    groups = init_parallel_groups(layout=layout_from_args(args), rank=rank, rendezvous=f"127.0.0.1:{port}",
                                  device=device, timeout_s=120)
    model_config = ModelConfig.from_server_args(args)
    scheduler = Scheduler(args, model_config, ModelRunner(args, model_config, device=device, groups=groups))
    outs = run_to_completion(scheduler, {str(i): (p, greedy(new_tokens)) for i, p in enumerate(prompts)})
    if rank == 0:
        Path(out_file).write_text(json.dumps([output_ids(outs[str(i)]) for i in range(len(prompts))]))
    # Leave together, then skip the interpreter's teardown: with gloo's threads still alive, C++
    # static destructors at exit were seen to abort a rank ("terminate called without an active
    # exception", exit -6) even after destroy_process_group. A served rank leaves the same way
    # (os._exit in launch_server). Rank 0's output is already on disk.
    if groups.world.cpu_group is not None:
        torch.distributed.barrier(group=groups.world.cpu_group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

def tp_generate(model_dir: Path, world: int, prompts: list[list[int]], new_tokens: int, tmp: Path,
                extra: tuple[str, ...] = (), device_type: str = "cpu") -> list[list[int]]:
    """Greedy outputs of `world` ranks (processes; on CUDA, rank r on GPU r)."""
    from meshserve.cluster.distributed import serve_rendezvous_store

    out_file = tmp / f"tp{world}.json"
    port = _free_port()
    store = serve_rendezvous_store("127.0.0.1", port)  # noqa: F841 - must outlive the ranks
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(model_dir), prompts, new_tokens, list(extra),
                                                  str(out_file), device_type)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return json.loads(out_file.read_text())
