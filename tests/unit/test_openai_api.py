"""Unit tests for meshserve.server.openai_api: request conversion, refusals, response bodies."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from meshserve.messages import FinishReason, TopLogprob
from meshserve.sampling_params import MAX_NEW_TOKENS_LIMIT
from meshserve.server import openai_api as oai
from meshserve.server.generation import InvalidRequest, SequenceOutput, SequenceResult, ServiceUnavailable


def chat(**body) -> oai.ChatCompletionRequest:
    return oai.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


def completion(**body) -> oai.CompletionRequest:
    return oai.CompletionRequest.model_validate({"prompt": "hi", **body})


class TestChatRequest:
    def test_defaults_fill_the_context(self):
        req = chat().to_generate_request()
        assert req.messages == [{"role": "user", "content": "hi"}]
        assert req.sampling.max_new_tokens == MAX_NEW_TOKENS_LIMIT and req.fit_max_new_tokens
        assert req.sampling.temperature == 1.0 and req.n == 1 and not req.return_logprob

    def test_sampling_fields_and_extensions(self):
        req = chat(max_tokens=7, temperature=0, top_p=0.5, stop="END", seed=3, n=2, frequency_penalty=0.1,
                   presence_penalty=0.2, top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
                   ignore_eos=True, stop_token_ids=[4], skip_special_tokens=False).to_generate_request()
        s = req.sampling
        assert (s.max_new_tokens, s.temperature, s.top_p, s.stop, s.seed) == (7, 0.0, 0.5, ["END"], 3)
        assert (s.frequency_penalty, s.presence_penalty, s.top_k, s.min_p, s.repetition_penalty) == (0.1, 0.2, 5, 0.1, 1.1)
        assert (s.min_new_tokens, s.ignore_eos, s.stop_token_ids, s.skip_special_tokens) == (2, True, [4], False)
        assert req.n == 2 and not req.fit_max_new_tokens

    def test_max_completion_tokens_wins(self):
        assert chat(max_tokens=7, max_completion_tokens=9).to_generate_request().sampling.max_new_tokens == 9

    def test_messages_become_template_dicts(self):
        req = oai.ChatCompletionRequest.model_validate({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "u"},
            {"role": "assistant", "content": None},
        ]}).to_generate_request()
        assert req.messages == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "ab", "name": "u"},
            {"role": "assistant", "content": ""},
        ]

    def test_logprobs(self):
        req = chat(logprobs=True, top_logprobs=3).to_generate_request()
        assert req.return_logprob and req.top_logprobs_num == 3

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"response_format": {"type": "json_schema"}}, "response_format"),
            ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"logit_bias": {"1": 5}}, "logit_bias"),
            ({"top_logprobs": 2}, "top_logprobs"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
             "messages"),
        ],
    )
    def test_refusals(self, body, param):
        with pytest.raises(oai.APIError) as err:
            chat(**body).to_generate_request()
        assert err.value.status == 400 and err.value.param == param

    def test_text_response_format_is_fine(self):
        chat(response_format={"type": "text"}, tool_choice="none").to_generate_request()

    @pytest.mark.parametrize(
        "body",
        [{"messages": []}, {"messages": [{"role": "bogus", "content": "x"}]}, {"messages": "hi"},
         {"messages": [{"role": "user", "content": "x"}], "n": 0},
         {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
         {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}],
    )
    def test_schema_errors(self, body):
        with pytest.raises(ValidationError):
            oai.ChatCompletionRequest.model_validate(body)


class TestCompletionRequest:
    def test_default_max_tokens_is_16_and_may_shrink(self):
        req = completion().to_generate_request()
        assert req.text == "hi" and req.sampling.max_new_tokens == 16 and req.fit_max_new_tokens

    def test_explicit_max_tokens_may_not_shrink(self):
        req = completion(max_tokens=16).to_generate_request()
        assert req.sampling.max_new_tokens == 16 and not req.fit_max_new_tokens

    def test_null_max_tokens_fills_the_context(self):
        req = completion(max_tokens=None).to_generate_request()
        assert req.sampling.max_new_tokens == MAX_NEW_TOKENS_LIMIT and req.fit_max_new_tokens

    @pytest.mark.parametrize(
        ("prompt", "field", "value"),
        [("hi", "text", "hi"), ([1, 2], "input_ids", [1, 2]), (["hi"], "text", "hi"), ([[3, 4]], "input_ids", [3, 4]),
         ([], "input_ids", [])],
    )
    def test_prompt_forms(self, prompt, field, value):
        assert getattr(completion(prompt=prompt).to_generate_request(), field) == value

    def test_logprobs_number_is_top_logprobs(self):
        req = completion(logprobs=0).to_generate_request()
        assert req.return_logprob and req.top_logprobs_num == 0
        assert completion(logprobs=4).to_generate_request().top_logprobs_num == 4

    @pytest.mark.parametrize("body", [{"prompt": ["a", "b"]}, {"echo": True}, {"suffix": "x"}, {"best_of": 3}])
    def test_refusals(self, body):
        with pytest.raises(oai.APIError, match="not supported yet"):
            completion(**body).to_generate_request()

    @pytest.mark.parametrize("prompt", [[1, "a"], [True, 2], 5, None])
    def test_bad_prompts(self, prompt):
        with pytest.raises(ValidationError):
            completion(prompt=prompt)


def test_check_model():
    oai.check_model(None, "served", "/path")
    oai.check_model("served", "served", "/path")
    oai.check_model("/path", "served", "/path")
    with pytest.raises(oai.APIError) as err:
        oai.check_model("gpt-4", "served", "/path")
    assert err.value.status == 404 and err.value.code == "model_not_found"


def test_error_bodies():
    assert oai.APIError(400, "bad", param="n").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    assert oai.APIError.from_generate_error(InvalidRequest("too long", param="max_tokens")).body()["error"] == {
        "message": "too long", "type": "invalid_request_error", "param": "max_tokens", "code": None}
    unavailable = oai.APIError.from_generate_error(ServiceUnavailable("gone"))
    assert unavailable.status == 503 and unavailable.body()["error"]["type"] == "server_error"


def ctx(logprobs: bool = False, include_token_ids: bool = False) -> oai.ResponseContext:
    return oai.ResponseContext("chatcmpl-1", 123, "m", lambda t: f"<{t}>", logprobs, include_token_ids)


def result(index: int, text: str, ids: list[int], finish: FinishReason, **kw) -> SequenceResult:
    return SequenceResult(index=index, rid=f"r{index}", text=text, token_ids=ids, finish=finish, prompt_tokens=5,
                          completion_tokens=len(ids), **kw)


def test_chat_response_counts_the_prompt_once():
    results = [result(0, "a", [1], FinishReason("stop", matched=2), cached_tokens=4),
               result(1, "bc", [1, 2], FinishReason("length"))]
    body = oai.chat_completion_response(ctx(), results)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1" and body["model"] == "m"
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "bc"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 4}}


def test_chat_logprobs_clamp_minus_infinity():
    r = result(0, "a", [7], FinishReason("length"), logprobs=[-math.inf],
               top_logprobs=[[TopLogprob(7, -0.5), TopLogprob(8, -1.5)]])
    [choice] = oai.chat_completion_response(ctx(logprobs=True), [r])["choices"]
    assert choice["logprobs"] == {"content": [{
        "token": "<7>", "logprob": oai.MIN_LOGPROB, "bytes": list(b"<7>"),
        "top_logprobs": [{"token": "<7>", "logprob": -0.5, "bytes": list(b"<7>")},
                         {"token": "<8>", "logprob": -1.5, "bytes": list(b"<8>")}],
    }]}


def test_completion_response_logprobs_and_token_ids():
    r = result(0, "<1><2>", [1, 2], FinishReason("length"), logprobs=[-0.1, -0.2],
               top_logprobs=[[TopLogprob(1, -0.1)], [TopLogprob(2, -0.2)]])
    body = oai.completion_response(ctx(logprobs=True, include_token_ids=True), [r])
    [choice] = body["choices"]
    assert body["object"] == "text_completion"
    assert choice["logprobs"] == {"tokens": ["<1>", "<2>"], "token_logprobs": [-0.1, -0.2],
                                  "top_logprobs": [{"<1>": -0.1}, {"<2>": -0.2}], "text_offset": [0, 3]}
    assert choice["token_ids"] == [1, 2]


def test_stream_chunks():
    out = SequenceOutput(index=1, rid="r", text="hey", token_ids=[3], logprobs=[], top_logprobs=[],
                         finish=FinishReason("stop", matched="."), prompt_tokens=5, cached_tokens=0,
                         completion_tokens=1)
    role = oai.chat_role_chunk(ctx(), 0, include_usage=True)
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and role["usage"] is None
    delta = oai.chat_delta_chunk(ctx(), out, include_usage=False)
    assert delta["object"] == "chat.completion.chunk" and "usage" not in delta
    assert delta["choices"][0] == {"index": 1, "delta": {"content": "hey"}, "logprobs": None,
                                   "finish_reason": "stop", "matched_stop": "."}
    text = oai.completion_delta_chunk(ctx(), out, include_usage=False, text_offset=0)
    assert text["choices"][0]["text"] == "hey"
    usage = oai.usage_chunk(ctx(), "chat.completion.chunk", [result(0, "hey", [3], FinishReason("length"))])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 1
    held = SequenceOutput(index=0, rid="r", text="", token_ids=[4], logprobs=[], top_logprobs=[], finish=None,
                          prompt_tokens=5, cached_tokens=0, completion_tokens=2)
    assert oai.chat_delta_chunk(ctx(), held, include_usage=False) is None  # text held back: nothing to say
    assert oai.completion_delta_chunk(ctx(include_token_ids=True), held, False, 0)["choices"][0]["token_ids"] == [4]
    assert oai.sse(None) == b""
    event = oai.sse(delta)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[len(b"data: "):]) == delta


# ---- a stream that fails after its first chunk (issue 10, item 4) ----------------------------


def test_any_error_mid_stream_ends_with_an_error_event_and_done():
    """Whatever fails once a stream has started (here not a GenerateError: the OverflowError
    of the top_k bug), the client gets an error event and then [DONE]."""
    import asyncio
    from types import SimpleNamespace

    from meshserve.server.generation import SequenceOutput
    from meshserve.server.http_server import event_stream

    class FailingAfterOneOutput:
        async def generate(self, prepared):
            yield SequenceOutput(index=0, rid="r", text="Hi", token_ids=[1], logprobs=[], top_logprobs=[],
                                 finish=None, prompt_tokens=1, cached_tokens=0, completion_tokens=1)
            raise OverflowError("int too big to convert")

    async def events() -> list[bytes]:
        stream = event_stream(FailingAfterOneOutput(), SimpleNamespace(n=1),  # type: ignore[arg-type]
                              render=lambda out, _: b"data: " + out.text.encode() + b"\n\n", prologue=[b"data: role\n\n"])
        return [event async for event in stream]

    role, chunk, error, done = asyncio.run(events())
    assert (role, chunk, done) == (b"data: role\n\n", b"data: Hi\n\n", b"data: [DONE]\n\n")
    body = json.loads(error.removeprefix(b"data: "))
    assert body["error"]["type"] == "server_error" and "OverflowError" in body["error"]["message"]
