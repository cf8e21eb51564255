"""The bootstrap server's clients: a prefill rank registers itself (`register_rank`, once at
start-up); a decode rank looks prefill ranks up (`PrefillDirectory`, off the step loop).

Lookups run on a small thread pool because an unreachable prefill must never freeze the decode
engine (LESSONS.md): the step loop only ever asks "is the answer here yet?".
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from meshserve.disagg.protocol import KVLayout, Registration, prefill_dp_rank

LOOKUP_TIMEOUT_S = 5.0
REGISTER_TIMEOUT_S = 60.0  # the server starts before the ranks; this only covers a slow machine


def _url(host: str, port: int, path: str) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def register_rank(host: str, port: int, reg: Registration) -> None:
    """PUT our registration, retrying while the bootstrap server is not up yet."""
    body = msgspec.json.encode(reg)
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while True:
        request = urllib.request.Request(_url(host, port, "/register"), data=body, method="PUT",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=LOOKUP_TIMEOUT_S):
                return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot register at the PD bootstrap server {host}:{port}: {exc}") from exc
            time.sleep(0.2)


@dataclass(frozen=True)
class Prefill:
    """A prefill rank as this decode rank sees it: where to reach it, and whether the pair fits
    (`problems`: the compatibility diff, empty when the KV layouts match)."""

    endpoint: str
    metadata: bytes
    problems: tuple[str, ...]
    head_start: int = 0  # this decode rank's first KV head within the prefill rank's
    fanout: int = 1  # decode ranks per prefill rank


class PrefillDirectory:
    def __init__(self, layout: KVLayout, tp_rank: int) -> None:
        self._layout = layout
        self._tp_rank = tp_rank
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meshserve-pd-lookup")
        # (host, port) -> this rank's peer in each of the prefill's DP groups
        self._entries: dict[tuple[str, int], Future[tuple[Prefill, ...]]] = {}

    def get(self, host: str, port: int, room: int) -> Prefill | Exception | None:
        """This rank's peer for bootstrap room `room` at the prefill at host:port (in the DP group
        that runs the room), an error saying why it cannot be reached, or None while the lookup
        is running. The compatibility check runs once per address; a failed lookup is
        forgotten, so the next request tries again."""
        key = (host, port)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._pool.submit(self._lookup, host, port)
        if not entry.done():
            return None
        exc = entry.exception()
        if exc is not None:
            del self._entries[key]
            return exc
        groups = entry.result()
        return groups[prefill_dp_rank(room, len(groups))]

    def forget(self, host: str, port: int) -> None:
        """Look the address up again next time (the prefill may have restarted elsewhere)."""
        entry = self._entries.get((host, port))
        if entry is not None and entry.done():
            del self._entries[(host, port)]

    def _lookup(self, host: str, port: int) -> tuple[Prefill, ...]:
        """Prefill rank 0 of DP group 0 tells the prefill's layout and DP size; decode rank j
        then pairs with prefill rank j // fanout of each DP group, which holds its KV heads
        there (every DP group has the same layout: one server, one set of flags)."""
        first = self._route(host, port, 0, 0)
        problems = first.layout.pairing_problems(self._layout)
        if problems:
            return (Prefill(endpoint=first.endpoint, metadata=first.metadata, problems=tuple(problems)),)
        fanout = first.layout.fanout(self._layout)
        rank = self._tp_rank // fanout
        regs = [first if (group, rank) == (0, 0) else self._route(host, port, group, rank)
                for group in range(first.dp_size)]
        return tuple(Prefill(endpoint=reg.endpoint, metadata=reg.metadata, problems=(),
                             head_start=(self._tp_rank % fanout) * self._layout.kv_heads, fanout=fanout)
                     for reg in regs)

    @staticmethod
    def _route(host: str, port: int, dp_rank: int, rank: int) -> Registration:
        url = _url(host, port, f"/route?tp_rank={rank}&dp_rank={dp_rank}")
        try:
            with urllib.request.urlopen(url, timeout=LOOKUP_TIMEOUT_S) as response:
                return msgspec.json.decode(response.read(), type=Registration)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the PD bootstrap server at {host}:{port} answered {exc.code}: "
                               f"{exc.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError, msgspec.DecodeError) as exc:
            raise RuntimeError(f"cannot reach the PD bootstrap server at {host}:{port}: {exc}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
