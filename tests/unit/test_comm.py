"""RankGroup's collectives over a real four-process gloo world, for the world and for the named
groups of a DP-attention layout (--tp 4 --dp-size 2 --ep 2 --enable-dp-attention): each group
broadcasts from its own first rank."""

from __future__ import annotations

import multiprocessing as mp

import torch

from tests.server_process import free_port

LAYOUT = dict(tp=4, dp=2, ep=2, dp_attention=True)


def _rank(rank: int, port: int, results: mp.Queue) -> None:
    from meshserve.cluster.distributed import init_parallel_groups
    from meshserve.cluster.layout import GroupLayout

    groups = init_parallel_groups(layout=GroupLayout(**LAYOUT), rank=rank, rendezvous=f"127.0.0.1:{port}",
                                  device=torch.device("cpu"), timeout_s=60)
    world = groups.world
    report = {"bytes": world.broadcast_bytes(b"step messages" if rank == 0 else None),
              "min": world.min_over_ranks(100 + rank),
              "tokens": world.broadcast_from_leader(torch.tensor([7, 8]) if rank == 0
                                                    else torch.zeros(2, dtype=torch.int64)).tolist()}
    world.check_same(42, "agreeing value")
    try:
        world.check_same(rank, "the scheduled batch")
        report["diverged"] = None
    except RuntimeError as err:
        report["diverged"] = str(err)
    # Per group: every member sends its own global rank; only the first member's arrives.
    for kind in ("attn_tp", "moe_ep", "moe_tp", "dp"):
        group = getattr(groups, kind)
        report[kind] = {
            "ranks": list(group.ranks), "rank": group.rank,
            "bytes": group.broadcast_bytes(f"from {rank}".encode() if group.is_leader else None).decode(),
            "tensor": int(group.broadcast_from_leader(torch.tensor([rank]))),
            "sum": int(group.all_reduce(torch.tensor([rank]))),
            "min": group.min_over_ranks(10 - rank)}
    report["dp_rank"] = groups.dp_rank
    results.put((rank, report))
    torch.distributed.barrier(group=world.cpu_group)


def test_world_and_group_collectives():
    from meshserve.cluster.distributed import serve_rendezvous_store

    port = free_port()
    store = serve_rendezvous_store("127.0.0.1", port)  # noqa: F841 - outlives the ranks
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(4)]
    for p in procs:
        p.start()
    reports = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    expected = {"attn_tp": [(0, 1), (2, 3)], "moe_ep": [(0, 2), (1, 3)], "moe_tp": [(0, 1), (2, 3)],
                "dp": [(0, 2), (1, 3)]}
    for rank in range(4):
        report = reports[rank]
        assert report["bytes"] == b"step messages"
        assert report["min"] == 100
        assert report["tokens"] == [7, 8]
        assert "ranks diverged: the scheduled batch on rank(s) [1, 2, 3]" in report["diverged"]
        assert report["dp_rank"] == rank // 2
        for kind, layout in expected.items():
            members = next(g for g in layout if rank in g)
            got = report[kind]
            assert tuple(got["ranks"]) == members and got["rank"] == members.index(rank)
            assert got["bytes"] == f"from {members[0]}" and got["tensor"] == members[0], (kind, rank, got)
            assert got["sum"] == sum(members) and got["min"] == 10 - max(members)
