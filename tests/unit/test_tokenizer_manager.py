"""TokenizerManager against a fake scheduler: a thread speaking meshserve.messages over the same
ZMQ sockets as the real one, emitting scripted tokens. Covers what the real scheduler makes
hard to provoke: scheduler death and failure, disconnect -> AbortReq, stop trimming paths."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

import pytest
import zmq

from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.messages import (
    AbortReq,
    BatchOut,
    FinishReason,
    FlushCacheOut,
    FlushCacheReq,
    GenerateReq,
    ReqOutput,
    SchedulerFailed,
    SchedulerReady,
    from_scheduler_codec,
    to_scheduler_codec,
)
from meshserve.sampling_params import SamplingParams
from meshserve.server.generation import GenerateRequest, InvalidRequest, RequestAborted, ServiceUnavailable
from meshserve.server.tokenizer_manager import TokenizerManager

CONTEXT = 64
VOCAB = 49152

# A script maps a request to the tokens to emit (one per step) and the finish of the last one.
Script = Callable[[GenerateReq], tuple[list[int], FinishReason]]


class FakeScheduler(threading.Thread):
    def __init__(self, endpoints: SchedulerEndpoints, script: Script, *, fail_at_start: str | None = None,
                 step_s: float = 0.005, mute: bool = False, whole: bool = False) -> None:
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.script = script
        self.fail_at_start = fail_at_start
        self.step_s = step_s
        self.received: list[object] = []
        self.exited = threading.Event()  # "the process died": dead() reports it
        self.fail_now: str | None = None  # set to make it send SchedulerFailed and exit
        self.mute = mute  # accept requests, never answer (a stuck step)
        self.whole = whole  # all of a request's outputs in one BatchOut at once (a consumer running late)

    def dead(self) -> str | None:
        return "fake scheduler (pid 0) exited with code 1" if self.exited.is_set() else None

    def run(self) -> None:
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.connect(self.endpoints.to_scheduler[0])
        push.connect(self.endpoints.from_scheduler)
        decode, encode = to_scheduler_codec().decode, from_scheduler_codec().encode
        try:
            if self.fail_at_start:
                push.send(encode(SchedulerFailed(self.fail_at_start)))
                return
            push.send(encode(SchedulerReady(max_total_tokens=1000, max_running_requests=8,
                                            context_length=CONTEXT, vocab_size=VOCAB, device="cpu")))
            live: dict[str, tuple[list[int], FinishReason]] = {}
            while not self.exited.is_set():
                if self.fail_now is not None:
                    push.send(encode(SchedulerFailed(self.fail_now)))
                    return
                while pull.poll(1):
                    msg = decode(pull.recv())
                    self.received.append(msg)
                    if isinstance(msg, GenerateReq) and self.whole:
                        one = {msg.rid: self.script(msg)}
                        push.send(encode(BatchOut([self._step(msg.rid, one) for _ in one[msg.rid][0]])))
                    elif isinstance(msg, GenerateReq):
                        live[msg.rid] = self.script(msg)
                    elif isinstance(msg, AbortReq) and live.pop(msg.rid, None) is not None:
                        abort = FinishReason(kind="abort", message=msg.message)
                        push.send(encode(BatchOut([ReqOutput(rid=msg.rid, new_ids=[], finish=abort)])))
                    elif isinstance(msg, FlushCacheReq):
                        push.send(encode(FlushCacheOut(success=not live, message="busy" if live else "")))
                if live and not self.mute:
                    push.send(encode(BatchOut([self._step(rid, live) for rid in list(live)])))
                time.sleep(self.step_s)
        finally:
            self.exited.set()
            ctx.destroy(linger=2000)  # as the real scheduler: its last words must arrive

    @staticmethod
    def _step(rid: str, live: dict[str, tuple[list[int], FinishReason]]) -> ReqOutput:
        tokens, finish = live[rid]
        token, rest = tokens[0], tokens[1:]
        if rest:
            live[rid] = (rest, finish)
            return ReqOutput(rid=rid, new_ids=[token], cached_tokens=3)
        del live[rid]
        return ReqOutput(rid=rid, new_ids=[token], finish=finish, cached_tokens=3)

    def requests(self, kind: type) -> list:
        return [m for m in self.received if isinstance(m, kind)]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from meshserve.server.tokenizer_manager import load_tokenizer

    return load_tokenizer(str(default_model_dir))


def text_script(tokenizer, text: str, finish: FinishReason | None = None) -> Script:
    """Emit `text`'s tokens (cut at max_new_tokens), finishing with `finish` or "length"."""

    def script(req: GenerateReq) -> tuple[list[int], FinishReason]:
        ids = tokenizer.encode(text, add_special_tokens=False)[: req.sampling.max_new_tokens]
        return ids, finish or FinishReason(kind="length")

    return script


def run(tokenizer, script: Script, body: Callable, disaggregation_mode: str = "null",
        **fake_kwargs) -> tuple[object, FakeScheduler]:
    """Start a TokenizerManager against a FakeScheduler and run `await body(tm, fake)`."""
    endpoints = SchedulerEndpoints.new_ipc()
    fake = FakeScheduler(endpoints, script, **fake_kwargs)
    fake.start()

    async def main():
        tm = TokenizerManager(tokenizer, endpoints=endpoints, scheduler_dead=fake.dead,
                              disaggregation_mode=disaggregation_mode)
        try:
            await tm.start(timeout=10)
            return await asyncio.wait_for(body(tm, fake), 20)
        finally:
            fake.exited.set()
            await tm.close()

    return asyncio.run(main()), fake


def greedy(max_new_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **kw})


async def collect(tm: TokenizerManager, req: GenerateRequest):
    return await tm.collect(await tm.prepare(req))


def test_generate_text_and_counts(tokenizer):
    text = " Paris is the capital of France. It is 🎉 lovely."

    async def body(tm, fake):
        return await collect(tm, GenerateRequest(text="The capital of France is", sampling=greedy(40)))

    [result], _ = run(tokenizer, text_script(tokenizer, text), body)
    assert result.text == text
    assert result.finish == FinishReason(kind="length")
    assert result.completion_tokens == len(result.token_ids) == len(tokenizer.encode(text, add_special_tokens=False))
    assert result.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    assert result.cached_tokens == 3


def test_stop_string_reported_by_scheduler_is_trimmed(tokenizer):
    finish = FinishReason(kind="stop", matched=" capital")

    async def body(tm, fake):
        return await collect(tm, GenerateRequest(text="x", sampling=greedy(40, stop=[" capital"])))

    [result], _ = run(tokenizer, text_script(tokenizer, " Paris is the capital of", finish), body)
    assert result.text == " Paris is the"
    assert result.finish == finish


def test_stop_string_found_first_by_the_detokenizer_ends_and_aborts(tokenizer):
    async def body(tm, fake):
        results = await collect(tm, GenerateRequest(text="x", sampling=greedy(40, stop=["capital"])))
        await asyncio.sleep(0.1)
        return results

    [result], fake = run(tokenizer, text_script(tokenizer, " Paris is the capital of France and more"), body)
    assert result.text == " Paris is the "
    assert result.finish == FinishReason(kind="stop", matched="capital")
    assert [a.rid for a in fake.requests(AbortReq)] == [result.rid]


def test_n_fans_out_with_distinct_rids_and_offset_seeds(tokenizer):
    async def body(tm, fake):
        req = GenerateRequest(text="x", sampling=SamplingParams(max_new_tokens=4, seed=7), n=3, rid="abc")
        return await collect(tm, req)

    results, fake = run(tokenizer, text_script(tokenizer, " one two three four"), body)
    sent = fake.requests(GenerateReq)
    assert sorted(r.rid for r in sent) == ["abc-0", "abc-1", "abc-2"]
    assert sorted(r.sampling.seed for r in sent) == [7, 8, 9]
    assert [r.index for r in results] == [0, 1, 2]
    assert all(r.text == " one two three four" for r in results)


def test_closing_the_stream_early_aborts_in_the_scheduler(tokenizer):
    async def body(tm, fake):
        async with contextlib.aclosing(tm.generate(await tm.prepare(GenerateRequest(text="x", sampling=greedy(60))))) as out:
            first = await anext(out)
        await asyncio.sleep(0.1)
        return first.rid

    rid, fake = run(tokenizer, text_script(tokenizer, " word" * 60), body, step_s=0.02)
    assert [a.rid for a in fake.requests(AbortReq)] == [rid]


def test_cancelling_a_waiting_request_aborts_it(tokenizer):
    async def body(tm, fake):
        task = asyncio.create_task(collect(tm, GenerateRequest(text="x", sampling=greedy(8))))
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        return [g.rid for g in fake.requests(GenerateReq)]

    rids, fake = run(tokenizer, text_script(tokenizer, " hi"), body, mute=True)
    assert [a.rid for a in fake.requests(AbortReq)] == rids


def test_scheduler_death_fails_in_flight_requests_and_readiness(tokenizer):
    failures: list[str] = []

    async def body(tm, fake):
        tm.on_failure(failures.append)
        await tm.warm_up()
        assert tm.ready
        fake.mute = True
        task = asyncio.create_task(collect(tm, GenerateRequest(text="x", sampling=greedy(8))))
        await asyncio.sleep(0.1)
        fake.exited.set()
        with pytest.raises(ServiceUnavailable, match="exited with code 1"):
            await task
        assert not tm.ready
        with pytest.raises(ServiceUnavailable):
            await tm.prepare(GenerateRequest(text="x"))

    run(tokenizer, text_script(tokenizer, " a b c d e"), body)
    assert failures == ["fake scheduler (pid 0) exited with code 1"]


def test_scheduler_failed_message_fails_in_flight_requests(tokenizer):
    async def body(tm, fake):
        fake.mute = True
        task = asyncio.create_task(collect(tm, GenerateRequest(text="x", sampling=greedy(8))))
        await asyncio.sleep(0.1)
        fake.fail_now = "CUDA out of memory"
        with pytest.raises(ServiceUnavailable, match="CUDA out of memory"):
            await task
        assert tm.failure == "CUDA out of memory"

    run(tokenizer, text_script(tokenizer, " a"), body)


def test_start_reports_scheduler_failure(tokenizer):
    endpoints = SchedulerEndpoints.new_ipc()
    fake = FakeScheduler(endpoints, text_script(tokenizer, " a"), fail_at_start="model not found: /nope")
    fake.start()

    async def main():
        tm = TokenizerManager(tokenizer, endpoints=endpoints, scheduler_dead=lambda: None)
        try:
            with pytest.raises(ServiceUnavailable, match="model not found: /nope"):
                await tm.start(timeout=10)
        finally:
            await tm.close()

    asyncio.run(main())


def test_scheduler_abort_is_an_error(tokenizer):
    def script(req):
        return tokenizer.encode(" a b", add_special_tokens=False), FinishReason(kind="abort", message="KV exhausted")

    async def body(tm, fake):
        with pytest.raises(RequestAborted, match="KV exhausted"):
            await collect(tm, GenerateRequest(text="x", sampling=greedy(8)))

    run(tokenizer, script, body)


def test_flush_cache(tokenizer):
    async def body(tm, fake):
        return await tm.flush_cache()

    reply, _ = run(tokenizer, text_script(tokenizer, " a"), body)
    assert reply.success


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (GenerateRequest(text=""), "the prompt is empty"),
        (GenerateRequest(input_ids=[]), "the prompt is empty"),
        (GenerateRequest(), "exactly one of"),
        (GenerateRequest(text="a", input_ids=[1]), "exactly one of"),
        (GenerateRequest(input_ids=[1, VOCAB]), f"token id {VOCAB} at position 1 is outside the vocabulary"),
        (GenerateRequest(input_ids=[1] * CONTEXT), f"context length is {CONTEXT}"),
        (GenerateRequest(input_ids=[1] * 10, sampling=SamplingParams(max_new_tokens=55)),
         f"maximum context length is {CONTEXT} tokens, but the request asks for 65"),
        (GenerateRequest(text="a", sampling=greedy(8, temperature=-1)), "temperature"),
        (GenerateRequest(text="a", sampling=greedy(8, stop_token_ids=[VOCAB])), "stop_token_ids"),
        (GenerateRequest(text="a", sampling=greedy(8), n=0), r"n must be in \[1, 128\]"),
        (GenerateRequest(text="a", sampling=greedy(8), n=10**30), r"n must be in \[1, 128\]"),
        (GenerateRequest(text="a", sampling=greedy(8), top_logprobs_num=21), "top_logprobs"),
        # Values that used to pass and then overflow the msgpack encoder (issue 10, item 4).
        (GenerateRequest(text="a", sampling=greedy(8, top_k=10**30)), "top_k"),
        (GenerateRequest(text="a", sampling=greedy(8, seed=-1)), "seed"),
        (GenerateRequest(text="a", sampling=greedy(8, stop=["x"] * 65)), "stop"),
        (GenerateRequest(text="a", sampling=greedy(8, stop=["\ud800"])), "stop: not valid Unicode"),
        (GenerateRequest(text="a\udfff"), "text: not valid Unicode"),
        (GenerateRequest(messages=[{"role": "user", "content": "\ud800"}]), "messages: not valid Unicode"),
        (GenerateRequest(text="a", rid="\ud800"), "rid: not valid Unicode"),
        (GenerateRequest(text="a", rid="r" * 257), "rid must have"),
    ],
)
def test_invalid_requests(tokenizer, req, message):
    async def body(tm, fake):
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
            await tm.prepare(req)

    run(tokenizer, text_script(tokenizer, " a"), body)


def test_default_max_new_tokens_shrinks_to_fit_and_chat_template_is_applied(tokenizer):
    async def body(tm, fake):
        fitted = await tm.prepare(GenerateRequest(input_ids=[1] * 10, fit_max_new_tokens=True,
                                            sampling=SamplingParams(max_new_tokens=1000)))
        chat = await tm.prepare(GenerateRequest(messages=[{"role": "user", "content": "hi"}], sampling=greedy(8)))
        return fitted, chat

    (fitted, chat), _ = run(tokenizer, text_script(tokenizer, " a"), body)
    assert fitted.sampling.max_new_tokens == CONTEXT - 10
    assert tokenizer.decode(chat.input_ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_without_tokenizer_ids_in_ids_out(tokenizer):
    async def body(tm, fake):
        with pytest.raises(InvalidRequest, match="skip-tokenizer-init"):
            await tm.prepare(GenerateRequest(text="hello"))
        return await collect(tm, GenerateRequest(input_ids=[5, 6, 7], sampling=greedy(3)))

    endpoints = SchedulerEndpoints.new_ipc()
    fake = FakeScheduler(endpoints, lambda req: ([11, 12, 13], FinishReason(kind="length")))
    fake.start()

    async def main():
        tm = TokenizerManager(None, endpoints=endpoints, scheduler_dead=fake.dead)
        try:
            await tm.start(timeout=10)
            return await body(tm, fake)
        finally:
            fake.exited.set()
            await tm.close()

    [result] = asyncio.run(main())
    assert result.token_ids == [11, 12, 13] and result.text == ""


def test_a_finished_request_does_not_release_its_rid_from_a_later_request(tokenizer):
    """A client may reuse a rid once its request finished; the old request's clean-up (its
    stream closed late) must not drop the new request's registration, or the new one hangs."""

    async def body(tm, fake):
        first = tm.generate(await tm.prepare(GenerateRequest(text="x", sampling=greedy(4), rid="same")))
        while (await first.__anext__()).finish is None:
            pass
        second = tm.generate(await tm.prepare(GenerateRequest(text="x", sampling=greedy(4), rid="same")))
        outputs = [await second.__anext__()]
        await first.aclose()  # the first request's clean-up runs while the second is live

        async def rest():
            async for output in second:
                outputs.append(output)

        await asyncio.wait_for(rest(), 10)
        return outputs

    outputs, _ = run(tokenizer, text_script(tokenizer, " one two three four"), body)
    assert outputs[-1].finish == FinishReason(kind="length")
    assert "".join(o.text for o in outputs) == " one two three four"


@pytest.mark.parametrize("ended_by", ["stream-closed", "stop-string"])
def test_a_rid_aborted_here_stays_taken_until_the_scheduler_answers_the_abort(tokenizer, ended_by):
    """A sequence aborted from here (its stream closed, or a stop string found by the
    detokenizer) still runs in the scheduler until the AbortReq gets there. A request reusing
    its rid meanwhile is refused -- it used to be accepted and then receive the old request's
    abort -- and one sent after the scheduler's answer gets exactly its own tokens."""
    text = " Paris is the capital of France" + " and more" * 30  # still running when the abort lands

    async def body(tm, fake):
        first = GenerateRequest(text="x", sampling=greedy(60, stop=["capital"] if ended_by == "stop-string" else []),
                                rid="same")
        if ended_by == "stop-string":
            [ended] = await collect(tm, first)
            assert ended.finish == FinishReason(kind="stop", matched="capital")
        else:
            async with contextlib.aclosing(tm.generate(await tm.prepare(first))) as out:
                await anext(out)
        # No await that yields to the loop since the AbortReq was queued: the scheduler's answer
        # cannot have been received yet.
        reuse = GenerateRequest(text="x", sampling=greedy(4), rid="same")
        with pytest.raises(InvalidRequest, match="'same' is already in use"):
            await anext(tm.generate(await tm.prepare(reuse)))
        while tm.num_in_flight:  # until the scheduler's abort arrived
            await asyncio.sleep(0.01)
        return await collect(tm, reuse)

    [result], fake = run(tokenizer, text_script(tokenizer, text), body, step_s=0.02)
    assert (result.text, result.finish) == (" Paris is the capital", FinishReason(kind="length"))
    assert [a.rid for a in fake.requests(AbortReq)] == ["same"]


def test_outputs_queued_after_a_stop_string_ended_a_sequence_are_dropped(tokenizer):
    """n = 2, sequence 0 ends on a stop string while its later tokens and finish are already
    queued (as when the consumer runs late): they are dropped, sequence 1 still ends whole (they
    used to count as a second finish of sequence 0 and end the request early), and no abort is
    sent for a sequence whose finish has already arrived."""
    texts = {"r-0": " Paris is the capital of France and more", "r-1": " one two three four five six seven"}

    def script(req):
        return tokenizer.encode(texts[req.rid], add_special_tokens=False), FinishReason(kind="length")

    async def body(tm, fake):
        req = GenerateRequest(text="x", sampling=greedy(40, stop=["capital"]), n=2, rid="r")
        async with contextlib.aclosing(tm.generate(await tm.prepare(req))) as outputs:
            return [o async for o in outputs]

    outputs, fake = run(tokenizer, script, body, whole=True)
    by_index = {i: [o for o in outputs if o.index == i] for i in (0, 1)}
    assert "".join(o.text for o in by_index[0]) == " Paris is the "
    assert [o.finish for o in by_index[0] if o.finish] == [FinishReason(kind="stop", matched="capital")]
    assert "".join(o.text for o in by_index[1]) == texts["r-1"]
    assert [o.finish for o in by_index[1] if o.finish] == [FinishReason(kind="length")]
    assert fake.requests(AbortReq) == []


@pytest.mark.parametrize("mode", ["null", "prefill", "decode"])
def test_bootstrap_fields_only_on_disaggregated_servers_and_passed_on(tokenizer, mode):
    from meshserve.messages import Bootstrap

    bootstrap = Bootstrap("127.0.0.1", 8998, 42)

    async def body(tm, fake):
        errors = []
        for req in (GenerateRequest(text="x", sampling=greedy(4)),
                    GenerateRequest(text="x", sampling=greedy(4), bootstrap=bootstrap),
                    GenerateRequest(text="x", sampling=greedy(4), bootstrap=bootstrap, n=2)):
            try:
                await collect(tm, req)
                errors.append(None)
            except InvalidRequest as err:
                errors.append(err.param)
        return errors

    errors, fake = run(tokenizer, text_script(tokenizer, " one two"), body, disaggregation_mode=mode)
    if mode == "null":
        assert errors == [None, "bootstrap_room", "bootstrap_room"]
        assert [r.bootstrap for r in fake.requests(GenerateReq)] == [None]
    else:
        assert errors == ["bootstrap_room", None, "n"]
        assert [r.bootstrap for r in fake.requests(GenerateReq)] == [bootstrap]


def test_dp_group_stats_sum_expert_loads_element_by_element():
    """DP groups' reports add up; the expert-load tuples add per expert and per rank, and a group
    that reports no loads (DP attention: only group 0 does) adds nothing."""
    from meshserve.messages import SchedulerStats
    from meshserve.server.tokenizer_manager import _summed

    def report(dp_rank: int, **fields) -> SchedulerStats:
        return SchedulerStats(num_running=1, num_waiting=0, used_tokens=5, max_total_tokens=100, cache_hit_tokens=0,
                              prompt_tokens=7, generation_tokens=3, num_retracted=0, dp_rank=dp_rank, **fields)

    total = _summed([report(0, expert_tokens=(4, 0, 2), ep_rank_tokens=(5, 1), eplb_rebalances=2),
                     report(1), report(2, expert_tokens=(1, 1, 1), ep_rank_tokens=(2, 1), eplb_rebalances=1)])
    assert (total.expert_tokens, total.ep_rank_tokens, total.eplb_rebalances) == ((5, 1, 3), (7, 2), 3)
    assert (total.num_running, total.prompt_tokens, total.max_total_tokens) == (3, 21, 300)


def test_deltas_a_late_consumer_has_not_taken_are_merged_per_sequence():
    """The request's pending deltas: a consumer that keeps up takes each as it came; one that
    runs late gets a sequence's piled-up deltas as one (ids and logprobs in order, the later
    counts and finish), oldest sequence first; an error is raised once the deltas that came
    before it are taken, and deltas after it are dropped."""
    from meshserve.server.tokenizer_manager import _Request, _Sequence

    async def main():
        request = _Request(prompt_tokens=3, arrival=0.0)
        a, b = _Sequence("r-0", 0, None), _Sequence("r-1", 1, None)
        request.put(a, ReqOutput(rid="r-0", new_ids=[1], logprobs=[-0.1], completion_tokens=1))
        assert (await request.next())[1].new_ids == [1]  # kept up: as it came
        request.put(a, ReqOutput(rid="r-0", new_ids=[2], logprobs=[-0.2], completion_tokens=2))
        request.put(b, ReqOutput(rid="r-1", new_ids=[7], completion_tokens=1))
        request.put(a, ReqOutput(rid="r-0", new_ids=[3, 4], logprobs=[-0.3, -0.4], completion_tokens=4,
                                 finish=FinishReason(kind="length")))
        request.fail(RequestAborted("gone"))
        request.put(a, ReqOutput(rid="r-0", new_ids=[5], completion_tokens=5))  # after the error: dropped
        seq, merged = await request.next()
        assert seq is a and merged.new_ids == [2, 3, 4] and merged.logprobs == [-0.2, -0.3, -0.4]
        assert merged.completion_tokens == 4 and merged.finish == FinishReason(kind="length")
        seq, only = await request.next()
        assert seq is b and only.new_ids == [7]
        with pytest.raises(RequestAborted, match="gone"):
            await request.next()
        waiter = asyncio.ensure_future(_Request(prompt_tokens=1, arrival=0.0).next())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # nothing pending, no error: it waits
        waiter.cancel()

    asyncio.run(main())


def test_a_stop_string_inside_deltas_merged_with_the_last_one_ends_as_a_stop(tokenizer):
    """All of a sequence's tokens arrive in one merged delta with the scheduler's "length"
    finish, and the text holds a stop string the scheduler missed: the text ends before it and
    the finish is that stop string, as when the tokens came one by one."""
    text = " Paris is the capital of France and more"

    async def body(tm, fake):
        req = GenerateRequest(text="x", sampling=greedy(40, stop=["capital"]), rid="r")
        async with contextlib.aclosing(tm.generate(await tm.prepare(req))) as outputs:
            return [o async for o in outputs]

    outputs, fake = run(tokenizer, text_script(tokenizer, text), body, whole=True)
    assert "".join(o.text for o in outputs) == " Paris is the "
    assert [o.finish for o in outputs if o.finish] == [FinishReason(kind="stop", matched="capital")]
    assert fake.requests(AbortReq) == []


def test_a_consumer_running_late_takes_the_piled_up_tokens_as_one_output(tokenizer):
    """The scheduler's deltas for every token arrive before the consumer looks (one BatchOut):
    the consumer gets one output with all the text, ids and the finish, not one per token."""
    text = " one two three four five six seven"

    async def body(tm, fake):
        req = GenerateRequest(text="x", sampling=greedy(40), rid="r")
        async with contextlib.aclosing(tm.generate(await tm.prepare(req))) as outputs:
            return [o async for o in outputs]

    outputs, _ = run(tokenizer, text_script(tokenizer, text), body, whole=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(outputs) == 1 and len(ids) > 1
    assert outputs[0].text == text and outputs[0].token_ids == ids
    assert outputs[0].finish == FinishReason(kind="length") and outputs[0].completion_tokens == len(ids)
