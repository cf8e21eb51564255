"""PrefillSide: a prefill server's part of the PD protocol, driven by its Scheduler.

A request with bootstrap fields is prefilled as usual (chunking, radix cache); once its first
token is sampled the scheduler `hold`s it here instead of running it:

  AWAITING_KV   until the decode's KVRequest for its room (one that came first is kept by room)
  TRANSFERRING  its prompt's KV slots are written into the decode's slots
  AWAITING_ACK  KVDone (with the first token) was sent; the KV is released on the decode's KVAck

Each state ends by the transfer-timeout deadline. A failure sends KVFailed and ends the request
with an abort (the client gets an error). Invariant: KVFailed is sent for a room only once no
write of it can still land in the decode's slots — a write abandoned by timeout or abort is
polled ("draining") until the backend reports it ended, or for one more timeout, after which
the decode's own deadline-plus-margin has freed those slots anyway.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshserve.disagg.agreement import Agreement
from meshserve.disagg.kv_endpoint import KVEndpoint
from meshserve.disagg.protocol import KVAck, KVDone, KVFailed, KVRequest, prompt_digest
from meshserve.disagg.transfer import TransferError, TransferHandle, TransferStatus
from meshserve.messages import FinishReason
from meshserve.scheduler.request import Req, ReqState

if TYPE_CHECKING:
    from meshserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("meshserve")


@dataclass
class _Drain:
    """An abandoned write, polled until it ended; then the decode hears KVFailed."""

    handle: TransferHandle
    room: int
    endpoint: str
    reason: str
    until: float


class PrefillSide:
    def __init__(self, scheduler: Scheduler, endpoint: KVEndpoint, agreement: Agreement) -> None:
        self.sched = scheduler
        self.ep = endpoint
        self.agreement = agreement
        self.held: dict[int, Req] = {}  # room -> request in a PD state
        # room -> decode rank endpoint -> its KVRequest (one per decode rank sharing our heads)
        self.kv_requests: dict[int, dict[str, KVRequest]] = {}
        self.early_until: dict[int, float] = {}  # room -> expiry of KVRequests whose request is not held yet
        self.transfers: dict[tuple[int, str], TransferHandle] = {}  # (room, decode endpoint) -> write in flight
        self.written: dict[int, int] = {}  # room -> writes that ended well (KVDone sent)
        self.draining: list[_Drain] = []
        # This rank's facts about held rooms, combined over the ranks in `poll`:
        self.acks: dict[int, int] = {}  # room -> KVAcks from its decode peers
        self.problems: dict[int, str] = {}  # its side failed, and why

    @property
    def busy(self) -> bool:
        """Requests in PD states: the same on every rank."""
        return bool(self.held)

    @property
    def local_work(self) -> bool:
        """This rank's own pending work: early KVRequests, abandoned writes being drained."""
        return bool(self.early_until or self.draining)

    def stats(self) -> dict[str, int]:
        states = [req.state for req in self.held.values()]
        return dict(num_awaiting_kv=states.count(ReqState.AWAITING_KV),
                    num_awaiting_ack=states.count(ReqState.AWAITING_ACK),
                    num_bootstrapping=0,
                    kv_transfers_in_flight=len(self.transfers) + len(self.draining))

    def admit(self, req: Req) -> bool:
        return False  # prefilled in the waiting queue like any other request

    def takes(self, req: Req) -> bool:
        """True for the first token of a disaggregated request: it goes to `hold`, not to running."""
        return req.bootstrap is not None and len(req.output_ids) == 1

    def hold(self, req: Req) -> None:
        room = req.bootstrap.room
        if room in self.held:
            self._finish(req, f"bootstrap room {room} is already in use on this prefill server", failed=True)
            return
        self.held[room] = req
        self._enter(req, ReqState.AWAITING_KV)
        if room in self.kv_requests:
            del self.early_until[room]
            for msg in list(self.kv_requests[room].values()):
                self._start(req, msg)

    # -- each step -------------------------------------------------------------------------

    def poll(self) -> None:
        """This rank's own protocol steps (its KVRequests, its write, its KVDone) happen as they
        come; ending a request is agreed by the tensor-parallel ranks (agreement.py): it
        finishes once every rank's decode peer acknowledged, fails once any rank's transfer
        failed or the leader's deadline passed."""
        for msg in self.ep.control.receive():
            if isinstance(msg, KVRequest):
                self._on_kv_request(msg)
            elif isinstance(msg, KVAck) and msg.room in self.held:
                self.acks[msg.room] = self.acks.get(msg.room, 0) + 1
        for (room, endpoint), handle in list(self.transfers.items()):
            state = self.ep.backend.status(handle)
            if state is not TransferStatus.PENDING:
                self.ep.backend.release(handle)
                del self.transfers[room, endpoint]
                self._transfer_ended(self.held[room], self.kv_requests[room][endpoint], state is TransferStatus.DONE)
        now = time.monotonic()
        rooms = sorted(self.held)
        facts = self.agreement.facts([self._all_acked(r) for r in rooms] + [r in self.problems for r in rooms],
                                     [now > self.held[r].deadline for r in rooms])
        for i, room in enumerate(rooms):
            req = self.held[room]
            if facts.some(len(rooms) + i):
                self._finish(req, self.problems.get(room, "the KV transfer failed on another tensor-parallel rank"),
                             failed=True)
            elif facts.every(i):
                self._finish(req, None)
            elif facts.leader[i]:
                self._expire(req)
        for room in [r for r, until in self.early_until.items() if now > until]:
            del self.early_until[room], self.kv_requests[room]
        self._poll_drains(now)

    def _all_acked(self, room: int) -> bool:
        """Every decode rank that shares our heads for `room` acknowledged its KV."""
        msgs = self.kv_requests.get(room)
        return bool(msgs) and self.acks.get(room, 0) >= next(iter(msgs.values())).fanout

    def _on_kv_request(self, msg: KVRequest) -> None:
        req = self.held.get(msg.room)
        peers = self.kv_requests.setdefault(msg.room, {})
        if msg.endpoint in peers:
            return  # a duplicate: the first one stands
        peers[msg.endpoint] = msg
        if req is None:  # not prefilled yet (or never arriving: it expires)
            self.early_until.setdefault(msg.room, time.monotonic() + self.ep.timeout_s)
        elif req.state is not ReqState.AWAITING_ACK:
            self._start(req, msg)

    def _start(self, req: Req, msg: KVRequest) -> None:
        n = len(req.input_ids)
        problems = self.ep.layout.pairing_problems(msg.layout)
        if len(msg.slots) != n or msg.prompt_digest != prompt_digest(req.input_ids):
            problems.append(f"the decode server's prompt ({len(msg.slots)} tokens) is not this server's "
                            f"({n} tokens): both must get the same request")
        if problems:
            self.problems[msg.room] = "prefill and decode servers do not match: " + "; ".join(problems)
            return
        try:
            peer = self.ep.backend.add_peer(msg.metadata)
            src, dst = self.ep.rows_to(msg.bases, self.sched.kv.slots(req, n), msg.slots,
                                       head_start=msg.head_start, heads=msg.layout.kv_heads)
            self.transfers[msg.room, msg.endpoint] = self.ep.backend.write(peer, src, dst)
        except (TransferError, ValueError) as exc:
            self.problems[msg.room] = f"cannot start the KV transfer to the decode server: {exc}"
            return
        self._enter(req, ReqState.TRANSFERRING)

    def _transfer_ended(self, req: Req, msg: KVRequest, ok: bool) -> None:
        if not ok:
            self.problems[msg.room] = "the KV transfer to the decode server failed"
            return
        logprob = req.unsent_logprobs[0] if req.return_logprob and req.unsent_logprobs else None
        top = req.unsent_top_logprobs[0] if req.top_logprobs_num and req.unsent_top_logprobs else []
        self.ep.control.send(msg.endpoint, KVDone(room=msg.room, token=req.output_ids[0], logprob=logprob,
                                                  top_logprobs=top))
        self.written[msg.room] = self.written.get(msg.room, 0) + 1
        if self.written[msg.room] == msg.fanout:
            self._enter(req, ReqState.AWAITING_ACK)

    def _expire(self, req: Req) -> None:
        what = {ReqState.AWAITING_KV: "the decode server did not ask for the KV",
                ReqState.TRANSFERRING: "the KV transfer did not finish",
                ReqState.AWAITING_ACK: "the decode server did not acknowledge the KV"}[req.state]
        self._finish(req, f"{what} within --disaggregation-transfer-timeout ({self.ep.timeout_s:g} s)",
                     failed=True)

    def abort(self, rid: str, message: str) -> bool:
        for req in self.held.values():
            if req.rid == rid:
                self._finish(req, message, failed=True)
                return True
        return False

    # -- ending a request ------------------------------------------------------------------

    def _finish(self, req: Req, reason: str | None, *, failed: bool = False) -> None:
        """End `req` (an error when `failed`) and release its KV (into the radix cache). The
        decode hears KVFailed at once, or, while a write is in flight, once it has ended; a
        write still reading released KV can only spoil slots that the decode then discards."""
        room = req.bootstrap.room
        if self.held.get(room) is req:
            del self.held[room]
            self.acks.pop(room, None)
            self.problems.pop(room, None)
            self.written.pop(room, None)
        for endpoint in self.kv_requests.pop(room, {}):
            handle = self.transfers.pop((room, endpoint), None)
            if not failed:
                continue
            if handle is not None:  # still writing: the decode rank hears once it has ended
                self.draining.append(_Drain(handle, room, endpoint, reason or "aborted",
                                            time.monotonic() + self.ep.timeout_s))
            else:
                self.ep.control.send(endpoint, KVFailed(room, reason or "aborted"))
        if failed:
            logger.warning("PD request %s (room %d) failed: %s", req.rid, room, reason)
            req.finish = FinishReason("abort", message=reason)
        else:
            req.finish = self.sched.finish_checker.check(req) or FinishReason("length")
        self.sched.retire(req)

    def _poll_drains(self, now: float) -> None:
        for drain in list(self.draining):
            if self.ep.backend.status(drain.handle) is TransferStatus.PENDING and now <= drain.until:
                continue
            self.ep.backend.release(drain.handle)
            self.draining.remove(drain)
            self.ep.control.send(drain.endpoint, KVFailed(drain.room, drain.reason))

    def _enter(self, req: Req, state: ReqState) -> None:
        req.state = state
        req.deadline = time.monotonic() + self.ep.timeout_s

    def close(self) -> None:
        self.ep.close()
