"""Static-batch latency, after SGLang's bench_one_batch: for each batch size, one prefill of
`--input-len` random tokens per sequence, then `--output-len` decode steps; reports the prefill
latency and the median decode step. No HTTP and no tokenizer: the scheduler is driven directly,
so this measures the engine (scheduling + forward + sampling), not the API.

  python -m meshserve.bench_one_batch --model-path DIR --batch-size 1 64 256 --input-len 256 --output-len 64 [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from meshserve.config.server_args import ServerArgs
from meshserve.messages import GenerateReq
from meshserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from meshserve.scheduler.scheduler import Scheduler


@dataclass
class OneBatchResult:
    tp: int
    batch_size: int
    input_len: int
    output_len: int
    prefill_ms: float
    decode_step_ms_median: float
    decode_tok_s: float  # batch_size / median decode step
    graph_replay_ms: float  # the decode forward alone (one CUDA-graph replay); NaN without graphs
    first_output_ids: list[int]  # greedy output of the batch's first sequence (compare across tp)
    output_ids: list[list[int]]  # every sequence's greedy output, in prompt order (prompts are seeded)


def _run_rank(rank: int, ns: argparse.Namespace, rendezvous: str | None, results: mp.Queue | None) -> None:
    from meshserve.cluster.distributed import init_parallel_groups
    from meshserve.cluster.layout import GroupLayout
    from meshserve.config.model_config import ModelConfig
    from meshserve.executor.model_runner import ModelRunner
    from meshserve.scheduler.scheduler import Scheduler

    max_batch = max(ns.batch_size)
    # Prefill runs in the server's default chunks (one unchunked 65k-token extend would need
    # activation memory the KV cache has taken); "prefill" is the time until every sequence
    # has its first token.
    argv = ["--model-path", ns.model_path, "--skip-tokenizer-init", "--tp", str(ns.tp),
            "--max-running-requests", str(max_batch), "--disable-radix-cache", *ns.server_args]
    args = ServerArgs.parse_args(argv).validate()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(message)s")
    started = time.perf_counter()
    device = torch.device(args.resolved_device())
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    groups = init_parallel_groups(layout=GroupLayout(tp=ns.tp), rank=rank, rendezvous=rendezvous, device=device,
                                  timeout_s=600)
    model_config = ModelConfig.from_server_args(args)
    scheduler = Scheduler(args, model_config, ModelRunner(args, model_config, device=device, groups=groups))
    logging.info("model and KV cache ready in %.1f s", time.perf_counter() - started)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in [ns.batch_size[0], *ns.batch_size]:  # the first run warms up
        sampling = SamplingParams(max_new_tokens=ns.output_len, temperature=0.0, ignore_eos=True)
        for i in range(batch_size):
            ids = torch.randint(0, model_config.vocab_size, (ns.input_len,), generator=gen).tolist()
            scheduler.add_request(GenerateReq(rid=f"{batch_size}-{i}-{len(rows)}", input_ids=ids, sampling=sampling))
        prefill_ms, decode_ms = 0.0, []
        first_ids: list[int] = []
        first_rid = f"{batch_size}-0-{len(rows)}"
        outputs_by_rid: dict[str, list[int]] = {}
        started_seqs: set[str] = set()
        if device.type == "cuda":
            torch.cuda.synchronize()
        while scheduler.has_work:
            # No synchronize here: in lockstep step() ends in a host read of its own tokens; under
            # --enable-overlap-schedule it reads the previous step's, and the time between returns
            # is the steady cadence a server sees (a sync would serialise the overlap away).
            start = time.perf_counter()
            scheduler.step()
            elapsed = (time.perf_counter() - start) * 1e3
            in_prefill = len(started_seqs) < batch_size
            outputs = scheduler.take_outputs()
            started_seqs.update(out.rid for out in outputs)
            if in_prefill:
                prefill_ms += elapsed
            else:
                decode_ms.append(elapsed)
            first_ids += [t for out in outputs if out.rid == first_rid for t in out.new_ids]
            for out in outputs:
                outputs_by_rid.setdefault(out.rid, []).extend(out.new_ids)
        logging.info("batch %d: %.1f s", batch_size, (prefill_ms + sum(decode_ms)) / 1e3)
        decode = statistics.median(decode_ms) if decode_ms else float("nan")
        rows.append(OneBatchResult(ns.tp, batch_size, ns.input_len, ns.output_len, prefill_ms, decode,
                                   batch_size / decode * 1e3, _graph_replay_ms(scheduler, batch_size), first_ids,
                                   [outputs_by_rid[f"{batch_size}-{i}-{len(rows)}"] for i in range(batch_size)]))
    if rank == 0 and results is not None:
        results.put([asdict(r) for r in rows[1:]])


def _graph_replay_ms(scheduler: "Scheduler", batch_size: int) -> float:
    """Median time of replaying the captured decode graph for `batch_size` on its own: the
    forward pass without any scheduling, sampling or host work around it."""
    graphs = scheduler.runner.graphs
    if graphs is None or not graphs.can_run(batch_size):
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graphs.replay_static(batch_size)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--output-file", help="append one JSON line per batch size")
    ns, server_args = parser.parse_known_args(argv)
    ns.server_args = server_args  # any launch_server flag (e.g. --device cpu, --dtype float32)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    from meshserve.cluster.distributed import serve_rendezvous_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = f"127.0.0.1:{port}"
    store = serve_rendezvous_store("127.0.0.1", port) if ns.tp > 1 else None  # noqa: F841 - outlives the ranks
    procs = [ctx.Process(target=_run_rank, args=(r, ns, rendezvous, results)) for r in range(ns.tp)]
    for p in procs:
        p.start()
    rows = results.get()
    for p in procs:
        p.join()
    print(f"{'tp':>3} {'batch':>6} {'in':>6} {'out':>5} {'prefill ms':>11} {'decode ms/step':>15} "
          f"{'decode tok/s':>13} {'graph ms':>9} {'overhead ms':>12}")
    for r in rows:
        overhead = r["decode_step_ms_median"] - r["graph_replay_ms"]
        print(f"{r['tp']:>3} {r['batch_size']:>6} {r['input_len']:>6} {r['output_len']:>5} {r['prefill_ms']:>11.2f} "
              f"{r['decode_step_ms_median']:>15.3f} {r['decode_tok_s']:>13.1f} {r['graph_replay_ms']:>9.3f} "
              f"{overhead:>12.3f}")
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
