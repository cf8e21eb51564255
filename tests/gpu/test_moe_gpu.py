"""On CUDA: the grouped-GEMM expert kernel against the PyTorch reference at a Qwen3-30B-A3B layer's
shape in bfloat16, and MoE models (Triton attention + CUDA graphs + the expert kernel; DeepSeek's
latent attention on torch_native) greedy-equal to transformers in float32. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_fused_experts_bf16_at_qwen3_30b_a3b_shape(tokens):
    from meshserve.layers.moe.experts import experts_reference
    from meshserve.layers.moe.grouped_gemm import fused_experts

    experts, top_k, hidden, inter = 128, 8, 2048, 768
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * 0.02).bfloat16()
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    expected = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_experts(x, w13, w2, weights, ids).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_models_on_cuda_match_transformers(request, arch):
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (4, 33, 90)]
    scheduler = build_scheduler(model_dir, "--cuda-graph-max-bs", "8", device="cuda")
    outs = run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(len(prompts))] == hf_greedy(model_dir, prompts, 24)
