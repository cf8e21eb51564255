"""The scheduler: continuous batching over a paged KV cache with a radix prefix cache.

Each `step()` runs one forward pass: an EXTEND batch (new prompts, chunks of long prompts,
re-admitted retracted requests) when any can be admitted, otherwise a DECODE batch of every
running sequence. Everything here is deterministic given the order of incoming messages, which
is what lets every rank of a DP group (its attention-TP group) run the same decisions (DESIGN §2).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from meshserve.cache.radix_cache import NoPrefixCache, RadixCache
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.forward_batch import ForwardMode
from meshserve.executor.model_runner import ModelRunner, StepInput
from meshserve.executor.penalty_counts import PenaltyCounts
from meshserve.disagg.agreement import Agreement
from meshserve.executor.sampler import SampleOutput, Sampler, SamplingBatch
from meshserve.grammar.backend import GrammarBackend
from meshserve.grammar.queue import NO_TOKENIZER_MESSAGE, OFF_MESSAGE, GrammarQueue
from meshserve.messages import FinishReason, GenerateReq, ReqOutput, SchedulerStats, TopLogprob
from meshserve.scheduler.finish import FinishChecker
from meshserve.scheduler.kv_ledger import KVLedger
from meshserve.scheduler.policy import PrefillBudget, PrefillPolicy
from meshserve.scheduler.request import Req, ReqState
from meshserve.scheduler.step_log import StepLog, StepRecord

if TYPE_CHECKING:
    from meshserve.disagg.decode_side import DecodeSide
    from meshserve.disagg.prefill_side import PrefillSide

logger = logging.getLogger("meshserve")

# Admission reserves KV for the tokens running sequences are still expected to generate:
# ratio × (max_new_tokens - generated). The ratio starts cautious, decays while decoding goes
# well (most sequences stop well before max_new_tokens) and jumps back up after a retraction.
# --schedule-conservativeness scales the start and the floor (SGLang's meaning); the values below
# are those at its default of 1.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
# Steps that decode the running sequences (decode or mixed) from the start to the floor, whatever
# the scaling: 0.001 a step at the default, as before the flag existed.
NEW_TOKEN_RATIO_DECAY_STEPS = 600
# Per retraction, unscaled: a retraction is evidence the reserve was too small, at any setting.
NEW_TOKEN_RATIO_BUMP = 0.1
MAX_NEW_TOKEN_RATIO = 1.0  # a sequence never needs more than all the tokens it has left


@dataclass(frozen=True)
class NewTokenRatioBounds:
    """Where the admission ratio starts, its floor, and how much it decays per decoding step."""

    init: float
    floor: float
    decay: float

    @classmethod
    def scaled(cls, conservativeness: float) -> NewTokenRatioBounds:
        init = min(MAX_NEW_TOKEN_RATIO, INIT_NEW_TOKEN_RATIO * conservativeness)
        floor = min(init, MIN_NEW_TOKEN_RATIO * conservativeness)  # init >= floor, so decay >= 0
        return cls(init=init, floor=floor, decay=(init - floor) / NEW_TOKEN_RATIO_DECAY_STEPS)


@dataclass
class _Sampled:
    """A step's sampled tokens, being copied to the host; `_advance` reads them."""

    reqs: list[Req]
    tokens: SampleOutput  # host tensors, valid once `copied` has completed
    copied: torch.cuda.Event | None  # None on the CPU, where the copy is done at once

    @functools.cached_property
    def reqs_set(self) -> set[Req]:
        return set(self.reqs)

    @classmethod
    def start_copy(cls, reqs: list[Req], out: SampleOutput) -> _Sampled:
        """Queue the device-to-host copy now and mark its end with an event: reading the tokens
        later waits for this step only. (A plain `.tolist()` issued after the next step was
        launched would wait for that step too, since the copy would queue behind it.)"""
        if out.token_ids.device.type != "cuda":
            return cls(reqs, out, None)

        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)  # into pinned memory

        host = SampleOutput(token_ids=to_host(out.token_ids), logprobs=to_host(out.logprobs),
                            top_logprob_ids=to_host(out.top_logprob_ids),
                            top_logprob_vals=to_host(out.top_logprob_vals))
        copied = torch.cuda.Event()
        copied.record()
        return cls(reqs, host, copied)


@dataclass
class _Extend:
    req: Req
    slots: torch.Tensor  # KV slots (CPU int64) of the new tokens computed for req in this step
    cached: int = 0  # prefix tokens found in the cache when req was admitted in this step

    @property
    def length(self) -> int:
        return self.slots.numel()


class Scheduler:
    def __init__(self, args: ServerArgs, model_config: ModelConfig, runner: ModelRunner, tokenizer=None, *,
                 defaults_of: str | None = None) -> None:
        # The device type whose scheduling defaults apply (chunk size, overlap, mixed chunks): the
        # runner's, except in a replay of a GPU run on the CPU (meshserve/bench/schedule_replay.py).
        device_type = defaults_of or runner.device.type
        self.model_config = model_config
        self.runner = runner
        self.pool = runner.kv_pool
        self.rows = runner.req_to_token
        self.cache: RadixCache | NoPrefixCache = (
            NoPrefixCache(self.pool) if args.cache.disable_radix_cache else RadixCache(self.pool))
        self.kv = KVLedger(self.pool, self.rows, self.cache)
        self.policy = PrefillPolicy(
            schedule_policy=args.scheduler.schedule_policy,
            max_prefill_tokens=args.scheduler.max_prefill_tokens,
            chunked_prefill_size=args.scheduler.resolved_chunked_prefill_size(device_type),
        )
        self.max_running = runner.max_running_requests
        self.finish_checker = FinishChecker(eos_token_ids=model_config.eos_token_ids, tokenizer=tokenizer)
        self.sampler = Sampler()
        self.penalty_counts = PenaltyCounts(model_config.vocab_size, runner.device)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None  # at most one request is mid-way through a chunked prefill
        self.stream_interval = args.scheduler.stream_interval
        self.check_batches = args.scheduler.enable_deterministic_check and runner.groups.attn_tp.size > 1
        # Overlap scheduling (default on CUDA): at most one decode step in flight whose tokens the
        # host has not read. While one is, each of its sequences has kv_len == seq_len (the
        # in-flight token has KV written by the step but is not in output_ids yet).
        self.overlap = args.scheduler.resolved_overlap_schedule(device_type)
        self.mixed_chunk = args.scheduler.resolved_mixed_chunk(device_type)
        self._in_flight: _Sampled | None = None
        self._forwarded = False  # this step ran a forward pass
        self.ratio_bounds = NewTokenRatioBounds.scaled(args.scheduler.schedule_conservativeness)
        self.new_token_ratio = self.ratio_bounds.init
        self._reserved = 0  # during _admit: expected future tokens of running + admitted sequences
        self._outputs: list[ReqOutput] = []
        # Structured requests wait here, not in `waiting`, while their grammar compiles.
        off = (OFF_MESSAGE if args.scheduler.grammar_backend == "none"
               else NO_TOKENIZER_MESSAGE if tokenizer is None else None)
        backend = None if off else GrammarBackend(tokenizer, model_config.vocab_size, model_config.eos_token_ids)
        self.grammar = GrammarQueue(backend, Agreement(runner.groups.attn_tp), off)
        # Prefill-decode disaggregation (--disaggregation-mode): set by the scheduler process.
        self.pd: PrefillSide | DecodeSide | None = None
        self.stats = dict(prompt_tokens=0, generation_tokens=0, cache_hit_tokens=0, num_retracted=0)
        s, groups = args.scheduler, runner.groups
        self.step_log = StepLog.open(decode_log_interval=s.decode_log_interval, pool_size=self.pool.size,
                                     trace_file=s.step_trace_file, leader=groups.attn_tp.rank == 0,
                                     dp_rank=groups.dp_rank, dp_size=args.parallel.dp_size)

    # -- requests in and out ---------------------------------------------------------------

    @property
    def has_compute(self) -> bool:
        """Some step has a forward pass to run (or a step's tokens to read)."""
        return bool(self.waiting or self.running or self.chunked or self._in_flight)

    @property
    def has_work(self) -> bool:
        """Anything at all to do: compute, or PD requests waiting for a peer or a transfer (the
        same on every rank), or grammars being compiled."""
        return self.has_compute or self.grammar.busy or (self.pd is not None and self.pd.busy)

    @property
    def awaits_peers(self) -> bool:
        """PD work that only needs the control socket and transfers polled, this rank's own
        included, or grammars being compiled: the step loop must not sleep long meanwhile."""
        return self.grammar.busy or (self.pd is not None and (self.pd.busy or self.pd.local_work))

    def add_request(self, msg: GenerateReq) -> None:
        req = Req.from_message(msg, self.model_config.context_length)
        problem = self._invalid(req)
        if problem is not None:
            req.finish = FinishReason("abort", message=problem)
            self._emit(req)
        elif req.output_limit == 0:
            req.finish = FinishReason("length")
            self._emit(req)
        elif self.pd is not None and req.bootstrap is not None and self.pd.admit(req):
            if req.sampling.grammar is not None:
                self.grammar.compile(req)  # its matcher is made when its first token arrives
        elif req.sampling.grammar is not None:
            self.grammar.add(req)  # joins `waiting` once compiled
        else:
            self.waiting.append(req)

    def _invalid(self, req: Req) -> str | None:
        """Last line of defence; the TokenizerManager already rejects these with a 400."""
        if not req.input_ids:
            return "the prompt is empty"
        if len(req.input_ids) >= self.model_config.context_length:
            return f"the prompt has {len(req.input_ids)} tokens, the context length is {self.model_config.context_length}"
        if min(req.input_ids) < 0 or max(req.input_ids) >= self.model_config.vocab_size:
            return f"token ids must be in [0, {self.model_config.vocab_size})"
        if len(req.input_ids) + 1 > self.pool.size:
            return f"the prompt needs more KV cache ({len(req.input_ids) + 1} tokens) than exists ({self.pool.size})"
        if req.sampling.grammar is not None and self.grammar.off_reason is not None:
            return self.grammar.off_reason
        return None

    def abort(self, rid: str, message: str) -> None:
        compiling = self.grammar.find(rid)
        if compiling is not None:
            self.grammar.remove(compiling)
            compiling.finish = FinishReason("abort", message=message)
            self._emit(compiling)
            return
        for req in [*self.waiting, *self.running, *([self.chunked] if self.chunked else [])]:
            if req.rid == rid and not req.finished:
                req.finish = FinishReason("abort", message=message)
                self.retire(req)
                return
        if self.pd is not None:
            self.pd.abort(rid, message)

    def flush_cache(self) -> tuple[bool, str]:
        if self.has_work:
            return False, "cannot flush the cache while requests are in flight"
        self.kv.reset()
        return True, ""

    def take_outputs(self) -> list[ReqOutput]:
        outputs, self._outputs = self._outputs, []
        return outputs

    def load(self) -> SchedulerStats:
        experts = self.runner.expert_load()
        return SchedulerStats(
            num_running=len(self.running) + (self.chunked is not None),
            num_waiting=len(self.waiting) + len(self.grammar.pending),
            used_tokens=self.kv.used_tokens,
            max_total_tokens=self.pool.size,
            idle_forwards=self.runner.idle_forwards,
            **self.stats,
            **(self.pd.stats() if self.pd is not None else {}),
            **({} if experts is None else dict(
                expert_tokens=experts.expert_tokens, ep_rank_tokens=experts.rank_tokens,
                eplb_rebalances=experts.rebalances, eplb_moved_experts=experts.moved_experts)),
        )

    # -- one step --------------------------------------------------------------------------

    def step(self) -> None:
        """One scheduling step: at most one forward pass. A step without one goes to
        ModelRunner.idle_step: under DP attention it still joins the other DP groups' forwards
        (every rank of the world runs the same number of forwards)."""
        self._forwarded = False
        self._step()
        if not self._forwarded:
            self.runner.idle_step()

    def _step(self) -> None:
        if self.pd is not None:
            self.pd.poll()  # control messages, transfers, deadlines; may add running requests
        for req, problem in self.grammar.poll():
            if problem is None:
                self.waiting.append(req)
            else:
                req.finish = FinishReason("abort", message=problem)
                self._emit(req)
        if self.waiting or self.chunked is not None:
            if not self._in_flight_reqs.isdisjoint(self.waiting):
                # A request retracted while its token was in flight is admitted with that token.
                self._complete_in_flight()
            # Admission needs no in-flight token (the step's KV slots are allocated already), so
            # a backlog that cannot be admitted yet does not stop the overlap.
            batch = self._admit()
            if batch:
                self._complete_in_flight()  # extend steps run in lockstep
                # The decodes ride after the prompts: backends attend to the trailing one-token
                # rows as decodes (ForwardBatch.decode_rows).
                decodes = self._decodes_as_extends() if self.mixed_chunk else []
                self._run_extend(batch + decodes, mixed=bool(decodes))
                if decodes:
                    self._decay_new_token_ratio()  # a token for every running sequence, as a decode step
                return
        if self.running:
            self._run_decode()
        else:
            self._complete_in_flight()

    def _admit(self) -> list[_Extend]:
        """Pick the extend work of this step: the chunked request first, then waiting requests in
        policy order, within the token budgets, free request rows and free KV."""
        batch: list[_Extend] = []
        if not self.waiting and self.chunked is None:
            return batch
        budget = self.policy.new_budget()
        self._reserved = sum(self._future_tokens(r) for r in self.running)
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            # With prompts waiting, a chunk takes half of the step's budget and the waiting prompts
            # share the rest, so short requests are served while a long prompt is still being
            # prefilled (instead of after all its chunks) and the long one still advances.
            share = budget.left - budget.left // 2 if self.waiting else budget.left
            if not self._plan_extend(req, budget, batch, limit=share):
                self.chunked = req  # no KV this step; try again next step
                return batch
        for req in self.policy.order(self.waiting, self.cache):
            if len(self.running) + len(batch) >= self.max_running or budget.exhausted:
                break
            # At most one request is mid-chunk: while one is, the others are taken whole.
            if not self._plan_extend(req, budget, batch, whole=self.chunked is not None):
                break
            self.waiting.remove(req)  # one that became the chunked request exhausted the budget
        return batch

    def _decodes_as_extends(self) -> list[_Extend]:
        """--enable-mixed-chunk: every running sequence's next token as a one-token extend
        (prefix = all it has computed), or nothing when the pool cannot give each a slot now
        (the next decode step evicts or retracts as usual)."""
        reqs = [req for req in self.running if not req.finished]
        if not reqs or not self.kv.room_for_decode(reqs):
            return []
        slots = self.kv.extend_each(reqs)
        return [_Extend(req, slots[i : i + 1]) for i, req in enumerate(reqs)]

    def _plan_extend(self, req: Req, budget: PrefillBudget, batch: list[_Extend], *, limit: int | None = None,
                     whole: bool = False) -> bool:
        """Give `req` a row, its cached prefix and KV slots for its next chunk (at most `limit`
        tokens; all it needs when `whole`); False if it must wait."""
        fresh = req.row is None
        if fresh:
            match = self.kv.match(req)
        remaining = req.seq_len - (match.length if fresh else req.kv_len)
        take = budget.take(remaining)
        if limit is not None:
            take = min(take, limit)
        if whole and take < remaining:
            take = 0
        # Head-room for what the running and already admitted sequences (and this one) are expected
        # to generate, so admitting a prompt does not soon force a retraction. A sequence that
        # would run alone needs only its first decode slot: it must never wait for a reservation.
        alone = not self.running and not batch
        reserve = 1 if alone else self._reserved + self._future_tokens(req) + 1
        if take <= 0 or not self.kv.room_for_extend(req, take, reserve):
            if fresh:
                self.kv.unmatch(match)
            return False
        if fresh and not self.kv.attach(req, match):  # no free row; attach unlocked the match
            return False
        budget.spend(take)
        self._reserved += self._future_tokens(req)
        if fresh and not req.output_ids:  # a retracted request's re-admission is not a cache hit
            req.cached_tokens = match.length
            self.stats["cache_hit_tokens"] += match.length
        req.state = ReqState.PREFILLING
        batch.append(_Extend(req, self.kv.extend(req, take), cached=match.length if fresh else 0))
        if take < remaining:
            self.chunked = req
        return True

    def _future_tokens(self, req: Req) -> int:
        return max(0, int(req.tokens_left * self.new_token_ratio))

    def _run_extend(self, batch: list[_Extend], *, mixed: bool) -> None:
        input_ids: list[int] = []
        positions: list[int] = []
        for item in batch:
            start = item.req.kv_len
            input_ids += item.req.tokens(start, start + item.length)
            positions += range(start, start + item.length)
        step = StepInput(
            mode=ForwardMode.EXTEND,
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=torch.cat([item.slots for item in batch]),
            req_rows=[item.req.row for item in batch],
            seq_lens=[item.req.kv_len + item.length for item in batch],
            extend_lens=[item.length for item in batch],
        )
        launched_at = self.step_log.now()
        logits = self._forward(step)
        done: list[tuple[int, Req]] = []
        for i, item in enumerate(batch):
            item.req.kv_len += item.length
            if not item.req.output_ids:
                self.stats["prompt_tokens"] += item.length
            if item.req is self.chunked:
                self.kv.cache_computed_prefix(item.req)
            else:
                done.append((i, item.req))
        if done:
            reqs = [req for _, req in done]
            if len(done) < len(batch):
                among = torch.tensor([i for i, _ in done], device=logits.device)
                sampled = self._sample(logits.index_select(0, among), reqs, among)
            else:
                sampled = self._sample(logits, reqs)
            self._advance(sampled)
            # Not the mixed-in running ones, nor the PD ones _advance handed to self.pd.
            for req in reqs:
                if not req.finished and req.state is ReqState.PREFILLING:
                    req.state = ReqState.RUNNING
                    self.running.append(req)
        self._log_step(launched_at, "mixed" if mixed else "prefill", len(batch), len(input_ids),
                       cached=sum(item.cached for item in batch))

    def _run_decode(self) -> None:
        self._make_room_for_decode()
        # A sequence that its in-flight token is certain to end gets no further step.
        in_flight = self._in_flight_reqs
        reqs = [req for req in self.running if req not in in_flight or not self._ends_with_next_token(req)]
        if not reqs:
            self._complete_in_flight()
            return
        slots = self.kv.extend_each(reqs)
        step = StepInput(
            mode=ForwardMode.DECODE,
            input_ids=[],  # each sequence's newest token is on the device already
            positions=[req.kv_len for req in reqs],
            out_cache_loc=slots,
            req_rows=[req.row for req in reqs],
            seq_lens=[req.kv_len + 1 for req in reqs],
            extend_lens=[1] * len(reqs),
        )
        launched_at = self.step_log.now()
        logits = self._forward(step)
        self._decay_new_token_ratio()
        for req in reqs:
            req.kv_len += 1
        self._log_step(launched_at, "decode", len(reqs), len(reqs))
        if any(req.grammar is not None for req in in_flight):
            # A grammar's mask for this step needs the in-flight token: read it now (the device
            # meanwhile runs this step's forward), then sample. Batches without grammars overlap
            # as before. Rows that token finished sample unmasked and are discarded by _advance.
            self._complete_in_flight()
        launched = self._sample(logits, reqs)
        self._complete_in_flight()  # the previous step's tokens, read while this step runs
        if self.overlap:
            self._in_flight = launched
        else:
            self._advance(launched)

    def _log_step(self, launched_at: float, mode: str, seqs: int, tokens: int, cached: int = 0) -> None:
        if not self.step_log.active:
            return
        self.step_log.record(StepRecord(
            t=launched_at, mode=mode, seqs=seqs, tokens=tokens, running=len(self.running),
            waiting=len(self.waiting), kv_used=self.kv.used_tokens, retracted=self.stats["num_retracted"]),
            cached_tokens=cached)

    def _decay_new_token_ratio(self) -> None:
        """After a step that gave every running sequence a token (a decode step, or a mixed extend
        step carrying them): decoding went on without a retraction."""
        self.new_token_ratio = max(self.ratio_bounds.floor, self.new_token_ratio - self.ratio_bounds.decay)

    @property
    def _in_flight_reqs(self) -> set[Req]:
        """The requests whose token of the step in flight the host has not read (empty if none)."""
        return self._in_flight.reqs_set if self._in_flight is not None else set()

    def _complete_in_flight(self) -> None:
        if self._in_flight is not None:
            launched, self._in_flight = self._in_flight, None
            self._advance(launched)

    def _ends_with_next_token(self, req: Req) -> bool:
        """True when the token now in flight certainly finishes the request (length limits)."""
        return req.tokens_left <= 1

    def _forward(self, step: StepInput) -> torch.Tensor:
        self._forwarded = True
        if self.check_batches:
            # --enable-deterministic-check: every rank must be about to run the very same batch;
            # a divergence is reported here instead of as a hang or garbage in a collective.
            digest = hashlib.blake2b(repr((step.mode.value, step.req_rows, step.seq_lens, step.input_ids,
                                           step.positions)).encode(), digest_size=8).digest()
            self.runner.groups.attn_tp.check_same(int.from_bytes(digest, "little", signed=True), "the scheduled batch")
        return self.runner.forward(step)

    def _make_room_for_decode(self) -> None:
        """Every running sequence needs one slot; evict cached prefixes, then retract sequences
        (newest first — they have the least work to redo) until that fits."""
        while self.running and not self.kv.room_for_decode(self.running):
            victim = max(self.running, key=lambda r: (len(r.output_ids) == 0, -r.seq_len))
            self.running.remove(victim)
            self.kv.release(victim)
            victim.state = ReqState.WAITING
            self.waiting.appendleft(victim)
            self.stats["num_retracted"] += 1
            self.new_token_ratio = min(MAX_NEW_TOKEN_RATIO, self.new_token_ratio + NEW_TOKEN_RATIO_BUMP)
            logger.info("KV cache full: retracted request %s (%d tokens) to the waiting queue",
                        victim.rid, victim.seq_len)

    def _sample(self, logits: torch.Tensor, reqs: list[Req], among: torch.Tensor | None = None) -> _Sampled:
        """Next tokens of `reqs`, sampled on the device and on their way to the host (no wait);
        `among` as in ModelRunner.record_tokens. A step still in flight has one unread token of
        each of its sequences."""
        in_flight = self._in_flight_reqs
        penalised = [r for r in reqs if r.sampling.has_penalty]
        count_rows = self.penalty_counts.rows(penalised) if penalised else None
        bitmask = None
        if self.grammar.backend is not None and any(r.grammar is not None for r in reqs):
            # In flight there is never a structured row here (_run_decode read it first).
            bitmask = self.grammar.backend.token_bitmask(
                [None if r.finished or r.grammar is None else (r.grammar, r.sampling.grammar[0]) for r in reqs])
        batch = SamplingBatch.build(
            [r.sampling for r in reqs], [len(r.output_ids) + (r in in_flight) for r in reqs],
            self.model_config.eos_token_ids, self.model_config.vocab_size, logits.device,
            top_logprobs_nums=[r.top_logprobs_num for r in reqs], return_logprob=[r.wants_logprobs for r in reqs],
            penalty_counts=self.penalty_counts.counts(count_rows) if count_rows is not None else None,
            token_bitmask=bitmask)
        out = self.sampler.sample(logits, batch)
        # The DP group leader's choice is everyone's: unseeded noise differs between ranks.
        out.token_ids = self.runner.groups.attn_tp.broadcast_from_leader(out.token_ids)
        self.runner.record_tokens(out.token_ids, among)
        if count_rows is not None:  # counted now, on the device: the next step sees it even in flight
            assert batch.penalty_rows is not None
            self.penalty_counts.add(count_rows, out.token_ids.index_select(0, batch.penalty_rows))
        return _Sampled.start_copy(reqs, out)

    def _advance(self, step: _Sampled) -> None:
        """Read a step's tokens on the host: append them, check finishes, stream or retire."""
        if step.copied is not None:
            step.copied.synchronize()
        out = step.tokens
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
        top_vals = out.top_logprob_vals.tolist() if out.top_logprob_vals is not None else None
        for i, (req, token) in enumerate(zip(step.reqs, token_ids)):
            if req.finished:
                continue  # aborted while its step was in flight
            req.output_ids.append(token)
            self.stats["generation_tokens"] += 1
            grammar_finish = self._accept_grammar(req, token)
            if req.wants_logprobs and logprobs is not None:
                req.unsent_logprobs.append(logprobs[i])
                if req.top_logprobs_num and top_ids is not None:
                    n = req.top_logprobs_num
                    req.unsent_top_logprobs.append(
                        [TopLogprob(t, v) for t, v in zip(top_ids[i][:n], top_vals[i][:n])])
            if self.pd is not None and self.pd.takes(req):
                self.pd.hold(req)  # a prefill server's first token: the KV goes to the decode server
                continue
            req.finish = grammar_finish or self.finish_checker.check(req)
            if req.finished:
                self.retire(req)
            else:
                self._emit(req)

    @staticmethod
    def _accept_grammar(req: Req, token: int) -> FinishReason | None:
        """Advance `req`'s grammar by its new token; a finish when the grammar ended (it accepted
        a stop token, which ends the output even with ignore_eos) or — never under the mask —
        refused the token."""
        if req.grammar is None:
            return None
        if not req.grammar.accept_token(token):
            return FinishReason("abort", message=f"token {token} does not match the request's grammar")
        if req.grammar.is_terminated():
            return FinishReason("stop", matched=token)
        return None

    def join_running(self, req: Req) -> None:
        """A request whose prompt KV (kv_len) and first token arrived from elsewhere (a PD
        decode server's transfer) continues as if it had been prefilled here."""
        token = req.output_ids[-1]
        self.runner.set_last_token(req.row, token)
        if req.sampling.grammar is not None:
            # The prefill server sampled the first token under the same grammar: replay it.
            problem = self.grammar.matcher_now(req)
            req.finish = FinishReason("abort", message=problem) if problem else self._accept_grammar(req, token)
            if req.finished:
                self.retire(req)
                return
        if req.sampling.has_penalty:
            self.penalty_counts.add(self.penalty_counts.rows([req]),
                                    torch.tensor([token], dtype=torch.int64, device=self.runner.device))
        req.finish = self.finish_checker.check(req)
        if req.finished:
            self.retire(req)
            return
        req.state = ReqState.RUNNING
        self.running.append(req)
        self._emit(req)

    # -- retiring and reporting --------------------------------------------------------------

    def retire(self, req: Req) -> None:
        """A finished or aborted request: give its KV to the cache or the pool, send its last output."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        if req.row is not None:
            self.kv.release(req)
        req.state = ReqState.DONE
        self.penalty_counts.release(req)
        self._emit(req)

    def _emit(self, req: Req) -> None:
        new_ids = req.output_ids[req.unsent_from :]
        # --stream-interval: running sequences report every N tokens; the last report is never held.
        if not req.finished and len(new_ids) < self.stream_interval:
            return
        self._outputs.append(ReqOutput(
            rid=req.rid, new_ids=new_ids, finish=req.finish, prompt_tokens=len(req.input_ids),
            cached_tokens=req.cached_tokens, completion_tokens=len(req.output_ids),
            logprobs=req.unsent_logprobs, top_logprobs=req.unsent_top_logprobs))
        req.unsent_from = len(req.output_ids)
        req.unsent_logprobs, req.unsent_top_logprobs = [], []
