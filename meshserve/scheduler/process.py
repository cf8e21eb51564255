"""The scheduler process: builds the model runner and the Scheduler, then serves the ZMQ link to
the TokenizerManager until told to stop or until the parent process disappears."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import msgspec
import torch
import zmq

from meshserve.cluster.comm import SINGLE
from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.model_runner import ModelRunner
from meshserve.messages import (AbortReq, BatchOut, FlushCacheOut, FlushCacheReq, GenerateReq, SchedulerFailed,
                                SchedulerReady, from_scheduler_codec, to_scheduler_codec)
from meshserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("meshserve")

STATS_INTERVAL_S = 1.0
IDLE_POLL_MS = 500  # also how often an idle scheduler notices that its parent is gone


def run_scheduler_process(args: ServerArgs, endpoints: SchedulerEndpoints, rank: int) -> None:
    """Process entry point. Exits 0 on a clean stop, 1 after reporting a fatal error."""
    logging.basicConfig(level=args.http.log_level.upper(),
                        format=f"%(asctime)s [scheduler {rank}] %(levelname)s %(message)s")
    parent = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(endpoints.to_scheduler)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(endpoints.from_scheduler)
    out_codec = from_scheduler_codec()
    try:
        scheduler = _build_scheduler(args)
        outbox.send(out_codec.encode(SchedulerReady(
            max_total_tokens=scheduler.pool.size, max_running_requests=scheduler.max_running,
            context_length=scheduler.model_config.context_length, vocab_size=scheduler.model_config.vocab_size,
            device=str(scheduler.runner.device))))
        _serve(scheduler, inbox, outbox, parent)
    except Exception as exc:  # report, then die: the TokenizerManager fails every request
        logger.error("scheduler failed:\n%s", traceback.format_exc())
        outbox.send(out_codec.encode(SchedulerFailed(f"{type(exc).__name__}: {exc}")))
        outbox.close(linger=2000)
        sys.exit(1)


def _build_scheduler(args: ServerArgs) -> Scheduler:
    model_config = ModelConfig.from_server_args(args)
    device = torch.device(args.resolved_device())
    if device.type == "cuda":
        torch.cuda.set_device(args.parallel.base_gpu_id)
        device = torch.device("cuda", args.parallel.base_gpu_id)
    runner = ModelRunner(args, model_config, device=device, tp=SINGLE)
    tokenizer = None
    if model_config.tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer_path, local_files_only=True,
                                                  trust_remote_code=args.model.trust_remote_code)
    return Scheduler(args, model_config, runner, tokenizer)


def _serve(scheduler: Scheduler, inbox: zmq.Socket, outbox: zmq.Socket, parent: int) -> None:
    in_codec, out_codec = to_scheduler_codec(), from_scheduler_codec()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    last_stats = 0.0
    while True:
        timeout = 0 if scheduler.has_work else IDLE_POLL_MS
        while poller.poll(timeout):
            timeout = 0
            try:
                msg = in_codec.decode(inbox.recv())
            except msgspec.DecodeError as exc:
                logger.warning("dropped a malformed message: %s", exc)
                continue
            if isinstance(msg, GenerateReq):
                scheduler.add_request(msg)
            elif isinstance(msg, AbortReq):
                scheduler.abort(msg.rid, msg.message)
            elif isinstance(msg, FlushCacheReq):
                ok, why = scheduler.flush_cache()
                outbox.send(out_codec.encode(FlushCacheOut(ok, why)))
        if os.getppid() != parent:
            logger.error("the server process is gone; scheduler exits")
            return
        scheduler.step()
        outputs = scheduler.take_outputs()
        if outputs:
            outbox.send(out_codec.encode(BatchOut(outputs)))
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            outbox.send(out_codec.encode(scheduler.load()))
            last_stats = now
