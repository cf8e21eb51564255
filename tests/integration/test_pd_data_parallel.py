"""Prefill-decode disaggregation with DP attention on both halves (seed 002's worker lines keep
--dp-size N --enable-dp-attention), scaled down to the tiny DeepSeek-V3 (MLA latent KV) over
NIXL: a prefill --tp 2 --dp-size 2 --enable-dp-attention over two nodes (--nnodes 2: DP group 1
runs on node 1, its leader reached through the scheduler link) and a decode --tp 2 --dp-size 2
--enable-dp-attention on one. The prefill places room r in its DP group r % 2; each decode rank
finds that group's ranks at the bootstrap server. Concurrent greedy requests equal
transformers', both prefill groups served, and both servers end idle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.cluster_nodes import base_port, cluster_args
from tests.hf_reference import hf_greedy
from tests.pd_cluster import load, send_pd, start_decode, start_prefill, wait_idle

NEW_TOKENS = 6
DP_ATTENTION = ("--dp-size", "2", "--enable-dp-attention", "--enable-dp-lm-head", "--page-size", "4")


def test_dp_attention_on_both_halves_equals_transformers(tmp_path, tiny_deepseek_v3_dir):
    prompts = [[(11 * i + 17 * j) % 49000 + 3 for j in range(3 + 7 * i)] for i in range(6)]
    reference = hf_greedy(tiny_deepseek_v3_dir, prompts, NEW_TOKENS)
    prefill_cluster = cluster_args(tiny_deepseek_v3_dir, base_port(), tp=2)
    prefill = start_prefill(tmp_path, *prefill_cluster, *DP_ATTENTION, "--node-rank", "0")
    prefill_node1 = start_prefill(tmp_path, *prefill_cluster, *DP_ATTENTION, "--node-rank", "1",
                                  bootstrap_port=prefill.bootstrap_port)
    decode = start_decode(tmp_path, "--model-path", str(tiny_deepseek_v3_dir), "--tp", "2", *DP_ATTENTION)
    started = [prefill.server, prefill_node1.server, decode]
    try:
        for server in started:
            server.wait_ready()
        bodies = [{"input_ids": p, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                       "ignore_eos": True}} for p in prompts]
        with ThreadPoolExecutor(len(bodies)) as pool:
            # Rooms 0..5: the prefill's DP groups 0 and 1 take turns.
            answers = list(pool.map(lambda i: send_pd(prefill, decode, "/generate", bodies[i], room=i),
                                    range(len(bodies))))
        assert [(p.status, d.status) for p, d in answers] == [(200, 200)] * len(bodies), answers
        assert [d.body["output_ids"] for _, d in answers] == reference
        wait_idle(prefill.server, decode)
        prefilled = [g["prompt_tokens"] for g in load(prefill.server)["dp_groups"]]
        # Group 1 prefilled exactly the odd rooms' prompts; group 0 the even ones and the
        # server's warm-up request (no room: dealt by round robin, to group 0 first).
        assert prefilled[1] == sum(map(len, prompts[1::2])), prefilled
        assert prefilled[0] > sum(map(len, prompts[0::2])), prefilled
        assert "prefill tp rank 0 of DP group 1 registered" in prefill.server.log()
    finally:
        for server in started:
            server.stop()
