"""The MoE router and experts against transformers' own modules on the same weights: every
routing variant (softmax top-k with and without renormalising, DeepSeek-V2's group-limited
greedy, DeepSeek-V3's sigmoid with correction bias and grouped top-k) picks the same experts with
the same weights, and the experts compute the same sum."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, Qwen2MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from meshserve.layers.moe.experts import FusedExperts, expert_checkpoint_target, unused_expert_tensor
from meshserve.layers.moe.router import Routing, TopKRouter

HIDDEN, EXPERTS, TOKENS = 32, 16, 40


def _same_choice(hf_router, routing: Routing, bias: torch.Tensor | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf_router.weight.normal_(0, 0.5, generator=gen)
        if bias is not None:
            hf_router.e_score_correction_bias.copy_(bias)
    ours = TopKRouter(HIDDEN, routing, dtype=torch.float32)
    ours.weight.data.copy_(hf_router.weight)
    if bias is not None:
        ours.e_score_correction_bias.data.copy_(bias)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    _, hf_weights, hf_ids = hf_router(x)
    weights, ids = ours(x)
    # Same set of experts per token (the order within a token's top-k is not part of the contract).
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.float().gather(1, hf_order))


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_top_k(renormalize):
    if renormalize:
        hf = MixtralTopKRouter(MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=3))
    else:
        hf = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=3,
                                               norm_topk_prob=False))
    _same_choice(hf, Routing(num_experts=EXPERTS, top_k=3, renormalize=renormalize))


def test_deepseek_v2_group_limited_greedy():
    config = DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=3, n_group=4,
                              topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    routing = Routing(num_experts=EXPERTS, top_k=3, scaling_factor=1.5, num_groups=4, topk_groups=2,
                      group_score="max")
    _same_choice(DeepseekV2TopkRouter(config), routing)


def test_deepseek_v3_sigmoid_grouped_with_correction_bias():
    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=EXPERTS, num_experts_per_tok=3, n_group=4,
                              topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    routing = Routing(num_experts=EXPERTS, top_k=3, scoring="sigmoid", renormalize=True, scaling_factor=2.5,
                      num_groups=4, topk_groups=2, group_score="top2_sum", correction_bias=True)
    bias = torch.randn(EXPERTS, generator=torch.Generator().manual_seed(1)) * 0.3
    _same_choice(DeepseekV3TopkRouter(config), routing, bias)
    # The bias matters here: it changes the choice of some tokens.
    logits = torch.randn(TOKENS, EXPERTS, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(routing.select(logits, bias)[1].sort().values, routing.select(logits)[1].sort().values)


def test_unsupported_routing_is_refused_by_name():
    with pytest.raises(ValueError, match="scoring function 'sqrtsoftplus'"):
        Routing(num_experts=8, top_k=2, scoring="sqrtsoftplus")
    with pytest.raises(ValueError, match="not a valid grouping"):
        Routing(num_experts=8, top_k=2, num_groups=3)


def test_gate_holds_model_dtype_values_in_float32():
    """The gate is kept in float32 (no widening per step) but holds what a model-dtype parameter
    would: a float32 checkpoint tensor rounded to bfloat16, and the same logits follow."""
    from meshserve.executor.loader import _replicated_weight_loader

    router = TopKRouter(HIDDEN, Routing(num_experts=EXPERTS, top_k=2), dtype=torch.bfloat16)
    loaded = torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(1))
    getattr(router.weight, "weight_loader", _replicated_weight_loader)(router.weight, loaded)
    assert router.weight.dtype == torch.float32 and torch.equal(router.weight, loaded.bfloat16().float())
    x = torch.randn(3, HIDDEN).bfloat16()
    logits = torch.nn.functional.linear(x.float(), loaded.bfloat16().float())
    expected = Routing(num_experts=EXPERTS, top_k=2).select(logits)
    assert all(torch.equal(a, b) for a, b in zip(router(x), expected))
    with pytest.raises(ValueError, match="shape"):
        router.weight.weight_loader(router.weight, loaded[:, :-1])


def test_experts_load_per_expert_and_match_transformers():
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=24, num_local_experts=EXPERTS)
    hf = MixtralExperts(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        hf.gate_up_proj.normal_(0, 0.3, generator=gen)
        hf.down_proj.normal_(0, 0.3, generator=gen)
    ours = FusedExperts(EXPERTS, HIDDEN, 24, dtype=torch.float32)
    for e in range(EXPERTS):  # through the checkpoint names and (param, shard_id, expert_id)
        gate, up = hf.gate_up_proj[e].chunk(2, dim=0)
        for proj, tensor in (("w1", gate), ("w3", up), ("w2", hf.down_proj[e])):
            name, shard, expert = expert_checkpoint_target(f"layers.0.block_sparse_moe.experts.{e}.{proj}.weight")
            assert (name, expert) == ("layers.0.block_sparse_moe.experts." + ("w2" if proj == "w2" else "w13"), e)
            param = getattr(ours, name.rsplit(".", 1)[1])
            param.weight_loader(param, tensor, shard, expert)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:3] for _ in range(TOKENS)])
    ids[:5] = torch.tensor([0, 1, 2])  # some experts get many tokens, some none
    weights = torch.rand(TOKENS, 3, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, weights, ids), hf(x, ids, weights))
    assert expert_checkpoint_target("layers.0.mlp.shared_experts.gate_proj.weight") is None


def test_a_missing_expert_projection_is_named():
    experts = FusedExperts(4, HIDDEN, 8, dtype=torch.float32)
    for e in range(4):
        for shard, shape in (("w1", (8, HIDDEN)), ("w3", (8, HIDDEN)), ("w2", (HIDDEN, 8))):
            if (e, shard) != (2, "w3"):
                param = experts.w2 if shard == "w2" else experts.w13
                param.weight_loader(param, torch.zeros(shape), shard, e)
    with pytest.raises(ValueError, match=r"lacks projections of experts \[2\]"):
        experts.check_loaded()


@pytest.mark.parametrize("layout", ["tensor", "block"])
def test_fp8_experts_load_scales_per_expert_and_match_dequantized_transformers(layout):
    """FP8 experts from per-expert checkpoint tensors (`weight` + `weight_scale`, a scalar per
    projection or one per 8x8 block) compute transformers' experts on the dequantized weights."""
    from meshserve.config.quantization import resolve_quantization
    from meshserve.layers.fp8 import dequantize, quantize_blockwise

    block = [8, 8] if layout == "block" else None
    scheme = resolve_quantization({"quant_method": "fp8", "weight_block_size": block} if block
                                  else {"quant_method": "fp8"}, None)
    config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=24, num_local_experts=EXPERTS)
    hf = MixtralExperts(config)
    ours = FusedExperts(EXPERTS, HIDDEN, 24, dtype=torch.float32, fp8=scheme)
    gen = torch.Generator().manual_seed(4)
    real: dict[str, list[torch.Tensor]] = {"gate_up": [], "down": []}
    for e in range(EXPERTS):
        parts = []
        for proj, shape in (("gate_proj", (24, HIDDEN)), ("up_proj", (24, HIDDEN)), ("down_proj", (HIDDEN, 24))):
            w = torch.randn(shape, generator=gen) * (0.3 + e / 8)  # experts of different ranges (large outputs)
            if block:
                w8, scale = quantize_blockwise(w, (8, 8))
                parts.append(dequantize(w8, scale, (8, 8)))
            else:
                scale = w.abs().max().reshape(1) / 448.0
                w8 = (w / scale).to(torch.float8_e4m3fn)
                parts.append(w8.float() * scale)
            for tensor_name, tensor in (("weight", w8), ("weight_scale", scale)):
                name, shard, expert = expert_checkpoint_target(f"layers.0.mlp.experts.{e}.{proj}.{tensor_name}")
                param = getattr(ours, name.rsplit(".", 1)[1])
                param.weight_loader(param, tensor.to(param.dtype), shard, expert)
        real["gate_up"].append(torch.cat(parts[:2]))
        real["down"].append(parts[2])
    ours.check_loaded()
    assert ours.w13.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        hf.gate_up_proj.copy_(torch.stack(real["gate_up"]))
        hf.down_proj.copy_(torch.stack(real["down"]))
        x = torch.randn(TOKENS, HIDDEN, generator=gen)
        ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:3] for _ in range(TOKENS)])
        weights = torch.rand(TOKENS, 3, generator=gen)
        # float32 summation order differs and the outputs are large here: a relative tolerance
        torch.testing.assert_close(ours(x, weights, ids), hf(x, ids, weights), rtol=1e-4, atol=1e-5)
    name = "layers.0.mlp.experts.3.up_proj.input_scale"  # W8A16 experts do not quantize activations
    assert expert_checkpoint_target(name) is None and unused_expert_tensor(name)


def test_fp8_expert_blocks_that_do_not_cut_the_intermediate_size_are_refused_with_the_sizes():
    from meshserve.config.quantization import resolve_quantization

    scheme = resolve_quantization({"quant_method": "fp8", "weight_block_size": [16, 16]}, None)
    with pytest.raises(ValueError, match=r"blocks of 16x16 do not cut the experts' intermediate size 24 .*24 per rank"):
        FusedExperts(4, HIDDEN, 24, dtype=torch.float32, fp8=scheme)
    with pytest.raises(ValueError, match="lacks projections or their FP8 scales of experts"):
        FusedExperts(4, HIDDEN, 32, dtype=torch.float32, fp8=scheme).check_loaded()


@pytest.mark.parametrize("block", [(8, 8), None], ids=["block-8", "per-channel"])
@pytest.mark.parametrize("world", [2, 4])
def test_fp8_experts_under_expert_tensor_parallelism_hold_slices_of_the_dequantized_weights(block, world):
    """Each expert-TP rank's slots dequantize to exactly its slice of every expert's real
    weights: gate/up rows (and their block-scale rows), down columns (and block-scale columns)."""
    from meshserve.cluster.comm import RankGroup
    from meshserve.config.quantization import Fp8Scheme
    from meshserve.layers.fp8 import dequantize, quantize_blockwise, quantize_per_channel

    scheme = Fp8Scheme(method="fp8", granularity="block" if block else "channel", block=block)
    inter, gen = 32, torch.Generator().manual_seed(world)
    full = {}  # (expert, shard) -> (fp8, scale, dequantized)
    for e in range(4):
        for shard, shape in (("w1", (inter, HIDDEN)), ("w3", (inter, HIDDEN)), ("w2", (HIDDEN, inter))):
            w = torch.randn(shape, generator=gen) * torch.rand(shape[1], generator=gen) * 4  # columns differ
            w8, scale = quantize_blockwise(w, block) if block else quantize_per_channel(w)
            full[e, shard] = (w8, scale, dequantize(w8, scale, block))
    n = inter // world
    for rank in range(world):
        sentinel = object()  # loading only: no collective is called on this group
        tp = RankGroup(rank=rank, ranks=tuple(range(world)), group=sentinel,  # type: ignore[arg-type]
                       cpu_group=sentinel)
        experts = FusedExperts(4, HIDDEN, inter, dtype=torch.float32, tp=tp, fp8=scheme)
        for (e, shard), (w8, scale, _) in full.items():
            experts.weight_loader(experts.w2 if shard == "w2" else experts.w13, w8, shard, e)
            experts.weight_loader(experts.w2_scale if shard == "w2" else experts.w13_scale, scale, shard, e)
        experts.check_loaded()
        rows = slice(rank * n, (rank + 1) * n)
        for e in range(4):
            w13 = dequantize(experts.w13.data[e], experts.w13_scale.data[e], block)
            w2 = dequantize(experts.w2.data[e], experts.w2_scale.data[e], block)
            assert torch.equal(w13, torch.cat([full[e, "w1"][2][rows], full[e, "w3"][2][rows]]))
            assert torch.equal(w2, full[e, "w2"][2][:, rows])
