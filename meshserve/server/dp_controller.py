"""DPController: which DP group (scheduler) serves each sequence, with --dp-size N.

SGLang's `--load-balance-method`: `round_robin` deals sequences out in turn; `shortest_queue`
gives each to the group with the fewest live sequences (counted here, where every dispatch and
every end is seen, so the count is never stale). A sequence's abort goes to the group that has
it; a flush goes to every group. With one group every decision is 0.

On a prefill server (`by_room`), a disaggregated request goes to DP group `room % dp_size`
whatever the method (SGLang's rule): the decode side computes the same group from the room and
the prefill's DP size (its bootstrap registration) to find the ranks that hold the KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.config.server_args import LOAD_BALANCE_METHODS
from meshserve.disagg.protocol import prefill_dp_rank


@dataclass
class DPController:
    dp_size: int
    method: str = "round_robin"
    by_room: bool = False  # a prefill server: requests with a bootstrap room go to room % dp_size
    _owner: dict[str, int] = field(default_factory=dict)  # live rid -> its DP group
    _live: list[int] = field(init=False)  # live sequences per group
    _next: int = 0  # round robin's next group

    def __post_init__(self) -> None:
        if self.method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"unknown load balance method {self.method!r}; one of {', '.join(LOAD_BALANCE_METHODS)}")
        self._live = [0] * self.dp_size

    def dispatch(self, rid: str, room: int | None = None) -> int:
        """The group that runs the new sequence `rid` (`room`: its bootstrap room, if any)."""
        if self.by_room and room is not None:
            group = prefill_dp_rank(room, self.dp_size)
        elif self.method == "round_robin":
            group, self._next = self._next, (self._next + 1) % self.dp_size
        else:
            group = min(range(self.dp_size), key=lambda g: (self._live[g], g))
        self._owner[rid] = group
        self._live[group] += 1
        return group

    def owner(self, rid: str) -> int | None:
        """The group running `rid`, or None once it ended (or was never dispatched)."""
        return self._owner.get(rid)

    def ended(self, rid: str) -> None:
        """`rid` finished or was aborted: it no longer counts."""
        group = self._owner.pop(rid, None)
        if group is not None:
            self._live[group] -= 1

    @property
    def live(self) -> list[int]:
        return list(self._live)
