"""Prefill-decode disaggregation of the tiny DeepSeek-V3: the latent (MLA) KV cache — one buffer
per layer, one 40-wide "head" per token, in pages of 4 — crosses from a prefill server to a
decode server (NIXL), and the decode server's greedy output is transformers'."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.hf_reference import hf_greedy
from tests.pd_cluster import send_pd, start_decode, start_prefill, wait_idle


def test_latent_kv_crosses_a_pd_pair(tmp_path, tiny_deepseek_v3_dir):
    model = ("--model-path", str(tiny_deepseek_v3_dir), "--page-size", "4")
    prefill, decode = start_prefill(tmp_path, *model), start_decode(tmp_path, *model)
    try:
        prefill.server.wait_ready()
        decode.wait_ready()
        prompts = [[(11 * i + 17 * j) % 49000 + 3 for j in range(3 + 13 * i)] for i in range(4)]
        bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}
                  for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: send_pd(prefill, decode, "/generate", b), bodies))
        assert [d.body.get("output_ids") for _, d in answers] == hf_greedy(tiny_deepseek_v3_dir, prompts, 10)
        wait_idle(prefill.server, decode)
    finally:
        prefill.server.stop()
        decode.stop()
