"""Unit tests for meshserve.server.native_api (SGLang's /generate schema and response)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshserve.messages import FinishReason, TopLogprob
from meshserve.server.generation import InvalidRequest, SequenceResult
from meshserve.server.native_api import (
    SGLANG_DEFAULT_MAX_NEW_TOKENS,
    GenerateReqInput,
    engine_requests,
    native_response,
)


def parse(**body) -> GenerateReqInput:
    return GenerateReqInput.model_validate(body)


def test_sampling_params_with_sglang_names():
    [req] = parse(text="hi", rid="r1", sampling_params={
        "max_new_tokens": 5, "min_new_tokens": 1, "temperature": 0, "top_p": 0.9, "top_k": 3, "min_p": 0.1,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "repetition_penalty": 1.1, "stop": "x",
        "stop_token_ids": [2], "ignore_eos": True, "skip_special_tokens": False, "n": 2, "sampling_seed": 9,
    }).to_generate_requests()
    s = req.sampling
    assert (s.max_new_tokens, s.min_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p) == (5, 1, 0.0, 0.9, 3, 0.1)
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (0.1, 0.2, 1.1)
    assert (s.stop, s.stop_token_ids, s.ignore_eos, s.skip_special_tokens, s.seed) == (["x"], [2], True, False, 9)
    assert req.n == 2 and req.rid == "r1" and req.text == "hi" and not req.fit_max_new_tokens


def test_default_max_new_tokens_is_sglangs_and_may_shrink():
    [req] = parse(input_ids=[1, 2]).to_generate_requests()
    assert req.sampling.max_new_tokens == SGLANG_DEFAULT_MAX_NEW_TOKENS and req.fit_max_new_tokens
    assert req.input_ids == [1, 2]


def test_batches():
    texts = parse(text=["a", "b"], rid=["x", "y"]).to_generate_requests()
    assert [(r.text, r.rid) for r in texts] == [("a", "x"), ("b", "y")]
    ids = parse(input_ids=[[1], [2, 3]]).to_generate_requests()
    assert [r.input_ids for r in ids] == [[1], [2, 3]]


@pytest.mark.parametrize(
    "body",
    [{}, {"text": "a", "input_ids": [1]}, {"text": ["a", "b"], "rid": "x"}, {"text": "a", "rid": ["x"]},
     {"text": "a", "logprob_start_len": 0}],
)
def test_invalid(body):
    with pytest.raises(InvalidRequest):
        parse(**body).to_generate_requests()


@pytest.mark.parametrize(
    "body",
    [{"text": "a", "sampling_params": {"structural_tag": "x"}}, {"text": "a", "image_data": "x"},
     {"text": "a", "top_logprobs_num": 21}, {"input_ids": ["a"]}],
)
def test_unknown_or_bad_fields_are_refused(body):
    with pytest.raises(ValidationError):
        parse(**body)


def test_response_shape():
    r = SequenceResult(index=0, rid="r", text="ab", token_ids=[5, 6], logprobs=[-0.1, -0.2],
                       top_logprobs=[[TopLogprob(5, -0.1)], [TopLogprob(6, -0.2)]],
                       finish=FinishReason("stop", matched=2), prompt_tokens=3, cached_tokens=1, completion_tokens=2)
    body = native_response(r, return_logprob=True, top_logprobs_num=1, token_text=str)
    assert body == {"text": "ab", "output_ids": [5, 6], "meta_info": {
        "id": "r", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 3, "completion_tokens": 2,
        "cached_tokens": 1, "output_token_logprobs": [[-0.1, 5, "5"], [-0.2, 6, "6"]],
        "output_top_logprobs": [[[-0.1, 5, "5"]], [[-0.2, 6, "6"]]]}}
    length = SequenceResult(index=0, finish=FinishReason("length"), completion_tokens=4)
    assert native_response(length)["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


# ---- Engine.generate's arguments (issue 10, item 4) ------------------------------------------


@pytest.mark.parametrize(("args", "where"), [
    ((123, None, None), "text"),
    ((None, None, None), "exactly one of prompt, input_ids"),
    (("a", None, [1]), "exactly one of prompt, input_ids"),
    ((None, None, 5), "input_ids"),
    ((None, None, [1.5]), "input_ids"),
    (("a", "greedy", None), "sampling_params"),
    (("a", [{}, {}], None), "2 sampling_params for 1 prompts"),
    (("a", {"top_k": "three"}, None), "top_k"),
    (("a", {"temperture": 0}, None), "temperture"),
    (("a", {"n": 10**30}, None), "n"),
])
def test_engine_arguments_raise_invalid_request(args, where):
    with pytest.raises(InvalidRequest, match=where):
        engine_requests(*args)


def test_engine_arguments_batch_and_single():
    requests, batch = engine_requests(["a", "b"], {"max_new_tokens": 3}, None)
    assert batch and [r.text for r in requests] == ["a", "b"] and requests[0].sampling.max_new_tokens == 3
    requests, batch = engine_requests(None, None, [1, 2])
    assert not batch and requests[0].input_ids == [1, 2]


# ---- prefill-decode disaggregation and sglang-router's extra fields --------------------------


def test_bootstrap_fields_become_one_bootstrap_per_prompt():
    from meshserve.messages import Bootstrap

    [req] = parse(text="hi", bootstrap_host="10.0.0.1", bootstrap_port=9000, bootstrap_room=7).to_generate_requests()
    assert req.bootstrap == Bootstrap("10.0.0.1", 9000, 7)
    a, b = parse(text=["x", "y"], bootstrap_host=["h", "h"], bootstrap_port=[None, 9001],
                 bootstrap_room=[1, 2]).to_generate_requests()
    assert a.bootstrap == Bootstrap("h", 8998, 1) and b.bootstrap == Bootstrap("h", 9001, 2)
    assert parse(text="hi").to_generate_requests()[0].bootstrap is None


@pytest.mark.parametrize("body, param", [
    (dict(bootstrap_host="h"), "bootstrap_room"),
    (dict(bootstrap_room=3), "bootstrap_host"),
    (dict(bootstrap_host="h", bootstrap_room=-1), "bootstrap_room"),
    (dict(bootstrap_host="h", bootstrap_room=1, bootstrap_port=70000), "bootstrap_port"),
])
def test_partial_or_out_of_range_bootstrap_is_refused(body, param):
    with pytest.raises(InvalidRequest) as err:
        parse(text="hi", **body).to_generate_requests()
    assert err.value.param == param


def test_sglang_router_fields_accepted_at_their_defaults_and_refused_when_they_ask_for_more():
    body = dict(text="hi", model="m", log_metrics=True, no_logs=False, background=False,
                return_hidden_states=False, return_bytes=False, return_entropy=False)
    assert len(parse(**body).to_generate_requests()) == 1
    with pytest.raises(InvalidRequest) as err:
        parse(**{**body, "return_hidden_states": True}).to_generate_requests()
    assert err.value.param == "return_hidden_states"
