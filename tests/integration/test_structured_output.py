"""Structured output end to end (issue 14): random JSON schemas and regexes served by one
in-process engine, every output checked by an independent validator (jsonschema, Python's re),
greedy and at temperature 1; structured requests in a batch leave plain ones unchanged; the
same under tensor parallelism (tp 2). The model is a tiny random Llama with the real SmolLM2
tokenizer: it has no idea of JSON, so every valid output is the grammar's doing."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from meshserve.engine import Engine
from meshserve.server.generation import InvalidRequest
from meshserve.server.tool_calls import ToolRequest
from tests.structured_cases import random_regex, random_schema

NUM_SCHEMAS = 300
NUM_REGEXES = 100
# Generous for the generators' bounded outputs (the longest seen is well under half of it): an
# output cut by this limit counts as a failure.
MAX_NEW_TOKENS = 160


def _engine(model_dir, **kwargs) -> Engine:
    return Engine(str(model_dir), device="cpu", max_total_tokens=65536, max_running_requests=1024,
                  grammar_backend="xgrammar", **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    with _engine(tiny_llama_dir) as eng:
        yield eng


def _structured_batch(kind: str, cases: list[str]) -> tuple[list[str], list[dict]]:
    """Each case greedily and at temperature 1 (seeded), one prompt per request."""
    prompts, params = [], []
    for i, case in enumerate(cases):
        for temperature in (0.0, 1.0):
            prompts.append(f"Request {i}: answer in the format.")
            params.append({kind: case, "temperature": temperature, "seed": i, "max_new_tokens": MAX_NEW_TOKENS})
    return prompts, params


def _check_finished(outs: list[dict]) -> None:
    bad = [o["meta_info"]["finish_reason"] for o in outs if o["meta_info"]["finish_reason"]["type"] != "stop"]
    assert not bad, f"{len(bad)} outputs did not end by their grammar: {bad[:3]}"


def _check_schemas(eng: Engine, schemas: list[dict]) -> None:
    prompts, params = _structured_batch("json_schema", [json.dumps(s) for s in schemas])
    outs = eng.generate(prompts, params)
    _check_finished(outs)
    failures = []
    for i, out in enumerate(outs):
        schema = schemas[i // 2]
        try:
            jsonschema.validate(json.loads(out["text"]), schema)
        except (ValueError, jsonschema.ValidationError) as err:
            failures.append((schema, out["text"], str(err)[:200]))
    assert not failures, f"{len(failures)} of {len(outs)} outputs invalid, e.g. {failures[0]}"


def _check_regexes(eng: Engine, regexes: list[str]) -> None:
    prompts, params = _structured_batch("regex", regexes)
    outs = eng.generate(prompts, params)
    _check_finished(outs)
    failures = [(regexes[i // 2], o["text"]) for i, o in enumerate(outs) if not re.fullmatch(regexes[i // 2], o["text"])]
    assert not failures, f"{len(failures)} of {len(outs)} outputs do not match, e.g. {failures[:3]}"


def test_random_json_schemas(engine):
    rng = random.Random(14)
    _check_schemas(engine, [random_schema(rng) for _ in range(NUM_SCHEMAS)])


def test_random_regexes(engine):
    rng = random.Random(1414)
    _check_regexes(engine, [random_regex(rng) for _ in range(NUM_REGEXES)])


PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]


def _plain_unchanged_by_structured_neighbours(eng: Engine) -> None:
    plain = [{"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}] * len(PLAIN_PROMPTS)
    solo = [eng.generate(p, s)["output_ids"] for p, s in zip(PLAIN_PROMPTS, plain)]
    rng = random.Random(7)
    structured = [{"json_schema": json.dumps(random_schema(rng)), "temperature": 1.0, "seed": i,
                   "max_new_tokens": MAX_NEW_TOKENS} for i in range(8)]
    structured += [{"regex": random_regex(rng), "temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}
                   for _ in range(4)]
    # Interleaved, so structured and plain rows share every batch.
    prompts, params = [], []
    for i, s in enumerate(structured):
        prompts.append(f"Structured {i}:")
        params.append(s)
        if i < len(PLAIN_PROMPTS):
            prompts.append(PLAIN_PROMPTS[i])
            params.append(plain[i])
    outs = eng.generate(prompts, params)
    mixed = [o["output_ids"] for p, o in zip(params, outs) if p in plain and "json_schema" not in p
             and "regex" not in p]
    assert mixed == solo
    _check_finished([o for p, o in zip(params, outs) if "json_schema" in p or "regex" in p])


def test_plain_requests_unchanged_by_structured_neighbours(engine):
    _plain_unchanged_by_structured_neighbours(engine)


def test_invalid_grammars_are_refused_and_engine_keeps_serving(engine):
    for params, expected in [
        ({"json_schema": '{"type": "objectx"}'}, 'Unsupported type "objectx"'),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"regex": "(ab"}, "parenthesis is not closed"),
        ({"ebnf": "root ::= missing"}, 'Rule "missing" is not defined'),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one of json_schema, regex, ebnf"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(expected)):
            engine.generate("x", params)
    out = engine.generate("x", {"ebnf": 'root ::= "yes" | "no"', "temperature": 1.0, "n": 4, "seed": 3})
    assert sorted({o["text"] for o in out}) <= ["no", "yes"] and len(out) == 4
    assert all(o["meta_info"]["finish_reason"]["type"] == "stop" for o in out)


def test_grammar_backend_none_refuses(tiny_llama_dir):
    with Engine(str(tiny_llama_dir), device="cpu", max_total_tokens=4096, grammar_backend="none") as eng:
        with pytest.raises(InvalidRequest, match=re.escape("--grammar-backend none")):
            eng.generate("x", {"regex": "a+"})
        assert eng.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_tensor_parallel_with_overlap(tiny_llama_dir):
    """tp 2: one mask decides (the leader samples and broadcasts), both ranks' matchers advance
    alike, grammar readiness is agreed over the ranks. Overlap scheduling is on (off by default
    on the CPU), so a structured step reads its in-flight tokens before sampling."""
    rng = random.Random(2)
    with _engine(tiny_llama_dir, tp_size=2, enable_overlap_schedule=True) as eng:
        _check_schemas(eng, [random_schema(rng) for _ in range(40)])
        _check_regexes(eng, [random_regex(rng) for _ in range(20)])
        _plain_unchanged_by_structured_neighbours(eng)


@pytest.mark.parametrize("parser", ["llama3", "hermes"])
def test_forced_tool_call_grammars(engine, parser):
    """tool_choice required: each format's grammar yields one call that its parser reads back."""
    params_schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8},
                                                      "k": {"type": "integer", "minimum": 1, "maximum": 9}},
                     "required": ["q"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "search", "parameters": params_schema}},
             {"type": "function", "function": {"name": "noop"}}]
    request = ToolRequest.from_fields(tools, "required", parser)
    outs = engine.generate([f"Call {i}" for i in range(16)], [
        {**request.grammar, "temperature": 1.0, "seed": i, "max_new_tokens": MAX_NEW_TOKENS} for i in range(16)])
    _check_finished(outs)
    for out in outs:
        content, calls = request.format.parse(out["text"])
        assert content == "" and len(calls) == 1, out["text"]
        assert calls[0].name in ("search", "noop")
        if calls[0].name == "search":
            jsonschema.validate(json.loads(calls[0].arguments), params_schema)
