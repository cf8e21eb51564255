"""A scheduler process: one per rank. It forms the tensor-parallel world, builds the model
runner and the Scheduler, then runs the step loop.

Each DP group (one with --dp-size 1) runs one Scheduler on its attention-TP ranks; the group's
first rank, its leader, alone talks to the TokenizerManager over ZMQ. Each step the leader
broadcasts what it received to the other ranks of its group (StepMessages, msgpack bytes over
the group's gloo CPU group), so every rank of the group applies the same messages in the same
order and makes the same scheduling decisions (SPMD).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING

import msgspec
import torch
import zmq

from meshserve.cluster.comm import RankGroup
from meshserve.cluster.distributed import init_parallel_groups
from meshserve.cluster.groups import ParallelGroups
from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.topology import Topology
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.model_runner import ModelRunner
from meshserve.messages import (AbortReq, BatchOut, FlushCacheOut, FlushCacheReq, FromScheduler, GenerateReq,
                                SchedulerFailed, SchedulerReady, StepMessages, ToScheduler, from_scheduler_codec,
                                step_messages_codec, to_scheduler_codec)
from meshserve.scheduler.scheduler import Scheduler
from meshserve.server.tokenizer_manager import load_tokenizer

if TYPE_CHECKING:
    from meshserve.disagg.decode_side import DecodeSide
    from meshserve.disagg.prefill_side import PrefillSide

logger = logging.getLogger("meshserve")

STATS_INTERVAL_S = 1.0
IDLE_POLL_MS = 200  # how long an idle leader waits for messages before the next (empty) step
PD_POLL_MS = 2  # the wait instead while PD requests wait for a peer or a transfer (no compute)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


class LeaderLink:
    """The leader's two ZMQ sockets to the TokenizerManager: Unix sockets on node 0, loopback
    relays through node 0's scheduler-link gate elsewhere (meshserve.cluster.scheduler_link)."""

    def __init__(self, endpoints: SchedulerEndpoints, dp_rank: int) -> None:
        self.dp_rank = dp_rank
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.connect(endpoints.inbox(dp_rank))
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.connect(endpoints.from_scheduler)
        self._poller = zmq.Poller()
        self._poller.register(self._inbox, zmq.POLLIN)
        self._in_codec, self._out_codec = to_scheduler_codec(), from_scheduler_codec()

    def receive(self, timeout_ms: int) -> list[ToScheduler]:
        """Everything queued now; waits up to timeout_ms for the first message."""
        messages: list[ToScheduler] = []
        while self._poller.poll(timeout_ms):
            timeout_ms = 0
            try:
                messages.append(self._in_codec.decode(self._inbox.recv()))
            except msgspec.DecodeError as exc:
                logger.warning("dropped a malformed message: %s", exc)
        return messages

    def send(self, msg: FromScheduler) -> None:
        self._outbox.send(self._out_codec.encode(msg))

    def close(self) -> None:
        self._outbox.close(linger=2000)
        self._inbox.close(linger=0)


def run_scheduler_process(args: ServerArgs, endpoints: SchedulerEndpoints | None, local_rank: int,
                          rendezvous: str | None) -> None:
    """Process entry point. Exits 0 on a clean stop, 1 after reporting a fatal error."""
    _die_with_parent()
    topology = Topology.from_args(args)
    rank = topology.global_rank(local_rank)
    logging.basicConfig(level=args.http.log_level.upper(),
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    layout = topology.layout
    dp_rank = layout.dp_rank(rank)
    link = LeaderLink(endpoints, dp_rank) if rank in layout.dp_leaders and endpoints is not None else None
    try:
        device = torch.device(args.resolved_device())
        if device.type == "cuda":
            device = torch.device("cuda", topology.gpu_id(local_rank))
            torch.cuda.set_device(device)
        logger.info("joining the process group of %d ranks", topology.world_size)
        groups = init_parallel_groups(layout=topology.layout, rank=rank, rendezvous=rendezvous, device=device,
                                      timeout_s=args.parallel.dist_timeout or DEFAULT_COLLECTIVE_TIMEOUT_S)
        scheduler = _build_scheduler(args, device, groups)
        tp = groups.attn_tp
        if args.disagg.disaggregation_mode != "null":
            scheduler.pd = _pd_side(args, scheduler, dp_rank, tp)
        if link is not None:
            link.send(SchedulerReady(
                max_total_tokens=scheduler.pool.size, max_running_requests=scheduler.max_running,
                context_length=scheduler.model_config.context_length, vocab_size=scheduler.model_config.vocab_size,
                device=str(device), grammar_off=scheduler.grammar.off_reason, dp_rank=dp_rank))
        try:
            _serve(scheduler, link, tp)
        finally:
            if scheduler.pd is not None:
                scheduler.pd.close()
    except Exception as exc:  # report, then die: the TokenizerManager fails every request
        logger.error("scheduler failed:\n%s", traceback.format_exc())
        if link is not None:
            link.send(SchedulerFailed(f"rank {rank}: {type(exc).__name__}: {exc}"))
            link.close()
        sys.exit(1)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies. A rank blocked in a collective
    cannot notice by itself, and an orphan would hold its GPU until the collective timeout."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _build_scheduler(args: ServerArgs, device: torch.device, groups: ParallelGroups) -> Scheduler:
    model_config = ModelConfig.from_server_args(args)
    runner = ModelRunner(args, model_config, device=device, groups=groups)
    tokenizer = load_tokenizer(model_config.tokenizer_path)  # never runs model-directory code
    return Scheduler(args, model_config, runner, tokenizer)


def _pd_side(args: ServerArgs, scheduler: Scheduler, dp_rank: int, tp: RankGroup) -> PrefillSide | DecodeSide:
    """This rank's end of prefill-decode disaggregation: its KV pool registered with the transfer
    backend; a prefill rank also registers at the bootstrap server on its node 0, as rank
    `tp.rank` of DP group `dp_rank` (a DP group's KV pool is its attention-TP ranks')."""
    from meshserve.disagg.agreement import Agreement
    from meshserve.disagg.bootstrap_client import register_rank
    from meshserve.disagg.decode_side import DecodeSide
    from meshserve.disagg.kv_endpoint import KVEndpoint, reachable_host
    from meshserve.disagg.prefill_side import PrefillSide
    from meshserve.disagg.protocol import Registration

    endpoint = KVEndpoint.open(args, scheduler.model_config, scheduler.pool, tp_rank=tp.rank, tp_size=tp.size)
    if args.disagg.disaggregation_mode == "decode":
        return DecodeSide(scheduler, endpoint, Agreement(tp))
    # The bootstrap server runs beside node 0's HTTP server; other nodes reach node 0 at the
    # host of --dist-init-addr.
    p = args.parallel
    host = reachable_host(args.http.host) if p.node_rank == 0 else p.dist_init_addr.rpartition(":")[0].strip("[]")
    register_rank(host, args.disagg.disaggregation_bootstrap_port, Registration(
        tp_rank=tp.rank, dp_rank=dp_rank, dp_size=args.parallel.dp_size, endpoint=endpoint.control.endpoint,
        metadata=endpoint.backend.local_metadata(), layout=endpoint.layout))
    return PrefillSide(scheduler, endpoint, Agreement(tp))


def _serve(scheduler: Scheduler, link: LeaderLink | None, tp: RankGroup) -> None:
    parent = os.getppid()
    codec = step_messages_codec()
    last_stats = 0.0
    while True:
        if link is not None:
            # Under DP attention the other DP groups wait for this one at every step's exchange.
            busy = scheduler.has_compute or scheduler.runner.dp_peers_busy
            wait = 0 if busy else PD_POLL_MS if scheduler.awaits_peers else IDLE_POLL_MS
            messages = link.receive(wait)
            step = StepMessages(messages, stop=os.getppid() != parent)
            if tp.size > 1:
                tp.broadcast_bytes(codec.encode(step))
        else:
            step = codec.decode(tp.broadcast_bytes(None))
        for msg in step.messages:
            if isinstance(msg, GenerateReq):
                scheduler.add_request(msg)
            elif isinstance(msg, AbortReq):
                scheduler.abort(msg.rid, msg.message)
            elif isinstance(msg, FlushCacheReq):
                ok, why = scheduler.flush_cache()
                if link is not None:
                    # Outputs of this step's aborts go first: a client that sees the flush
                    # succeed has seen every earlier request end (and may reuse its rid).
                    if outputs := scheduler.take_outputs():
                        link.send(BatchOut(outputs))
                    link.send(FlushCacheOut(ok, why, link.dp_rank))
        if step.stop:
            logger.error("the server process is gone; scheduler exits")
            return
        scheduler.step()
        if link is None:
            scheduler.take_outputs()  # only the leader reports
            continue
        outputs = scheduler.take_outputs()
        if outputs:
            link.send(BatchOut(outputs))
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            link.send(msgspec.structs.replace(scheduler.load(), dp_rank=link.dp_rank))
            last_stats = now
