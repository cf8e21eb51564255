"""FP8 quantize/dequantize, the quantization_config parser, and how the linear layers shard FP8
weights and their scales over tensor-parallel ranks (every rank's dequantized shard is the
matching slice of the whole dequantized weight)."""

from __future__ import annotations

import pytest
import torch

from meshserve.cluster.comm import RankGroup
from meshserve.config.quantization import Fp8Scheme, QuantizationError, resolve_quantization
from meshserve.layers.fp8 import FP8, FP8_MAX, dequantize, quantize_blockwise, quantize_per_channel, quantize_per_token
from meshserve.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def _rank(rank: int, size: int) -> RankGroup:
    """A rank of a `size`-rank group for loading only: no collective is ever called on it."""
    if size == 1:
        return RankGroup()
    sentinel = object()
    return RankGroup(rank=rank, ranks=tuple(range(size)), group=sentinel, cpu_group=sentinel)  # type: ignore[arg-type]


def test_per_channel_round_trip_is_within_fp8_precision():
    w = torch.randn(48, 80) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different magnitude
    w8, scale = quantize_per_channel(w)
    assert w8.dtype == FP8 and scale.shape == (48, 1)
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))  # each row uses the range
    rel = (dequantize(w8, scale) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits, half an ulp at the top of the range


def test_blockwise_scales_each_block_including_ragged_edges():
    w = torch.randn(70, 45)
    w[:32, :16] *= 100.0  # one loud block must not coarsen its neighbours
    w8, scale = quantize_blockwise(w, (32, 16))
    assert scale.shape == (3, 3)
    err = (dequantize(w8, scale, (32, 16)) - w).abs()
    assert err[32:, 16:].max() <= 2 ** -4 * w[32:, 16:].abs().max()
    assert torch.equal(scale[0, 0], w[:32, :16].abs().max() / FP8_MAX)
    assert torch.equal(scale[2, 2], w[64:, 32:].abs().max() / FP8_MAX)  # the partial corner block


def test_per_token_activation_scale_is_capped_by_the_upper_bound():
    x = torch.tensor([[1.0, -2.0], [3000.0, 1.0]])
    x8, scale = quantize_per_token(x, ub=1200.0)
    assert torch.equal(scale[:, 0], torch.tensor([2.0, 1200.0]) / FP8_MAX)
    assert x8.float()[1, 0] == FP8_MAX  # saturates instead of overflowing


def _full_weights(out_sizes, inp, block):
    parts = [torch.randn(o, inp) for o in out_sizes]
    return [(p, *quantize_blockwise(p, block)) if block else (p, *quantize_per_channel(p)) for p in parts]


@pytest.mark.parametrize("block", [None, (16, 16)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_fp8_layers_hold_slices_of_the_dequantized_weight(block, world):
    scheme = Fp8Scheme(method="fp8", granularity="block" if block else "channel", block=block)
    hidden, inter, heads, kv_heads, head_dim = 64, 128, 4, 2, 16
    qkv = _full_weights([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], hidden, block)
    gate_up = _full_weights([inter, inter], hidden, block)
    down = _full_weights([hidden], inter, block)[0]
    for rank in range(world):
        tp = _rank(rank, world)
        layers = {
            "qkv": QKVParallelLinear(hidden, head_dim, heads, kv_heads, tp=tp, fp8=scheme),
            "gate_up": MergedColumnParallelLinear(hidden, [inter, inter], tp=tp, fp8=scheme),
            "down": RowParallelLinear(inter, hidden, tp=tp, fp8=scheme),
        }
        for shard_id, (_, w8, scale) in zip("qkv", qkv):
            for p in (layers["qkv"].weight, layers["qkv"].weight_scale):
                p.weight_loader(p, w8 if p is layers["qkv"].weight else scale, shard_id)
        for shard_id, (_, w8, scale) in enumerate(gate_up):
            for p, t in ((layers["gate_up"].weight, w8), (layers["gate_up"].weight_scale, scale)):
                p.weight_loader(p, t, shard_id)
        for p, t in ((layers["down"].weight, down[1]), (layers["down"].weight_scale, down[2])):
            p.weight_loader(p, t)
        real = {name: dequantize(layer.weight, layer.weight_scale, block) for name, layer in layers.items()}
        q_local, kv_local = heads * head_dim // world, max(1, kv_heads // world) * head_dim
        kv_head = rank * kv_heads // world if kv_heads < world else rank * (kv_heads // world)
        expected_qkv = torch.cat([
            dequantize(qkv[0][1], qkv[0][2], block)[rank * q_local:(rank + 1) * q_local],
            *(dequantize(w8, s, block)[kv_head * head_dim:kv_head * head_dim + kv_local] for _, w8, s in qkv[1:])])
        torch.testing.assert_close(real["qkv"], expected_qkv, rtol=0, atol=0)
        i_local = inter // world
        expected_gate_up = torch.cat([dequantize(w8, s, block)[rank * i_local:(rank + 1) * i_local]
                                      for _, w8, s in gate_up])
        torch.testing.assert_close(real["gate_up"], expected_gate_up, rtol=0, atol=0)
        torch.testing.assert_close(real["down"], dequantize(down[1], down[2], block)[:, rank * i_local:(rank + 1) * i_local],
                                   rtol=0, atol=0)


def test_per_tensor_scales_widen_to_their_parts_rows():
    scheme = Fp8Scheme(method="compressed-tensors", granularity="tensor", static_input_scale=True)
    layer = MergedColumnParallelLinear(8, [4, 4], fp8=scheme)
    for shard_id, (s, inp) in enumerate(((0.5, 0.1), (2.0, 0.3))):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor([s]), shard_id)
        layer.input_scale.weight_loader(layer.input_scale, torch.tensor([inp]), shard_id)
    assert torch.equal(layer.weight_scale[:, 0], torch.tensor([0.5] * 4 + [2.0] * 4))
    assert layer.input_scale.item() == pytest.approx(0.3)  # one activation scale: the largest part's


def test_a_ragged_last_block_loads_on_one_rank():
    scheme = Fp8Scheme(method="fp8", granularity="block", block=(32, 32))
    w8, scale = quantize_blockwise(torch.randn(72, 40), (32, 32))
    layer = ColumnParallelLinear(40, 72, fp8=scheme)
    layer.weight.weight_loader(layer.weight, w8)
    layer.weight_scale.weight_loader(layer.weight_scale, scale)
    assert torch.equal(dequantize(layer.weight, layer.weight_scale, (32, 32)), dequantize(w8, scale, (32, 32)))


def test_a_tp_size_that_splits_blocks_is_refused():
    scheme = Fp8Scheme(method="fp8", granularity="block", block=(128, 128))
    w8, scale = quantize_blockwise(torch.randn(64, 256), (128, 128))
    layer = RowParallelLinear(256, 64, tp=_rank(1, 4), fp8=scheme)  # input columns [64, 128): half a block
    with pytest.raises(ValueError, match=r"blocks of 128x128 do not divide this rank's input columns \[64, 128\) "
                                         r"under tensor parallelism 4"):
        layer.weight_scale.weight_loader(layer.weight_scale, scale)


def test_online_quantization_quantizes_each_rank_shard_per_row():
    w = torch.randn(32, 16)
    layer = RowParallelLinear(16, 32, tp=_rank(1, 2), fp8=Fp8Scheme(method="fp8", granularity="channel", online=True))
    layer.weight.weight_loader(layer.weight, w)
    layer.finish_loading()
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (32, 1)
    w8, scale = quantize_per_channel(w[:, 8:])
    assert torch.equal(layer.weight.float(), w8.float()) and torch.equal(layer.weight_scale, scale)


# ---- quantization_config -----------------------------------------------------------------------------


def test_fbgemm_config():
    scheme = resolve_quantization({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                   "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}, None)
    assert scheme == Fp8Scheme(method="fbgemm_fp8", granularity="channel", activation_scale_ub=1200.0,
                               skip=("lm_head", "model.layers.0.mlp.down_proj"))
    assert not scheme.applies_to(["model.layers.0.mlp.down_proj"])
    assert scheme.applies_to(["model.layers.10.mlp.down_proj"])  # "layers.1" is not a prefix of "layers.10"


def test_deepseek_block_config():
    scheme = resolve_quantization({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}, None)
    assert (scheme.granularity, scheme.block, scheme.static_input_scale) == ("block", (128, 128), False)


def test_fused_parts_must_agree_on_being_quantized():
    scheme = Fp8Scheme(method="fp8", granularity="channel", skip=("re:.*k_proj",))
    with pytest.raises(QuantizationError, match="keeps m.k_proj in high precision but not m.q_proj, m.v_proj"):
        scheme.applies_to(["m.q_proj", "m.k_proj", "m.v_proj"])


@pytest.mark.parametrize("config, requested, message", [
    ({"quant_method": "gptq", "bits": 4}, None, "quant_method 'gptq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, None, "format 'e5m2' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized"}, None, "format 'int-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "group"}}}}, None,
     "weight strategy 'group' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fbgemm_fp8",
     "--quantization fbgemm_fp8 contradicts the checkpoint's quant_method 'fp8'"),
    (None, "compressed-tensors", "the checkpoint has no quantization_config"),
])
def test_unsupported_quantization_is_refused_by_name(config, requested, message):
    with pytest.raises(QuantizationError, match=message):
        resolve_quantization(config, requested)


def test_online_fp8_and_sglang_only_methods_on_the_command_line():
    from meshserve.config.server_args import ServerArgs, ServerArgsError

    assert resolve_quantization(None, "fp8") == Fp8Scheme(method="fp8", granularity="channel", online=True)
    ServerArgs.parse_args(["--quantization", "fp8"]).validate()
    with pytest.raises(ServerArgsError, match=r"not supported yet: --quantization awq \(only fp8, fbgemm_fp8, "):
        ServerArgs.parse_args(["--quantization", "awq"]).validate()
