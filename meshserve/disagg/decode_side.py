"""DecodeSide: a decode server's part of the PD protocol, driven by its Scheduler.

A request with bootstrap fields is not prefilled here:

  BOOTSTRAPPING  the prefill is looked up (off the step loop, cached per address, its layout
                 checked once), then the prompt gets a row and KV slots (no compute), in order
  AWAITING_KV    KVRequest sent; on KVDone the request joins `running` with the first token and
                 its prompt's KV in place, and decodes from there; KVAck tells the prefill

Each state ends by the transfer-timeout deadline; a failure (KVFailed, an incompatible or
unreachable prefill, the deadline, an abort) ends the request with an abort (the client gets an
error). Invariant: slots a write may still land in are never freed or reused — once a KVRequest
went out, its slots are held ("quarantined") until the prefill says the write ended (KVDone or
KVFailed) or one more timeout has passed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshserve.cache.radix_cache import PrefixMatch
from meshserve.disagg.bootstrap_client import Prefill, PrefillDirectory
from meshserve.disagg.kv_endpoint import KVEndpoint
from meshserve.disagg.protocol import KVAck, KVDone, KVFailed, KVRequest, prompt_digest
from meshserve.messages import FinishReason
from meshserve.scheduler.request import Req, ReqState

if TYPE_CHECKING:
    from meshserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("meshserve")


@dataclass
class _Quarantine:
    """Slots of a request that ended while a write into them may still be in flight."""

    row: int
    slots: torch.Tensor
    until: float


class DecodeSide:
    def __init__(self, scheduler: Scheduler, endpoint: KVEndpoint) -> None:
        self.sched = scheduler
        self.ep = endpoint
        self.directory = PrefillDirectory(endpoint.layout, endpoint.tp_rank)
        self.bootstrapping: deque[Req] = deque()
        self.awaiting: dict[int, Req] = {}  # room -> request whose KVRequest went out
        self.prefills: dict[int, Prefill] = {}  # room -> the prefill it went to
        self.quarantine: dict[int, _Quarantine] = {}  # room -> slots no one may use yet

    @property
    def busy(self) -> bool:
        return bool(self.bootstrapping or self.awaiting or self.quarantine)

    def stats(self) -> dict[str, int]:
        return dict(num_bootstrapping=len(self.bootstrapping), num_awaiting_kv=len(self.awaiting),
                    num_awaiting_ack=0, kv_transfers_in_flight=len(self.awaiting) + len(self.quarantine))

    def admit(self, req: Req) -> bool:
        """Every disaggregated request is ours: its prompt's KV comes from the prefill."""
        req.state = ReqState.BOOTSTRAPPING
        req.deadline = time.monotonic() + self.ep.timeout_s
        self.bootstrapping.append(req)
        return True

    def takes(self, req: Req) -> bool:
        return False  # sampled tokens are ours to keep

    # -- each step -------------------------------------------------------------------------

    def poll(self) -> None:
        for msg in self.ep.control.receive():
            if isinstance(msg, KVDone):
                self._on_done(msg)
            elif isinstance(msg, KVFailed):
                self._on_failed(msg)
        now = time.monotonic()
        for req in [r for r in self.awaiting.values() if now > r.deadline]:
            self._fail(req, f"the prefill server did not deliver the KV within --disaggregation-transfer-timeout "
                            f"({self.ep.timeout_s:g} s)")
            self.directory.forget(req.bootstrap.host, req.bootstrap.port)
        for room in [r for r, q in self.quarantine.items() if now > q.until]:
            self._free(self.quarantine.pop(room))
            self.prefills.pop(room, None)
        self._bootstrap(now)

    def _bootstrap(self, now: float) -> None:
        """Requests leave BOOTSTRAPPING in arrival order: one that waits for KV slots holds the
        ones behind it, so a long prompt is not starved by short ones."""
        while self.bootstrapping:
            req = self.bootstrapping[0]
            found = self.directory.get(req.bootstrap.host, req.bootstrap.port)
            if found is None or (isinstance(found, Prefill) and not found.problems and not self._reserve(req)):
                if now <= req.deadline:
                    return
                found = RuntimeError("no prefill answer or no free KV slots within "
                                     f"--disaggregation-transfer-timeout ({self.ep.timeout_s:g} s)")
            self.bootstrapping.popleft()
            if isinstance(found, Exception):
                self._fail(req, str(found))
            elif found.problems:
                self._fail(req, f"the prefill server at {req.bootstrap.host}:{req.bootstrap.port} does not "
                                f"match this decode server: " + "; ".join(found.problems))
            else:
                self._request_kv(req, found)

    def _reserve(self, req: Req) -> bool:
        """A row and KV slots for the prompt, computed by no one here: the prefill writes them.
        Head-room of one slot per running sequence is kept for their next decode step."""
        kv, n = self.sched.kv, len(req.input_ids)
        if not kv.room_for_extend(req, n, reserve=len(self.sched.running)):
            return False
        if not kv.attach(req, PrefixMatch(torch.empty(0, dtype=torch.int64), None)):
            return False
        slots = kv.extend(req, n)
        kv.rows.assign(req.row, 0, slots)  # the device table too: no step of ours writes them
        return True

    def _request_kv(self, req: Req, prefill: Prefill) -> None:
        room = req.bootstrap.room
        if room in self.awaiting or room in self.quarantine:
            self._fail(req, f"bootstrap room {room} is already in use on this decode server", written=False)
            return
        slots = self.sched.kv.slots(req, len(req.input_ids))
        self.ep.control.send(prefill.endpoint, KVRequest(
            room=room, endpoint=self.ep.control.endpoint, metadata=self.ep.backend.local_metadata(),
            bases=self.ep.bases, item_bytes=self.ep.item_bytes, slots=slots.tolist(),
            prompt_digest=prompt_digest(req.input_ids), layout=self.ep.layout))
        self.awaiting[room] = req
        self.prefills[room] = prefill
        req.state = ReqState.AWAITING_KV
        req.deadline = time.monotonic() + self.ep.timeout_s

    def _on_done(self, msg: KVDone) -> None:
        req = self.awaiting.pop(msg.room, None)
        prefill = self.prefills.pop(msg.room, None)
        held = self.quarantine.pop(msg.room, None)
        if held is not None:  # the request ended meanwhile; the write has now ended too
            self._free(held)
        if req is not None:
            self._start_decoding(req, msg)
        if prefill is not None:
            self.ep.control.send(prefill.endpoint, KVAck(msg.room))

    def _on_failed(self, msg: KVFailed) -> None:
        req = self.awaiting.get(msg.room)
        if req is not None:
            self._fail(req, f"the prefill server failed: {msg.reason}", written=False)
        held = self.quarantine.pop(msg.room, None)
        if held is not None:
            self._free(held)
            self.prefills.pop(msg.room, None)

    def _start_decoding(self, req: Req, msg: KVDone) -> None:
        """The prompt's KV is in place: the request continues as if prefilled here."""
        req.kv_len = len(req.input_ids)
        req.output_ids.append(msg.token)
        if req.return_logprob and msg.logprob is not None:
            req.unsent_logprobs.append(msg.logprob)
        if req.top_logprobs_num:
            req.unsent_top_logprobs.append(list(msg.top_logprobs[: req.top_logprobs_num]))
        self.sched.join_running(req)

    # -- ending a request ------------------------------------------------------------------

    def abort(self, rid: str, message: str) -> bool:
        for req in [*self.bootstrapping, *self.awaiting.values()]:
            if req.rid == rid:
                self._fail(req, message)
                return True
        return False

    def _fail(self, req: Req, reason: str, *, written: bool = True) -> None:
        """End `req` with an error. Its slots are freed now unless a write may still land in them
        (`written`: a KVRequest went out and the prefill has not said the write ended)."""
        room = req.bootstrap.room
        if req in self.bootstrapping:
            self.bootstrapping.remove(req)
        if self.awaiting.get(room) is req:
            del self.awaiting[room]
            if not written:
                self.prefills.pop(room, None)  # else kept to acknowledge the write's end
        if req.row is not None:
            n = len(req.input_ids)
            held = _Quarantine(req.row, self.sched.kv.slots(req, n), time.monotonic() + self.ep.timeout_s)
            req.row = None  # the request owns nothing now; retire must not release it
            if written:
                self.quarantine[room] = held
            else:
                self._free(held)
        logger.warning("PD request %s (room %d) failed: %s", req.rid, room, reason)
        req.finish = FinishReason("abort", message=reason)
        self.sched.retire(req)

    def _free(self, held: _Quarantine) -> None:
        """Slots no write can land in any more, never computed here: back to the pool, not the cache."""
        self.sched.kv.pool.free(held.slots)
        self.sched.kv.rows.free(held.row)

    def close(self) -> None:
        self.directory.close()
        self.ep.close()

