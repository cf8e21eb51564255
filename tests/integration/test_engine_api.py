"""meshserve.Engine, the offline API: same scheduler processes, native /generate result shape."""

from __future__ import annotations

import pytest

import meshserve
from meshserve.server.generation import InvalidRequest


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with meshserve.Engine(device="cpu", max_total_tokens=4096, chunked_prefill_size=64) as engine:
        yield engine


def test_single_prompt(engine):
    out = engine.generate("The capital of France is", {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert set(out) == {"text", "output_ids", "meta_info"}
    assert len(out["output_ids"]) == 6 and out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_batch_matches_single_prompts(engine):
    prompts = ["Hello, my name is", "The sky is", "1, 2, 3,"]
    greedy = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    batch = engine.generate(prompts, greedy)
    assert [b["text"] for b in batch] == [engine.generate(p, greedy)["text"] for p in prompts]


def test_per_prompt_params_ids_and_n(engine):
    outs = engine.generate(input_ids=[[1, 2, 3], [4, 5]], sampling_params=[{"max_new_tokens": 2}, {"max_new_tokens": 3}])
    assert [len(o["output_ids"]) for o in outs] == [2, 3] or all(o["meta_info"]["finish_reason"]["type"] == "stop"
                                                                   for o in outs)
    samples = engine.generate("Tell me a joke.", {"max_new_tokens": 4, "n": 2, "seed": 5})
    assert isinstance(samples, list) and len(samples) == 2


def test_bad_requests_raise_value_errors(engine):
    with pytest.raises(InvalidRequest, match="empty"):
        engine.generate("", {})
    with pytest.raises(ValueError):
        engine.generate("x", {"temperature": "hot"})
    with pytest.raises(ValueError):
        engine.generate(["a", "b"], [{}])
