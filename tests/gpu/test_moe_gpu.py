"""On CUDA: the grouped-GEMM expert kernel against the PyTorch reference at a Qwen3-30B-A3B layer's
shape in bfloat16, and MoE models (Triton attention + CUDA graphs + the expert kernel, DeepSeek's
latent attention included) greedy-equal to transformers in float32, and in bfloat16 but at
named near-ties. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("tokens", [1, 64, 256, 1100])  # 1100 x top-8 pairs: above the sort kernel's size, torch sort
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


# DeepSeek-V3 is not here: in bf16 its router (groups of 2 experts, near-ties ~0.006 apart) picks
# another expert wherever two bf16 implementations round its input differently, which moves the
# tiny random model's logits by up to ~80 % -- a divergence the near-tie rule of the final logits
# cannot name (H200: prompt 0 at token 21, top-2 gap 4.7 %). Its bf16 test (next) follows the
# reference's routing and names the router ties. Mixtral is not here either: teacher-forced over
# the reference's tokens, the tiny model's bf16 routers chose another expert than transformers' in
# every prompt, each time where the reference's second and third experts' probabilities were
# 0.000-0.002 apart (H200, 2026-12-04, after a change of the prefill attention's rounding only);
# a prompt token routed elsewhere changes the KV every later token reads, beyond any logits' near-
# tie (prompt 3 at token 22, gap 13 %). Its float32 equality (above) is exact.
def test_qwen3_moe_in_bf16_matches_transformers_but_at_near_ties(tiny_qwen3_moe_dir):
    """bf16 on both sides (CUDA graphs, the expert kernel): equal to transformers except where its
    top two logits nearly tie, each named."""
    from tests.greedy_compare import NEW_TOKENS, assert_matches, hf_greedy, random_prompts
    from tests.models import VOCAB_SIZE
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    model_dir = tiny_qwen3_moe_dir
    prompts = random_prompts(VOCAB_SIZE)
    reference, ref_logits = hf_greedy(model_dir, torch.bfloat16, prompts)
    scheduler = build_scheduler(model_dir, "--dtype", "bfloat16", "--cuda-graph-max-bs", "8", device="cuda")
    outs = run_to_completion(scheduler, {str(i): (p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)})
    assert_matches([output_ids(outs[str(i)]) for i in range(len(prompts))], reference, ref_logits, "bfloat16")


def test_deepseek_v3_in_bf16_matches_transformers_but_at_named_ties(tiny_deepseek_v3_dir):
    """bf16 on both sides, Triton latent attention (prefill and decode kernels) and the routing
    kernel, eager (the routing is followed through hooks, which CUDA graph replays skip): every
    routing difference a named router near-tie, greedy output transformers' but at named logit
    near-ties (tests/router_ties.py; the CPU twin is in tests/integration/test_moe_models.py)."""
    from tests.router_ties import DEEPSEEK_V3_NEAR_TIE, assert_bf16_greedy_follows_transformers

    assert_bf16_greedy_follows_transformers(tiny_deepseek_v3_dir, "cuda", "--disable-cuda-graph",
                                            near_tie=DEEPSEEK_V3_NEAR_TIE)


@pytest.mark.parametrize("batch", [1, 64])
def test_latent_decode_attention_at_deepseek_v3_dims(batch):
    """Triton decode attention over the latent cache at DeepSeek-V3's per-rank shape under
    --tp 8 (16 heads; keys 512 + 64, values 512) in bf16, against SDPA in float32."""
    import torch.nn.functional as F

    from meshserve.layers.attention.triton_decode import decode_attention

    heads, latent, rope, length = 16, 512, 64, 1000
    gen = torch.Generator(device="cuda").manual_seed(batch)
    k = torch.randn(batch * length + 1, 1, latent + rope, device="cuda", generator=gen).bfloat16()
    v = k[..., :latent]
    table = torch.arange(1, batch * length + 1, device="cuda").view(batch, length)
    q = torch.randn(batch, heads, latent + rope, device="cuda", generator=gen).bfloat16()
    seq_lens = torch.full((batch,), length, device="cuda")
    out = decode_attention(q, None, k, v, table, torch.arange(batch, device="cuda"), seq_lens, 0.05).float()
    ref = F.scaled_dot_product_attention(q.float()[:, :, None], k[table].float().transpose(1, 2),
                                         v[table].float().transpose(1, 2), scale=0.05, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def _check_latent_extend(heads: int, latent: int, rope: int, prefix_lens: list[int], extend_lens: list[int],
                         dtype: torch.dtype, scale: float, tol: float, slots_per_row: int) -> None:
    """Triton extend attention over a latent pool (one KV head [latent | rope], values its
    leading `latent` features), causal, each sequence after its cached prefix, against SDPA in
    float32."""
    import torch.nn.functional as F

    from meshserve.layers.attention.triton_extend import extend_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1000, 1, latent + rope, generator=gen, device="cuda").to(dtype)
    v = k[..., :latent]
    table = torch.stack([torch.randperm(999, generator=gen, device="cuda")[:slots_per_row] + 1 for _ in range(2)])
    seq_lens = torch.tensor([p + n for p, n in zip(prefix_lens, extend_lens)], device="cuda")
    ext = torch.tensor(extend_lens, device="cuda")
    q = torch.randn(sum(extend_lens), heads, latent + rope, generator=gen, device="cuda").to(dtype)
    out = extend_attention(q, k, v, table, torch.arange(2, device="cuda"), seq_lens, ext, ext.cumsum(0) - ext,
                           max(extend_lens), scale).float()
    start = 0
    for b, (prefix, new) in enumerate(zip(prefix_lens, extend_lens)):
        sl = table[b, : prefix + new]
        mask = torch.arange(prefix + new, device="cuda")[None, :] <= torch.arange(prefix, prefix + new,
                                                                                  device="cuda")[:, None]
        ref = F.scaled_dot_product_attention(q[start: start + new].float().transpose(0, 1),
                                             k[sl].float().transpose(0, 1), v[sl].float().transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[start: start + new], ref, rtol=tol, atol=tol)
        start += new


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("latent", [32, 56])
def test_latent_extend_attention_at_padded_head_widths(dtype, latent):
    """Key width latent + 8 rope: a power of two (64) or not (40, padded to 64), with and without
    a cached prefix. At 40 in 16-bit types the kernel's 64/64 tiles returned values off by up to
    3.6 on the H200; the tile choice in triton_extend.py pins the fix."""
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for extend_lens, prefix_lens in (([5, 257], [0, 0]), ([300, 5], [0, 30])):
        _check_latent_extend(4, latent, 8, prefix_lens, extend_lens, dtype, 0.3, tol, slots_per_row=600)


def test_latent_extend_attention_at_deepseek_v3_dims():
    """DeepSeek-V3's per-rank shape under --tp 8 (16 heads, keys 512 + 64) in bf16. (At these
    widths the kernel's default tiles need more shared memory than the GPU has; the test pins
    the choice.)"""
    _check_latent_extend(16, 512, 64, [0, 300], [257, 100], torch.bfloat16, 0.05, 2e-2, slots_per_row=500)


def test_deepseek_v3_on_the_triton_backend_matches_transformers(tiny_deepseek_v3_dir):
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    rng = random.Random(4)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (4, 33, 90)]
    scheduler = build_scheduler(tiny_deepseek_v3_dir, "--attention-backend", "triton", "--cuda-graph-max-bs", "8",
                                device="cuda")
    outs = run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(len(prompts))] == hf_greedy(tiny_deepseek_v3_dir, prompts, 24)


EPLB = ("--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "3")


def test_eplb_with_cuda_graphs_matches_transformers(tiny_mixtral_dir):
    """One GPU, 4 experts in 6 slots, a rebalance every 3 forward steps: the copies move within
    the rank and the placement tables change in place under the captured decode graphs (overlap
    scheduling on), and greedy output stays transformers'."""
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (4, 33, 90)]
    scheduler = build_scheduler(tiny_mixtral_dir, "--cuda-graph-max-bs", "8", *EPLB, device="cuda")
    assert scheduler.runner.graphs is not None
    outs = run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(len(prompts))] == hf_greedy(tiny_mixtral_dir, prompts, 24)
    scheduler.step()  # idle: gathers the last forwards' counts
    torch.cuda.synchronize()  # the host copy of the totals has landed
    load = scheduler.runner.expert_load()
    assert load.rebalances >= 5 and load.moved_experts > 0
    # 2 MoE layers × top-2 per forwarded token; a graph padded to a larger batch counts its padding
    tokens = sum(map(len, prompts)) + len(prompts) * 23
    assert sum(load.expert_tokens) == sum(load.rank_tokens) >= 4 * tokens


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dispatch", ["none", "deepep"])
def test_eplb_over_two_gpus_matches_transformers(tiny_qwen3_moe_dir, tmp_path, dispatch):
    """--tp 2 --ep 2 on two GPUs over NCCL (CUDA graphs with the all-reduce dispatcher): loads
    all-gathered, expert weights moved by all_to_all_single, greedy output transformers'."""
    from tests.hf_reference import hf_greedy
    from tests.tp_worker import tp_generate

    rng = random.Random(6)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 40)]
    flags = ("--ep", "2", "--moe-a2a-backend", dispatch, "--cuda-graph-max-bs", "8", *EPLB)
    assert tp_generate(tiny_qwen3_moe_dir, 2, prompts, 16, tmp_path, flags, device_type="cuda") \
        == hf_greedy(tiny_qwen3_moe_dir, prompts, 16)


@pytest.mark.parametrize("tokens", [1, 64, 256])
@pytest.mark.parametrize("block", [(128, 128), None], ids=["block-128", "per-channel"])
def test_fp8_fused_experts_at_qwen3_30b_a3b_fp8_shape(tokens, block):
    """The W8A16 expert kernel (FP8 weights, bf16 activations) at Qwen3-30B-A3B-FP8's layer shape
    against the reference on the dequantized experts in float32."""
    from meshserve.layers.fp8 import fp8_supported, quantize_blockwise, quantize_per_channel
    from meshserve.layers.moe.experts import ExpertScales, experts_reference
    from meshserve.layers.moe.grouped_gemm import fused_experts

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("FP8 experts need compute capability >= 8.9")
    experts, top_k, hidden, inter = 128, 8, 2048, 768
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    quantized = []
    for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
        w = torch.randn(*shape, device="cuda", generator=gen) * 0.02
        if block is None:
            quantized.append(quantize_per_channel(w))
        else:
            parts = [quantize_blockwise(w[e], block) for e in range(experts)]
            quantized.append((torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])))
    (w13, s13), (w2, s2) = quantized
    scales = ExpertScales(s13, s2, block)
    weights, ids = torch.randn(tokens, experts, device="cuda", generator=gen).softmax(-1).topk(top_k, dim=-1)
    expected = experts_reference(x.float(), w13, w2, weights, ids, scales)
    got = fused_experts(x, w13, w2, weights, ids, scales).float()
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_fp8_experts_with_cuda_graphs_match_transformers(tiny_qwen3_moe_dir, tmp_path):
    """A block-FP8 Qwen3-MoE whose only FP8 layers are the routed experts (attention and the dense
    layer listed in `ignored_layers`), served in float32 on CUDA with CUDA graphs: the W8A16
    expert kernel is the only FP8 compute, so greedy output equals transformers on the
    dequantized weights (the dense FP8 paths quantize activations and are tested on their own)."""
    from tests.fp8_checkpoints import Layout, make_fp8_checkpoint
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "k", "v", "o")]
    keep = (*attention, *(f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")))
    layout = Layout("experts-only", "block", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [16, 16], "ignored_layers": list(keep)},
                    block=(16, 16), scale_name="weight_scale_inv", keep=keep)
    fp8_dir, dequant_dir = make_fp8_checkpoint(tiny_qwen3_moe_dir, tmp_path / "fp8", tmp_path / "dequant", layout)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (4, 33, 90)]
    scheduler = build_scheduler(fp8_dir, "--cuda-graph-max-bs", "8", device="cuda")
    assert scheduler.runner.graphs is not None
    outs = run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(len(prompts))] == hf_greedy(dequant_dir, prompts, 24)
