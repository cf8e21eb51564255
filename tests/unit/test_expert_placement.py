"""The expert placement map (meshserve/layers/moe/placement.py): the initial map with redundant
slots, the router-choice -> slot lookup, and EPLB's balanced maps (deterministic, every expert
present, per-rank load balanced, unchanged slots kept)."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve.layers.moe.placement import ExpertPlacement, balanced_slots, initial_slots


def test_initial_slots_copy_the_first_experts():
    assert initial_slots(8, 2) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert initial_slots(4, 0) == [0, 1, 2, 3]


def test_lookup_spreads_tokens_over_copies_and_is_identity_without_them():
    placement = ExpertPlacement(8, 2)
    ids = torch.tensor([[0, 5], [0, 1], [0, 1], [7, 1]])
    # expert 0 lives in slots 0 and 8, expert 1 in 1 and 9: token t takes copy t mod 2
    assert placement.physical(ids).tolist() == [[0, 5], [8, 9], [0, 1], [7, 9]]
    plain = ExpertPlacement(8, 0)
    assert plain.physical(ids) is ids


def test_assign_rejects_a_map_that_drops_an_expert():
    placement = ExpertPlacement(4, 2)
    with pytest.raises(ValueError, match="every one of 4 experts"):
        placement.assign([0, 1, 2, 2, 1, 0])
    placement.assign([3, 2, 1, 0, 3, 3])
    assert placement.physical(torch.tensor([[3], [3], [3], [0]])).tolist() == [[0], [4], [5], [3]]


def _rank_loads(slots: list[int], loads: list[int], ep: int) -> list[float]:
    copies = [slots.count(e) for e in range(len(loads))]
    per_rank = len(slots) // ep
    return [sum(loads[e] / copies[e] for e in slots[r * per_rank:(r + 1) * per_rank]) for r in range(ep)]


def test_balanced_slots_give_copies_to_the_hottest_and_balance_ranks():
    loads = [900, 10, 10, 10, 500, 10, 10, 10]
    current = initial_slots(8, 2)
    slots = balanced_slots(loads, 2, current)
    assert sorted(set(slots)) == list(range(8)) and len(slots) == 10
    assert slots.count(0) == 2 and slots.count(4) == 2  # the two hot experts got the copies
    assert slots[:5].count(0) == 1 and slots[:5].count(4) == 1  # one copy of each on each rank
    rank_loads = _rank_loads(slots, loads, 2)
    assert max(rank_loads) - min(rank_loads) <= 10
    assert balanced_slots(loads, 2, current) == slots  # deterministic


def test_balanced_slots_on_random_loads():
    rng = random.Random(3)
    for _ in range(50):
        experts, ep = rng.choice([(8, 2), (16, 4), (64, 8), (256, 16)])
        redundant = ep * rng.randrange(0, 3)
        loads = [rng.randrange(0, 1000) ** 2 for _ in range(experts)]
        slots = balanced_slots(loads, ep, initial_slots(experts, redundant))
        assert len(slots) == experts + redundant and sorted(set(slots)) == list(range(experts))
        rank_loads = _rank_loads(slots, loads, ep)
        # greedy packing: no rank exceeds the mean by more than the heaviest single copy
        heaviest = max(loads[e] / slots.count(e) for e in range(experts))
        assert max(rank_loads) <= sum(rank_loads) / ep + heaviest + 1e-6


def test_balanced_slots_keep_experts_in_their_slots_when_loads_do_not_call_for_a_move():
    current = initial_slots(8, 2)
    again = balanced_slots([0] * 8, 2, current)  # no load measured: copies go to 0 and 1 again
    assert sorted(again[:5]) == sorted(current[:5]) and sorted(again[5:]) == sorted(current[5:])
    stable = balanced_slots([5, 5, 1, 1, 1, 1, 1, 1], 2, again)
    assert balanced_slots([5, 5, 1, 1, 1, 1, 1, 1], 2, stable) == stable  # a fixed point moves nothing
