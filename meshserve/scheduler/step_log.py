"""What the scheduler did, step by step: SGLang-style batch lines in the log (every prefill batch,
every --decode-log-interval decode steps) and, with --step-trace-file, one JSON line per forward
step for profiling a whole run (`python -m meshserve.bench.step_trace` summarises such a file).

Only a DP group's leader writes: its attention-TP peers run the very same steps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import msgspec

logger = logging.getLogger("meshserve")


class StepRecord(msgspec.Struct, frozen=True):
    """One forward step, as the host saw it. `t` is when the step was launched (seconds since the
    scheduler started); the gap to the next record's `t` is the step's period — with overlap
    scheduling the host launches a decode step, then waits for the previous one's tokens, so in
    steady state that period is the device's time for one step."""

    t: float
    mode: str  # "prefill" (prompts only), "mixed" (prompts + running decodes), "decode"
    seqs: int  # sequences in the batch
    tokens: int  # tokens computed (new prompt tokens + one per decode)
    running: int  # sequences decoding after the step was scheduled
    waiting: int  # requests not yet admitted
    kv_used: int  # KV slots in use (running sequences and the prefix cache's locked part)
    retracted: int  # retractions so far


@dataclass
class StepLog:
    decode_log_interval: int
    pool_size: int
    active: bool  # a DP group's leader; its attention-TP peers record nothing
    trace: IO[bytes] | None = None
    _start: float = 0.0
    _decodes: int = 0  # decode steps in the current window (between two decode lines)
    _window_start: float = 0.0
    _window_tokens: int = 0
    _prev_t: float = 0.0  # `t` of the last step recorded

    @classmethod
    def open(cls, *, decode_log_interval: int, pool_size: int, trace_file: str | None, leader: bool,
             dp_rank: int, dp_size: int) -> StepLog:
        trace = None
        if leader and trace_file is not None:
            path = Path(trace_file)
            if dp_size > 1:  # one file per DP group
                path = path.with_name(f"{path.stem}.dp{dp_rank}{path.suffix}")
            trace = path.open("wb", buffering=0)  # whole lines even when the process is killed
        return cls(decode_log_interval, pool_size, leader, trace, _start=time.perf_counter())

    def record(self, step: StepRecord, *, cached_tokens: int = 0) -> None:
        """Only called on an active (leader) log."""
        if self.trace is not None:
            self.trace.write(msgspec.json.encode(step) + b"\n")
        usage = step.kv_used / self.pool_size
        if step.mode != "decode":
            self._prev_t = step.t
            logger.info("prefill batch: %d seqs, %d new tokens, %d cached tokens, KV usage %.2f, "
                        "%d running, %d waiting", step.seqs, step.tokens, cached_tokens, usage, step.running,
                        step.waiting)
            return
        # A window's rate runs from the launch of the step before its first decode step (whose
        # tokens that decode step delivers), so idle time between requests does not count.
        if self._decodes == 0:
            self._window_start, self._window_tokens = self._prev_t, 0
        self._prev_t = step.t
        self._decodes += 1
        self._window_tokens += step.tokens
        if self._decodes >= self.decode_log_interval:
            rate = self._window_tokens / max(step.t - self._window_start, 1e-9)
            logger.info("decode: %d running, KV usage %.2f (%d tokens), %.1f tok/s generated, %d waiting, "
                        "%d retracted so far", step.running, usage, step.kv_used, rate, step.waiting, step.retracted)
            self._decodes = 0

    def now(self) -> float:
        """Seconds since the scheduler started: a step's `t`."""
        return time.perf_counter() - self._start
