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
from meshserve.disagg.agreement import Agreement
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
    def __init__(self, scheduler: Scheduler, endpoint: KVEndpoint, agreement: Agreement) -> None:
        self.sched = scheduler
        self.ep = endpoint
        self.agreement = agreement
        self.directory = PrefillDirectory(endpoint.layout, endpoint.tp_rank)
        self.bootstrapping: deque[Req] = deque()
        self.awaiting: dict[int, Req] = {}  # room -> request whose KVRequest went out
        self.prefills: dict[int, Prefill] = {}  # room -> the prefill it went to
        self.quarantine: dict[int, _Quarantine] = {}  # room -> slots no one may use yet
        self.heard: dict[int, KVDone | KVFailed] = {}  # room -> this rank's prefill peer's word on its write

    @property
    def busy(self) -> bool:
        """Requests in PD states or quarantined slots: the same on every rank."""
        return bool(self.bootstrapping or self.awaiting or self.quarantine)

    @property
    def local_work(self) -> bool:
        return False  # everything pending here is in `busy`

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
        """Hear the prefill ranks, then take the transitions the tensor-parallel ranks agree on
        (agreement.py): a request joins `running` once every rank has its KV, fails once any
        rank's prefill failed or the leader's deadline passed."""
        for msg in self.ep.control.receive():
            if isinstance(msg, (KVDone, KVFailed)) and (msg.room in self.awaiting or msg.room in self.quarantine):
                self.heard[msg.room] = msg
                if msg.room in self.quarantine and isinstance(msg, KVDone):
                    self.ep.control.send(self.prefills[msg.room].endpoint, KVAck(msg.room))
        now = time.monotonic()
        waiting, held, queue = sorted(self.awaiting), sorted(self.quarantine), list(self.bootstrapping)
        found = [self.directory.get(r.bootstrap.host, r.bootstrap.port, r.bootstrap.room) for r in queue]
        usable = [isinstance(f, Prefill) and not f.problems for f in found]
        facts = self.agreement.facts(
            [isinstance(self.heard.get(r), KVDone) for r in waiting]
            + [isinstance(self.heard.get(r), KVFailed) for r in waiting]
            + [r in self.heard for r in held] + usable
            + [f is not None and not ok for f, ok in zip(found, usable)],
            [now > self.awaiting[r].deadline for r in waiting] + [now > self.quarantine[r].until for r in held]
            + [now > r.deadline for r in queue])
        w, h, q = len(waiting), len(held), len(queue)
        for i, room in enumerate(waiting):
            self._settle(self.awaiting[room], done=facts.every(i), failed=facts.some(w + i),
                         ended=facts.counts[i] + facts.counts[w + i] == facts.size, expired=facts.leader[i])
        for j, room in enumerate(held):
            if facts.every(2 * w + j) or facts.leader[w + j]:
                self._free(self.quarantine.pop(room))
                self.prefills.pop(room, None)
                self.heard.pop(room, None)
        for k, req in enumerate(queue):
            bad, ok, expired = facts.some(2 * w + h + q + k), facts.every(2 * w + h + k), facts.leader[w + h + k]
            reserved = not bad and ok and self._reserve(req)
            if not (bad or reserved or expired):
                break  # in arrival order: a long prompt waiting for slots is not starved by short ones
            self.bootstrapping.popleft()  # req: every request before it has left too
            if bad:
                self._fail(req, self._lookup_problem(req, found[k]))
            elif reserved:
                self._request_kv(req, found[k])
            else:
                self._fail(req, "no answer from the prefill's bootstrap server, or no free KV slots, within "
                                f"--disaggregation-transfer-timeout ({self.ep.timeout_s:g} s)")

    def _settle(self, req: Req, *, done: bool, failed: bool, ended: bool, expired: bool) -> None:
        """A request awaiting its KV, given what the ranks heard: `done` all of them got KVDone,
        `failed` one got KVFailed, `ended` every rank's write has ended either way."""
        room = req.bootstrap.room
        heard = self.heard.get(room)
        if failed:
            reason = heard.reason if isinstance(heard, KVFailed) else "failed on another tensor-parallel rank"
            self._fail(req, f"the prefill server failed: {reason}", written=not ended)
        elif done:
            assert isinstance(heard, KVDone)
            del self.awaiting[room], self.heard[room]
            self.ep.control.send(self.prefills.pop(room).endpoint, KVAck(room))
            self._start_decoding(req, heard)
        elif expired:
            self._fail(req, "the prefill server did not deliver the KV within --disaggregation-transfer-timeout "
                            f"({self.ep.timeout_s:g} s)")
            self.directory.forget(req.bootstrap.host, req.bootstrap.port)

    @staticmethod
    def _lookup_problem(req: Req, found: Prefill | Exception | None) -> str:
        where = f"{req.bootstrap.host}:{req.bootstrap.port}"
        if isinstance(found, Exception):
            return str(found)
        if isinstance(found, Prefill) and found.problems:
            return f"the prefill server at {where} does not match this decode server: " + "; ".join(found.problems)
        return f"the prefill server at {where} could not be looked up on another tensor-parallel rank"

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
            prompt_digest=prompt_digest(req.input_ids), layout=self.ep.layout, head_start=prefill.head_start,
            fanout=prefill.fanout))
        self.awaiting[room] = req
        self.prefills[room] = prefill
        req.state = ReqState.AWAITING_KV
        req.deadline = time.monotonic() + self.ep.timeout_s

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
            if not written:  # else kept: the quarantine ends when every rank heard the write end
                self.prefills.pop(room, None)
                self.heard.pop(room, None)
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

