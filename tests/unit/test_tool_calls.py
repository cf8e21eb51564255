"""Tool-call formats: parsing (whole and streamed), the forcing grammars, and request checks."""

from __future__ import annotations

import json

import pytest
import xgrammar

from meshserve.server.tool_calls import FORMATS, ToolCallError, ToolCallStream, ToolRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
LLAMA_TEXT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'


@pytest.mark.parametrize(("parser", "text"), [("qwen25", HERMES_TEXT), ("llama3", LLAMA_TEXT)])
def test_parse_calls(parser, text):
    content, calls = FORMATS[parser].parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert content == ("Let me check." if parser == "qwen25" else "")


@pytest.mark.parametrize("parser", ["hermes", "llama3"])
def test_text_without_calls_stays_content(parser):
    for text in ["Just text.", "<tool_call>\n{broken\n</tool_call>", '{"no": "name"}']:
        assert FORMATS[parser].parse(text) == (text, [])


@pytest.mark.parametrize(("parser", "text"), [("qwen", HERMES_TEXT), ("llama3", LLAMA_TEXT)])
def test_stream_holds_calls_until_the_end(parser, text):
    stream = ToolCallStream(FORMATS[parser])
    sent = "".join(stream.push(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert (sent + rest).strip() == ("Let me check." if parser == "qwen" else "")


def test_stream_of_plain_text_passes_through():
    for parser in ("hermes", "llama3"):
        stream = ToolCallStream(FORMATS[parser])
        text = "Hello <tool there, no calls {here}."
        sent = "".join(stream.push(text[i : i + 2]) for i in range(0, len(text), 2))
        rest, calls = stream.finish()
        assert sent + rest == text and calls == []


@pytest.mark.parametrize("parser", ["hermes", "llama3"])
def test_forced_grammar_accepts_exactly_a_call(parser, default_model_dir):
    from transformers import AutoTokenizer

    fmt = FORMATS[parser]
    request = ToolRequest.from_fields([WEATHER, TIME], "required", parser)
    (kind, text), = request.grammar.items()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer))
    compiled = compiler.compile_json_schema(text) if kind == "json_schema" else compiler.compile_grammar(text)
    call = {"name": "get_weather", fmt.arguments_key: {"city": "Oslo"}}
    good = fmt.start + json.dumps(call) + fmt.end
    assert xgrammar.GrammarMatcher(compiled).accept_string(good)
    bad = fmt.start + json.dumps({"name": "get_weather", fmt.arguments_key: {"days": 2}}) + fmt.end
    assert not xgrammar.GrammarMatcher(compiled).accept_string(bad)  # city is required


def test_named_function_and_errors():
    named = ToolRequest.from_fields([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, "llama3")
    assert "get_weather" not in named.grammar["json_schema"]
    assert ToolRequest.from_fields([WEATHER], "none", None).format is None
    assert ToolRequest.from_fields([WEATHER], "auto", "hermes").grammar == {}
    for tools, choice, parser, param in [
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "hermes", "tool_choice"),
        ([WEATHER], "sometimes", "hermes", "tool_choice"),
        (None, "required", "hermes", "tool_choice"),
        ([{"type": "retrieval"}], "auto", "hermes", "tools"),
        ([WEATHER], "auto", None, "tools"),
    ]:
        with pytest.raises(ToolCallError) as err:
            ToolRequest.from_fields(tools, choice, parser)
        assert err.value.param == param
