"""DPController: which DP group gets a sequence, where its abort goes, and the flag that picks
the method."""

from __future__ import annotations

import pytest

from meshserve.config.server_args import ServerArgs
from meshserve.server.dp_controller import DPController


def test_round_robin_deals_in_turn_and_remembers_owners():
    dp = DPController(3)
    assert [dp.dispatch(f"r{i}") for i in range(5)] == [0, 1, 2, 0, 1]
    assert dp.owner("r4") == 1 and dp.live == [2, 2, 1]
    dp.ended("r4")
    dp.ended("r4")  # a second end (abort, then its final output) counts once
    assert dp.owner("r4") is None and dp.live == [2, 1, 1]


def test_shortest_queue_fills_the_emptiest_group():
    dp = DPController(2, "shortest_queue")
    assert [dp.dispatch(r) for r in "abc"] == [0, 1, 0]
    dp.ended("a")
    dp.ended("c")
    assert dp.dispatch("d") == 0  # group 0 is empty, group 1 still runs b
    assert dp.dispatch("e") == 0 and dp.dispatch("f") == 1


def test_a_prefill_server_places_a_room_in_group_room_mod_dp_size():
    dp = DPController(4, "shortest_queue", by_room=True)
    assert [dp.dispatch(f"r{room}", room) for room in (9, 9 + 4, 2**63 - 2)] == [1, 1, 2]
    assert dp.dispatch("warm-up") == 0  # no room (no bootstrap fields): the method decides
    assert dp.live == [1, 2, 1, 0]
    assert DPController(4).dispatch("r", 9) == 0  # not a prefill server: the room plays no part


def test_the_flag_and_its_refusals():
    args = ServerArgs.parse_args(["--device", "cpu", "--dp-size", "2", "--load-balance-method", "shortest_queue"])
    assert args.validate().parallel.load_balance_method == "shortest_queue"
    with pytest.raises(SystemExit):
        ServerArgs.parse_args(["--load-balance-method", "minimum_tokens"])
    ServerArgs.parse_args(["--device", "cpu", "--dp-size", "2", "--disaggregation-mode", "prefill"]).validate()
    with pytest.raises(ValueError, match="unknown load balance method"):
        DPController(2, "random")
