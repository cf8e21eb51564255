"""Tool calls and response_format through the `openai` client against a real server: a tiny
random Qwen3 (fast on CPU), whose default tool-call format is Hermes' (<tool_call> tags, forced by
an EBNF grammar); the Llama-3 format's forcing grammar is served in test_structured_output.py.
A random model calls tools only under a grammar, so "auto" is checked for consistency only."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import SERVER_TEST_ARGS
from tests.server_process import start_server

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen3_dir):
    server = start_server(tmp_path_factory.mktemp("tools_server"), *SERVER_TEST_ARGS, "--model-path",
                          str(tiny_qwen3_dir), "--served-model-name", MODEL)
    yield server
    server.stop()
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, allowed):
    assert calls, "no tool_calls parsed"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_are_parsed(server, choice):
    client = server.openai()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                         tool_choice=choice, max_tokens=120, temperature=0.7, seed=1, n=2)
    allowed = {"get_weather", "get_time"} if choice == "required" else {"get_weather"}
    for c in out.choices:
        assert c.finish_reason == "tool_calls", c
        _check_calls(c.message.tool_calls, allowed)


def test_streamed_tool_calls(server):
    client = server.openai()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                            tool_choice="required", max_tokens=120, temperature=0, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(delta.index, delta)
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    _check_calls(list(calls.values()), {"get_weather", "get_time"})


def test_tool_choice_none_and_auto_give_text_or_calls(server):
    client = server.openai()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                         tool_choice="none", max_tokens=8, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    auto = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                          max_tokens=60, temperature=0)
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the model chose to call: it must parse
        _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_response_format_json_schema_and_object(server):
    client = server.openai()
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
              "required": ["capital", "population"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=60, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    obj = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    if obj.choices[0].finish_reason == "stop":  # a free-form object may be longer than max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    completion = client.completions.create(model=MODEL, prompt="Answer yes or no:",
                                           max_tokens=10, extra_body={"regex": "(yes|no)"})
    assert completion.choices[0].text in ("yes", "no")


def test_bad_tool_requests_are_400(server):
    client = server.openai()
    for kwargs, where in [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
         "objectx"),
    ]:
        with pytest.raises(openai.BadRequestError, match=where):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **kwargs)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
