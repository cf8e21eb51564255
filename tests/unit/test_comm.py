"""TensorParallelGroup's host collectives over a real two-process gloo world."""

from __future__ import annotations

import multiprocessing as mp

import torch

from tests.tp_worker import _free_port


def _rank(rank: int, port: int, results: mp.Queue) -> None:
    from meshserve.cluster.distributed import init_tp_group

    tp = init_tp_group(world_size=2, rank=rank, rendezvous=f"127.0.0.1:{port}", device=torch.device("cpu"),
                       timeout_s=60)
    report = {"bytes": tp.broadcast_bytes(b"step messages" if rank == 0 else None),
              "min": tp.min_over_ranks(100 + rank),
              "tokens": tp.broadcast_from_leader(torch.tensor([7, 8]) if rank == 0 else torch.zeros(2, dtype=torch.int64)).tolist()}
    tp.check_same(42, "agreeing value")
    try:
        tp.check_same(rank, "the scheduled batch")
        report["diverged"] = None
    except RuntimeError as err:
        report["diverged"] = str(err)
    results.put((rank, report))


def test_host_collectives_and_divergence_check():
    from meshserve.cluster.distributed import serve_rendezvous_store

    port = _free_port()
    store = serve_rendezvous_store("127.0.0.1", port)  # noqa: F841 - outlives the ranks
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    reports = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    for rank in (0, 1):
        assert reports[rank]["bytes"] == b"step messages"
        assert reports[rank]["min"] == 100
        assert reports[rank]["tokens"] == [7, 8]
        assert "ranks diverged: the scheduled batch on rank(s) [1]" in reports[rank]["diverged"]
