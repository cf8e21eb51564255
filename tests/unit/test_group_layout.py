"""Which global ranks form each named group (SGLang's layout), the KV-head rule, and the
argument checks that name the flags."""

from __future__ import annotations

import pytest

from meshserve.cluster.layout import GROUP_KINDS, GroupLayout, KVHeadShare
from meshserve.config.server_args import ServerArgs, ServerArgsError


def test_tensor_parallel_only_every_group_is_the_world_but_ep():
    layout = GroupLayout(tp=4)
    assert layout.world_size == 4 and layout.dp_leaders == [0]
    for kind in ("world", "tp", "attn_tp", "moe_tp"):
        assert layout.groups(kind) == [(0, 1, 2, 3)]
    assert layout.groups("moe_ep") == [(0,), (1,), (2,), (3,)]
    assert layout.groups("dp") == [(0,), (1,), (2,), (3,)]


def test_plain_data_parallel_replicas():
    layout = GroupLayout(tp=2, dp=3)
    assert layout.world_size == 6 and layout.replicas == 3
    assert layout.groups("tp") == layout.groups("attn_tp") == [(0, 1), (2, 3), (4, 5)]
    assert layout.groups("dp") == [(0, 2, 4), (1, 3, 5)]
    assert layout.dp_leaders == [0, 2, 4]
    assert [layout.dp_rank(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]


def test_dp_attention_with_expert_parallelism():
    layout = GroupLayout(tp=8, dp=4, ep=4, dp_attention=True)
    assert layout.world_size == 8 and layout.attn_tp_size == 2 and layout.moe_tp_size == 2
    assert layout.groups("tp") == [tuple(range(8))]
    assert layout.groups("attn_tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert layout.groups("moe_tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert layout.groups("moe_ep") == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert layout.groups("dp") == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert layout.dp_leaders == [0, 2, 4, 6]


def test_the_seed_shape_full_ep_and_dp():
    """--tp 16 --ep 16 --dp-size 16 --enable-dp-attention: attention per rank, experts over all."""
    layout = GroupLayout(tp=16, dp=16, ep=16, dp_attention=True)
    assert layout.groups("attn_tp") == [(r,) for r in range(16)]
    assert layout.groups("moe_ep") == layout.groups("dp") == [tuple(range(16))]
    assert layout.groups("moe_tp") == [(r,) for r in range(16)]
    assert layout.dp_leaders == list(range(16))


@pytest.mark.parametrize("tp,dp,ep,dpa", [(4, 1, 2, False), (4, 2, 1, True), (8, 2, 4, True), (2, 2, 2, False),
                                          (8, 8, 2, True)])
def test_every_kind_partitions_the_world(tp, dp, ep, dpa):
    layout = GroupLayout(tp=tp, dp=dp, ep=ep, dp_attention=dpa)
    sizes = {"world": layout.world_size, "tp": tp, "attn_tp": layout.attn_tp_size, "moe_ep": ep,
             "moe_tp": tp // ep, "dp": dp}
    for kind in GROUP_KINDS:
        groups = layout.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size)), kind
        assert {len(g) for g in groups} == {sizes[kind]}, kind
    # The EP and MoE-TP groups of a replica form a grid: each pair meets in exactly one rank.
    for ep_group in layout.groups("moe_ep"):
        for tp_group in layout.groups("moe_tp"):
            if set(tp_group) <= set(layout.group_of("tp", ep_group[0])):
                assert len(set(ep_group) & set(tp_group)) == 1


def test_kv_heads_split_or_replicated_evenly():
    assert (KVHeadShare(8, 4).per_rank, [KVHeadShare(8, 4).first_head(r) for r in range(4)]) == (2, [0, 2, 4, 6])
    assert (KVHeadShare(2, 4).per_rank, [KVHeadShare(2, 4).first_head(r) for r in range(4)]) == (1, [0, 0, 1, 1])
    assert KVHeadShare(6, 4).problem() == "6 KV heads do not divide over attention tensor-parallel size 4"
    assert "not a multiple of the 4 KV heads" in KVHeadShare(4, 6).problem()
    assert KVHeadShare(2, 4).problem() is None and KVHeadShare(8, 4).problem() is None


@pytest.mark.parametrize("argv,problem", [
    (["--tp", "4", "--dp-size", "3", "--enable-dp-attention"],
     "--tp 4 must be divisible by --dp-size 3 with --enable-dp-attention"),
    (["--tp", "4", "--ep", "3"], "--tp 4 must be divisible by --ep 3"),
    (["--tp", "1", "--dp-size", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:5000"],
     "3 ranks (--tp 1 × --dp-size 3) must be divisible by --nnodes 2"),
    (["--enable-dp-lm-head"], "--enable-dp-lm-head needs --enable-dp-attention"),
])
def test_bad_combinations_are_refused_by_flag(argv, problem):
    with pytest.raises(ServerArgsError) as err:
        ServerArgs.parse_args(["--device", "cpu", *argv]).validate()
    assert any(problem in line for line in err.value.problems), err.value.problems
