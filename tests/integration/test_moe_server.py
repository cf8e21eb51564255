"""A real server process on the tiny DeepSeek-V3 (latent attention, grouped sigmoid routing with
the correction bias, dense first layer), over HTTP with the official openai client: its greedy
completions are transformers' greedy continuations of the same prompts."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from tests.hf_reference import hf_greedy

NEW_TOKENS = 12


def test_deepseek_v3_server_matches_transformers(start_server, tiny_deepseek_v3_dir):
    rng = random.Random(13)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (6, 31)]
    server = start_server("--model-path", str(tiny_deepseek_v3_dir))
    client = server.openai()
    model = client.models.list().data[0].id
    # Concurrent in the server (one request each, batched by the scheduler as they arrive).
    texts = [client.completions.create(model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_deepseek_v3_dir))
    expected = [tokenizer.decode(ids) for ids in hf_greedy(tiny_deepseek_v3_dir, prompts, NEW_TOKENS)]
    assert texts == expected
