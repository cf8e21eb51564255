"""TokenizerManager: the main process's side of the scheduler connection.

It tokenizes requests (chat template included), validates them against the model's limits,
sends one GenerateReq per sequence, and turns the scheduler's per-step deltas into text deltas
(SequenceDetokenizer) for the HTTP layer or the Engine.

Sockets (zmq.asyncio, msgpack messages of meshserve.messages, never pickle): we BIND a PUSH
socket per DP group (`SchedulerEndpoints.to_scheduler`, one with --dp-size 1) and one PULL socket
on `from_scheduler`; each DP group's leader connects. The DPController picks each sequence's
group and sends its abort there; a flush goes to every group and succeeds when all do. One
receive task routes every ReqOutput to the request that owns its rid, where the deltas its
consumer has not taken yet are merged (`_Request`).

Failure contract: when the scheduler sends SchedulerFailed, a scheduler process dies, or the
server shuts down, every in-flight request ends with a GenerateError (never hangs), readiness
turns false, and the `on_failure` callbacks run (the HTTP server exits non-zero from there).

Cancellation contract: `generate()` is an async generator; when its consumer stops early (client
disconnect, exception, aclose) every unfinished sequence is aborted in the scheduler (AbortReq).

Rid contract: a rid belongs to one sequence from its submission until the scheduler's last output
for it (its finish) has arrived. A sequence aborted from here (consumer gone, or a stop string
found by the detokenizer) keeps its rid, its late outputs dropped, until the scheduler answers
the abort: until then the scheduler still holds a request by that rid, and a new request reusing
it would be sent the old one's tokens and abort. A rid in use is refused ("already in use").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2
import msgspec
import zmq
import zmq.asyncio

from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.grammar.spec import GrammarError, GrammarSpec
from meshserve.messages import (
    AbortReq,
    BatchOut,
    Bootstrap,
    FinishReason,
    FlushCacheOut,
    FlushCacheReq,
    GenerateReq,
    ReqOutput,
    SchedulerFailed,
    SchedulerReady,
    SchedulerStats,
    ToScheduler,
    from_scheduler_codec,
    to_scheduler_codec,
)
from meshserve.sampling_params import MAX_N, MAX_TOP_LOGPROBS, SamplingParams, SamplingParamsError, text_problem
from meshserve.server.detokenizer import SequenceDetokenizer
from meshserve.server.dp_controller import DPController
from meshserve.server.generation import (
    GenerateError,
    GenerateRequest,
    InvalidRequest,
    RequestAborted,
    SequenceOutput,
    SequenceResult,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from meshserve.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Loading a large checkpoint can take many minutes; a dead scheduler process is caught much
# sooner by the watchdog, so this only guards against a live but stuck scheduler.
READY_TIMEOUT_S = 1800.0
WATCHDOG_INTERVAL_S = 0.5
FLUSH_TIMEOUT_S = 30.0
SEED_MODULUS = 2**63  # SamplingParams.seed range; per-sequence seeds wrap inside it
MAX_RID_CHARS = 256
# Prompts up to this many characters (or token ids) are tokenized on the event loop; longer ones
# in the tokenize thread, so that health probes and other streams never wait behind them. Below
# it, the thread hop (~0.1 ms) costs more than the work it moves.
INLINE_PROMPT_SIZE = 8192

SKIP_TOKENIZER_MESSAGE = (
    "the server was started with --skip-tokenizer-init, so it has no tokenizer: send token ids "
    "(input_ids, or a list of integers as the completions prompt); chat messages cannot be used"
)


def load_tokenizer(path: str | None) -> PreTrainedTokenizerBase | None:
    """The model's Hugging Face tokenizer, from local files only (no hub access, ever); None
    when there is no tokenizer path (--skip-tokenizer-init). Tokenizer code shipped in the
    model directory is never run, --trust-remote-code or not (see model_config._load_hf_config);
    a tokenizer that exists only as such code raises ValueError."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request; nothing has been sent to the scheduler yet."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams  # max_new_tokens resolved against the context length
    n: int
    return_logprob: bool
    top_logprobs_num: int
    bootstrap: Bootstrap | None = None


@dataclass(eq=False)
class _Sequence:
    rid: str
    index: int
    detokenizer: SequenceDetokenizer | None  # None without a tokenizer: ids only
    completion_tokens: int = 0
    cached_tokens: int = 0
    last_output_at: float | None = None
    finished: bool = False  # its consumer has seen its end (or never will: see `ending`)
    ending: bool = False  # aborted from here; owns its rid until the scheduler's finish arrives


@dataclass(eq=False)
class _Request:
    """One in-flight request: the scheduler's deltas its consumer has not taken yet, merged per
    sequence (oldest sequence first), and at most one GenerateError, raised once the deltas that
    came before it are taken (later ones are dropped, so a busy stream cannot put it off).

    Merging keeps the front end ahead of the GPU under load: when a consumer (an HTTP stream)
    falls behind, the deltas that piled up leave as one output, so detokenizing, framing and
    sending are paid once for several tokens instead of a backlog growing. A consumer that keeps
    up takes each step's delta as it came."""

    prompt_tokens: int
    arrival: float
    _pending: dict[_Sequence, ReqOutput] = field(default_factory=dict)
    _error: GenerateError | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, seq: _Sequence, delta: ReqOutput) -> None:
        if self._error is not None:  # the request is ending: what came after its error is not shown
            return
        earlier = self._pending.get(seq)
        self._pending[seq] = delta if earlier is None else msgspec.structs.replace(
            delta, new_ids=earlier.new_ids + delta.new_ids, logprobs=earlier.logprobs + delta.logprobs,
            top_logprobs=earlier.top_logprobs + delta.top_logprobs)  # counts and finish: the later delta's
        self._wake.set()

    def fail(self, error: GenerateError) -> None:
        if self._error is None:
            self._error = error
        self._wake.set()

    async def next(self) -> tuple[_Sequence, ReqOutput]:
        """The oldest pending sequence's deltas as one; raises the error once none is pending."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            self._wake.clear()
            await self._wake.wait()
        seq = next(iter(self._pending))
        return seq, self._pending.pop(seq)


class TokenizerManager:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        endpoints: SchedulerEndpoints,
        scheduler_dead: Callable[[], str | None],
        load_balance_method: str = "round_robin",
        metrics: ServerMetrics | None = None,
        disaggregation_mode: str = "null",
    ) -> None:
        """`scheduler_dead()` names a dead scheduler process, or returns None while all live."""
        self.tokenizer = tokenizer
        self.disaggregation_mode = disaggregation_mode
        self._endpoints = endpoints
        self._dp = DPController(len(endpoints.to_scheduler), load_balance_method,
                                by_room=disaggregation_mode == "prefill")
        self._scheduler_dead = scheduler_dead
        self._metrics = metrics
        self.scheduler_info: SchedulerReady | None = None  # set once the scheduler is ready
        self.stats: SchedulerStats | None = None  # summed over the DP groups' latest reports
        self._group_stats: dict[int, SchedulerStats] = {}
        self._group_ready: dict[int, SchedulerReady] = {}
        self.last_output_at = 0.0  # time.monotonic() of the latest BatchOut: the scheduler's progress
        self.failure: str | None = None  # why the scheduler is gone, once it is
        self._closing: str | None = None  # set by abort_all: no new requests
        self._warmed_up = False
        self._sequences: dict[str, tuple[_Request, _Sequence]] = {}
        self._on_failure: list[Callable[[str], None]] = []
        self._codec = to_scheduler_codec()
        self._outbox: asyncio.Queue[tuple[int | None, bytes]] = asyncio.Queue()  # (DP group or all, message)
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[SchedulerReady] | None = None
        self._flush_lock = asyncio.Lock()
        self._flush_reply: asyncio.Future[FlushCacheOut] | None = None
        self._flush_replies: dict[int, FlushCacheOut] = {}
        self._ctx: zmq.asyncio.Context | None = None
        # One thread: large prompts are tokenized one after the other, never two at once on the
        # same tokenizer. The loop thread meanwhile only decodes and encodes small prompts,
        # which read the Rust tokenizer without changing its state (no truncation/padding is
        # ever set), so sharing it is safe.
        self._tokenize_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshserve-tokenize")

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, timeout: float = READY_TIMEOUT_S) -> SchedulerReady:
        """Bind the sockets and wait for SchedulerReady; raise ServiceUnavailable with the
        scheduler's reason if it fails, dies or stays silent for `timeout` seconds."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ctx = zmq.asyncio.Context()
        pushes = []
        for dp_rank in range(len(self._endpoints.to_scheduler)):
            address = self._endpoints.inbox(dp_rank)
            push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.bind(address)
            pushes.append(push)
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._endpoints.from_scheduler)
        self._tasks = [
            asyncio.create_task(self._guard(self._send_loop(pushes)), name="tm-send"),
            asyncio.create_task(self._guard(self._receive_loop(pull)), name="tm-receive"),
            asyncio.create_task(self._guard(self._watchdog()), name="tm-watchdog"),
        ]
        try:
            self.scheduler_info = await asyncio.wait_for(self._ready, timeout)
        except TimeoutError:
            self._fail(f"the scheduler did not report ready within {timeout:.0f} s")
            raise ServiceUnavailable(self.failure) from None
        return self.scheduler_info

    async def warm_up(self, max_new_tokens: int = 4) -> None:
        """Run one short greedy generation; readiness turns true only once it succeeded."""
        prompt = (
            self.tokenizer.encode("The capital of France is")
            if self.tokenizer is not None
            else [1, 2, 3, 4]
        )
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        # Without bootstrap fields even on a PD server: its scheduler runs such a request whole.
        await self.collect(await self._prepare(GenerateRequest(input_ids=prompt, sampling=sampling)))
        self._warmed_up = True

    @property
    def not_ready_reason(self) -> str | None:
        """Why the server is not ready (what /health's 503 says), or None when it is: warm-up
        done and the scheduler alive. Asks the processes directly rather than waiting for the
        watchdog's next look."""
        if self.failure is not None:
            return f"the scheduler has failed: {self.failure}"
        dead = self._scheduler_dead()
        if dead is not None:
            return dead
        if self._closing is not None:
            return self._closing
        return None if self._warmed_up else "warming up"

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    @property
    def dp_group_stats(self) -> list[SchedulerStats]:
        """Each DP group's latest load report, by DP rank (those reported so far)."""
        return [self._group_stats[g] for g in sorted(self._group_stats)]

    @property
    def num_in_flight(self) -> int:
        """Sequences submitted and not finished."""
        return len(self._sequences)

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` once if the scheduler fails or dies."""
        self._on_failure.append(callback)

    def stop_accepting(self, reason: str) -> None:
        """Draining: refuse new requests with `reason`; in-flight ones go on."""
        self._closing = reason

    def abort_all(self, reason: str) -> None:
        """Server shutdown: refuse new requests and end every in-flight one with `reason`
        (their generators then send the AbortReqs)."""
        self._closing = reason
        self._end_all(ServiceUnavailable, reason)

    def abort(self, rid: str) -> bool:
        """End request `rid` (all its sequences) with RequestAborted; its generator then sends
        the AbortReqs. False when no such request is in flight."""
        owners = {id(request): request for key, (request, seq) in self._sequences.items()
                  if not seq.ending
                  and (key == rid or key == f"{rid}-{seq.index}")}  # the rids generate() gives n > 1 sequences
        for request in owners.values():
            request.fail(RequestAborted("the request was aborted by the caller"))
        return bool(owners)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        self._tokenize_thread.shutdown(wait=False, cancel_futures=True)

    # ---- requests ------------------------------------------------------------------------

    async def prepare(self, req: GenerateRequest) -> PreparedRequest:
        """Tokenize and validate; raise InvalidRequest (400) or ServiceUnavailable (503).
        This is the one place every request (HTTP or Engine) is checked before anything is
        sent: what passes encodes into the scheduler's messages and fits its arithmetic."""
        _check_disaggregation(req, self.disaggregation_mode)
        return await self._prepare(req)

    async def _prepare(self, req: GenerateRequest) -> PreparedRequest:
        info = self._serving_info()
        _check_request_fields(req)
        if _prompt_size(req) <= INLINE_PROMPT_SIZE:
            input_ids = self._prompt_ids(req, info.vocab_size)
        else:
            loop = asyncio.get_running_loop()
            input_ids = await loop.run_in_executor(self._tokenize_thread, self._prompt_ids, req, info.vocab_size)
        sampling = self._resolve_sampling(req, len(input_ids), info)
        return PreparedRequest(
            rid=req.rid if req.rid is not None else uuid.uuid4().hex,
            input_ids=input_ids,
            sampling=sampling,
            n=req.n,
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            bootstrap=req.bootstrap,
        )

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[SequenceOutput]:
        """Submit the request's n sequences and yield their outputs as they come, interleaved
        (SequenceOutput.index says which). Ends after every sequence finished; raises a
        GenerateError if the scheduler aborts a sequence or fails. Consumers that may stop
        early must close it (contextlib.aclosing) so that the aborts go out at once."""
        self._serving_info()
        rids = [prepared.rid] if prepared.n == 1 else [f"{prepared.rid}-{i}" for i in range(prepared.n)]
        if any(rid in self._sequences for rid in rids):
            raise InvalidRequest(f"request id {prepared.rid!r} is already in use", param="rid")
        request = _Request(prompt_tokens=len(prepared.input_ids), arrival=time.perf_counter())
        sequences = [
            _Sequence(rid, index, self._detokenizer(prepared))
            for index, rid in enumerate(rids)
        ]
        for seq in sequences:
            self._sequences[seq.rid] = (request, seq)
            self._post(GenerateReq(
                rid=seq.rid,
                input_ids=prepared.input_ids,
                sampling=_sequence_sampling(prepared.sampling, seq.index),
                return_logprob=prepared.return_logprob,
                top_logprobs_num=prepared.top_logprobs_num,
                bootstrap=prepared.bootstrap,
            ))
            if self._metrics is not None:
                self._metrics.sequence_started(request.prompt_tokens)
        try:
            unfinished = len(sequences)
            while unfinished:
                seq, delta = await request.next()
                if seq.finished:  # ended here (stop string) after this output was queued
                    continue
                output = self._process(request, seq, delta)
                if output.finish is not None:
                    unfinished -= 1
                if output.text or output.token_ids or output.finish is not None:
                    yield output
        finally:
            for seq in sequences:
                if not seq.finished:
                    self._end_in_scheduler(seq, "the request was cancelled")
                    self._record_finish(request, seq, "abort")

    async def collect(self, prepared: PreparedRequest) -> list[SequenceResult]:
        """Run a request to completion; one SequenceResult per sequence, by index."""
        results = [SequenceResult(index=i) for i in range(prepared.n)]
        async with contextlib.aclosing(self.generate(prepared)) as outputs:
            async for output in outputs:
                results[output.index].add(output)
        return results

    async def collect_many(self, prepared: Sequence[PreparedRequest]) -> list[list[SequenceResult]]:
        """Run several requests at once (so that they batch); the first error cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.collect(p)) for p in prepared]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
        return [task.result() for task in tasks]

    async def flush_cache(self) -> FlushCacheOut:
        """Ask the scheduler to drop its prefix cache (it refuses while requests run)."""
        self._serving_info()
        async with self._flush_lock:
            self._flush_reply = asyncio.get_running_loop().create_future()
            self._flush_replies = {}
            self._post(FlushCacheReq())
            try:
                return await asyncio.wait_for(self._flush_reply, FLUSH_TIMEOUT_S)
            except TimeoutError:
                raise ServiceUnavailable(f"the scheduler did not answer flush_cache within {FLUSH_TIMEOUT_S:.0f} s") from None
            finally:
                self._flush_reply = None

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs); `token_id:<id>` without a tokenizer (vLLM's form)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    # ---- request helpers -----------------------------------------------------------------

    def _serving_info(self) -> SchedulerReady:
        if self.failure is not None:
            raise ServiceUnavailable(f"the scheduler has failed: {self.failure}")
        if self._closing is not None:
            raise ServiceUnavailable(self._closing)
        if self.scheduler_info is None:
            raise ServiceUnavailable("the scheduler is not ready yet")
        return self.scheduler_info

    def _prompt_ids(self, req: GenerateRequest, vocab_size: int) -> list[int]:
        given = [name for name in ("text", "input_ids", "messages") if getattr(req, name) is not None]
        if len(given) != 1:
            raise InvalidRequest(f"give exactly one of text, input_ids, messages (got {', '.join(given) or 'none'})")
        if req.input_ids is not None:
            ids = list(req.input_ids)
        elif self.tokenizer is None:
            raise InvalidRequest(SKIP_TOKENIZER_MESSAGE)
        elif req.messages is not None:
            ids = self._chat_prompt_ids(req.messages, req.tools)
        else:
            _check_text(req.text, "text")
            # An empty text would still tokenize to [BOS] with some tokenizers.
            ids = self.tokenizer.encode(req.text) if req.text else []
        if not ids:
            raise InvalidRequest("the prompt is empty", param=given[0])
        bad = next((i for i, token in enumerate(ids) if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"token id {ids[bad]} at position {bad} is outside the vocabulary [0, {vocab_size})", param=given[0]
            )
        return ids

    def _chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        assert self.tokenizer is not None
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
        except (ValueError, TypeError, jinja2.TemplateError) as err:
            raise InvalidRequest(f"cannot apply the model's chat template: {err}", param="messages") from None
        _check_text(text, "messages")
        # The template already wrote BOS and the other special tokens it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def _resolve_sampling(req: GenerateRequest, prompt_tokens: int, info: SchedulerReady) -> SamplingParams:
        context = info.context_length
        room = context - prompt_tokens
        if room <= 0:
            raise InvalidRequest(
                f"the prompt has {prompt_tokens} tokens, but the model's context length is {context} tokens; "
                "the prompt must leave room for at least one generated token"
            )
        if prompt_tokens >= info.max_total_tokens:
            raise InvalidRequest(
                f"the prompt has {prompt_tokens} tokens, but the KV cache holds only {info.max_total_tokens}"
            )
        sampling = req.sampling
        if sampling.max_new_tokens > room:
            if not req.fit_max_new_tokens:
                raise InvalidRequest(
                    f"this model's maximum context length is {context} tokens, but the request asks for "
                    f"{prompt_tokens + sampling.max_new_tokens} ({prompt_tokens} in the prompt, "
                    f"{sampling.max_new_tokens} to generate); ask for at most {room} new tokens",
                    param="max_tokens",
                )
            sampling = msgspec.structs.replace(sampling, max_new_tokens=room)
        try:
            sampling.validate(info.vocab_size)
        except SamplingParamsError as err:
            raise InvalidRequest(str(err), param=str(err).split(":", 1)[0]) from None
        if sampling.grammar is not None:
            if info.grammar_off is not None:
                raise InvalidRequest(info.grammar_off, param=sampling.grammar[0])
            try:
                GrammarSpec(*sampling.grammar).check()
            except GrammarError as err:
                raise InvalidRequest(str(err), param=err.kind) from None
        return sampling

    def _detokenizer(self, prepared: PreparedRequest) -> SequenceDetokenizer | None:
        if self.tokenizer is None:
            return None
        # No clean-up of tokenization spaces: it rewrites text across token boundaries, which
        # would make the incremental text differ from a full decode.
        decode = functools.partial(
            self.tokenizer.decode,
            skip_special_tokens=prepared.sampling.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )
        return SequenceDetokenizer(decode, prepared.input_ids, prepared.sampling.stop)

    def _release(self, seq: _Sequence) -> None:
        """Free `seq`'s rid: the scheduler's last output for it has arrived (rid contract)."""
        del self._sequences[seq.rid]

    def _end_in_scheduler(self, seq: _Sequence, reason: str) -> None:
        """Abort `seq` in the scheduler; its consumer will not read it any more. Its rid stays
        taken until the scheduler's finish for it arrives (the receive loop frees it then), unless
        that finish has arrived already (the DP controller has forgotten the rid): then at once."""
        if self._dp.owner(seq.rid) is None:
            self._release(seq)
            return
        seq.ending = True
        self._post(AbortReq(seq.rid, reason))

    def _process(self, request: _Request, seq: _Sequence, delta: ReqOutput) -> SequenceOutput:
        """One scheduler delta -> one SequenceOutput (text, counts, metrics)."""
        finish = delta.finish
        if finish is not None:
            seq.finished = True
            self._release(seq)
            if finish.kind == "abort":
                self._record_finish(request, seq, "abort")
                raise RequestAborted(f"the scheduler aborted the request: {finish.message or 'no reason given'}")
        text = ""
        if seq.detokenizer is not None:
            text = seq.detokenizer.push(delta.new_ids, finish)
            matched = seq.detokenizer.stop_matched
            if matched is not None and (finish is None or finish.matched != matched):
                # Our text hit a stop string before the scheduler's own check did (it decodes
                # without the prompt as context), maybe in deltas merged with the sequence's last
                # one: the text ends at the stop string, and so does the sequence.
                if finish is None:
                    seq.finished = True
                    self._end_in_scheduler(seq, "stop string reached")
                finish = FinishReason(kind="stop", matched=matched)
        seq.completion_tokens += len(delta.new_ids)
        seq.cached_tokens = max(seq.cached_tokens, delta.cached_tokens)
        now = time.perf_counter()
        if self._metrics is not None and delta.new_ids:
            if seq.last_output_at is None:
                self._metrics.tokens_generated(len(delta.new_ids), ttft=now - request.arrival)
            else:
                self._metrics.tokens_generated(len(delta.new_ids), itl=(now - seq.last_output_at) / len(delta.new_ids))
        if delta.new_ids:
            seq.last_output_at = now
        if finish is not None:
            self._record_finish(request, seq, finish.kind)
        return SequenceOutput(
            index=seq.index,
            rid=seq.rid,
            text=text,
            token_ids=list(delta.new_ids),
            logprobs=list(delta.logprobs),
            top_logprobs=list(delta.top_logprobs),
            finish=finish,
            prompt_tokens=request.prompt_tokens,
            cached_tokens=seq.cached_tokens,
            completion_tokens=seq.completion_tokens,
        )

    def _record_finish(self, request: _Request, seq: _Sequence, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.sequence_finished(reason, time.perf_counter() - request.arrival, seq.cached_tokens)

    # ---- scheduler connection ------------------------------------------------------------

    def _post(self, msg: ToScheduler) -> None:
        """Queue a message for the send task: callable from `finally` blocks, never blocks.
        A new sequence goes to the group the DPController picks, an abort to the group that has
        the sequence (none once it ended), a flush to every group."""
        group: int | None = None
        if isinstance(msg, GenerateReq):
            group = self._dp.dispatch(msg.rid, msg.bootstrap.room if msg.bootstrap is not None else None)
        elif isinstance(msg, AbortReq):
            group = self._dp.owner(msg.rid)
            if group is None:
                return
            self._dp.ended(msg.rid)
        self._outbox.put_nowait((group, self._codec.encode(msg)))

    async def _send_loop(self, pushes: list[zmq.asyncio.Socket]) -> None:
        while True:
            group, data = await self._outbox.get()
            for push in pushes if group is None else [pushes[group]]:
                await push.send(data, copy=False)

    async def _receive_loop(self, pull: zmq.asyncio.Socket) -> None:
        codec = from_scheduler_codec()
        while True:
            msg = codec.decode(await pull.recv(copy=False))
            if isinstance(msg, BatchOut):
                self.last_output_at = time.monotonic()
                for delta in msg.outputs:
                    if delta.finish is not None:
                        self._dp.ended(delta.rid)
                    owner = self._sequences.get(delta.rid)
                    if owner is None:
                        continue
                    request, seq = owner
                    if not seq.ending:
                        request.put(seq, delta)
                    elif delta.finish is not None:  # the scheduler's answer to our abort
                        self._release(seq)
            elif isinstance(msg, SchedulerStats):
                self._group_stats[msg.dp_rank] = msg
                self.stats = _summed(list(self._group_stats.values()))
                if self._metrics is not None:
                    self._metrics.scheduler_stats(self.stats)
            elif isinstance(msg, FlushCacheOut):
                self._flush_replies[msg.dp_rank] = msg
                if (self._flush_reply is not None and not self._flush_reply.done()
                        and len(self._flush_replies) == self._dp.dp_size):
                    refusals = [f"DP group {g}: {r.message}" if self._dp.dp_size > 1 else r.message
                                for g, r in sorted(self._flush_replies.items()) if not r.success]
                    self._flush_reply.set_result(FlushCacheOut(not refusals, "; ".join(refusals)))
            elif isinstance(msg, SchedulerReady):
                self._group_ready[msg.dp_rank] = msg
                if (self._ready is not None and not self._ready.done()
                        and len(self._group_ready) == self._dp.dp_size):
                    self._ready.set_result(_serving_limits(list(self._group_ready.values())))
            elif isinstance(msg, SchedulerFailed):
                self._fail(msg.message)

    async def _watchdog(self) -> None:
        while self.failure is None:
            dead = self._scheduler_dead()
            if dead is not None:
                self._fail(dead)
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)

    async def _guard(self, loop_coro: Any) -> None:
        """Run a background loop; its crash is a scheduler-connection failure, not a silent hang."""
        try:
            await loop_coro
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - any crash ends the connection
            log.exception("tokenizer manager task crashed")
            self._fail(f"lost the connection to the scheduler: {err!r}")

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        log.error("scheduler failure: %s", reason)
        message = f"the scheduler has failed: {reason}"
        error = ServiceUnavailable(message)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        if self._flush_reply is not None and not self._flush_reply.done():
            self._flush_reply.set_exception(error)
        self._end_all(ServiceUnavailable, message)
        for callback in self._on_failure:
            callback(reason)

    def _end_all(self, error: type[GenerateError], message: str) -> None:
        requests = {id(request): request for request, _ in self._sequences.values()}
        for request in requests.values():
            request.fail(error(message))


def _summed(reports: list[SchedulerStats]) -> SchedulerStats:
    """The server's load: every count summed over its DP groups (per-expert and per-rank counts
    element by element; a group that reports none has an empty tuple)."""
    if len(reports) == 1:
        return reports[0]
    fields = msgspec.structs.asdict(reports[0])

    def total(name: str) -> int | tuple[int, ...]:
        values = [getattr(r, name) for r in reports]
        if isinstance(values[0], tuple):
            return tuple(map(sum, itertools.zip_longest(*values, fillvalue=0)))
        return sum(values)

    return SchedulerStats(**{name: total(name) for name in fields if name != "dp_rank"})


def _serving_limits(groups: list[SchedulerReady]) -> SchedulerReady:
    """What the server accepts with several DP groups: a prompt must fit the smallest KV pool
    (any group may get it); the running requests add up."""
    smallest = min(groups, key=lambda g: g.max_total_tokens)
    return msgspec.structs.replace(smallest, max_running_requests=sum(g.max_running_requests for g in groups),
                                   dp_rank=0)


def _check_request_fields(req: GenerateRequest) -> None:
    """The request's own fields (the sampling ones are SamplingParams.validate's)."""
    if not 1 <= req.n <= MAX_N:
        raise InvalidRequest(f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    if not 0 <= req.top_logprobs_num <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs_num}",
                             param="top_logprobs")
    if req.rid is not None:
        if not 0 < len(req.rid) <= MAX_RID_CHARS:
            raise InvalidRequest(f"rid must have 1 to {MAX_RID_CHARS} characters", param="rid")
        _check_text(req.rid, "rid")


def _check_disaggregation(req: GenerateRequest, mode: str) -> None:
    """Bootstrap fields belong to disaggregated servers only: a plain server that accepted them
    would compute the request twice behind a PD router, and a PD server without them has no
    other half to meet."""
    if mode == "null":
        if req.bootstrap is not None:
            raise InvalidRequest("bootstrap fields were given, but this server does not run with "
                                 "--disaggregation-mode prefill|decode", param="bootstrap_room")
        return
    if req.bootstrap is None:
        raise InvalidRequest(f"this is a {mode} server (--disaggregation-mode {mode}): send requests through a PD "
                             "router, which adds bootstrap_host, bootstrap_port and bootstrap_room", param="bootstrap_room")
    if req.n != 1:
        raise InvalidRequest("n > 1 is not supported with prefill-decode disaggregation", param="n")


def _check_text(text: str, param: str) -> None:
    if (problem := text_problem(text)) is not None:
        raise InvalidRequest(f"{param}: {problem}", param=param)


def _prompt_size(req: GenerateRequest) -> int:
    """Characters of text (or token ids) in the prompt: what tokenizing it costs, roughly."""
    if req.text is not None:
        return len(req.text)
    if req.input_ids is not None:
        return len(req.input_ids)
    return sum(len(str(value)) for message in req.messages or () for value in message.values())


def _sequence_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index` of a request with n > 1 gets seed + index, so that the n samples differ
    but the request stays reproducible."""
    if sampling.seed is None or index == 0:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + index) % SEED_MODULUS)
