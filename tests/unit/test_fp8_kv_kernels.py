"""The FP8 KV pool's rounding inside the Triton kernels (interpreter on CPU, compiled on CUDA):
bit-equal to torch's, so a token's K/V are the same whichever path stored them; decode attention
that brings the new token in itself stores and reads what the separate store kernel would; a
PD pair whose KV dtypes or scales differ is refused with the difference named."""

from __future__ import annotations

import os

import pytest
import torch

from meshserve.cache.kv_pool import quantize_kv

triton = pytest.importorskip("triton")
needs_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                   reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn

import triton.language as tl  # noqa: E402

from meshserve.layers.kernels.rounding import to_fp8_e4m3  # noqa: E402


@triton.jit
def _convert(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, to_fp8_e4m3(tl.load(X + offs), Y.dtype.element_ty))


@needs_kernels
def test_kernel_fp8_rounding_equals_torch():
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, -0.0, 2**-10, 3 * 2**-10, 464.0, -1000.0, 2**-6 - 2**-12, 1.9708, -7.8941, 15.5] * 32)
    x = torch.cat([torch.randn(4096, generator=gen) * 8, torch.randn(2048, generator=gen) * 0.01,
                   torch.randn(1728, generator=gen) * 300, edges]).to(DEVICE)
    out = torch.empty(x.numel(), dtype=FP8, device=DEVICE)
    _convert[(1,)](x, out, x.numel())
    assert torch.equal(out.float(), x.clamp(-448, 448).to(FP8).float())


@needs_kernels
@pytest.mark.parametrize("splits", [1, 2])
def test_fused_decode_stores_and_reads_like_the_separate_path(splits):
    from meshserve.layers.attention.triton_decode import decode_attention
    from tests.decode_cases import make_decode_case

    case = make_decode_case(4, 2, 16, [5, 70, 9], torch.float32, DEVICE)
    ks, vs = 0.25, 0.125
    k8, v8 = quantize_kv(case.k_cache, ks, FP8), quantize_kv(case.v_cache, vs, FP8)
    fused_k, fused_v = k8.clone(), v8.clone()
    fused = decode_attention(case.q, case.new, fused_k, fused_v, case.table, case.rows, case.seq_lens, case.scale,
                             splits=splits, k_scale=ks, v_scale=vs)
    # The reference: the pool's own rounding of the rotated new tokens, then SDPA over dequantized K/V.
    ref_k, ref_v = k8.clone(), v8.clone()
    ref_k[case.new.slots] = quantize_kv(case._rotated(case.new.k), ks, FP8)
    ref_v[case.new.slots] = quantize_kv(case.new.v, vs, FP8)
    assert torch.equal(fused_k.float(), ref_k.float()) and torch.equal(fused_v.float(), ref_v.float())
    expected = case.reference((ref_k.float() * ks, ref_v.float() * vs))
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    separate = decode_attention(case.rotated_q(), None, ref_k, ref_v, case.table, case.rows, case.seq_lens,
                                case.scale, splits=splits, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(separate, expected, rtol=1e-4, atol=1e-5)


def test_pd_layouts_with_different_kv_storage_are_refused_by_name():
    from meshserve.cache.kv_pool import KVPool
    from meshserve.disagg.protocol import KVLayout

    def layout(dtype, scales=None) -> KVLayout:
        pool = KVPool(size=8, num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype, device=torch.device("cpu"),
                      scales=scales)
        return KVLayout(model="m", dtype=str(dtype).removeprefix("torch."), num_layers=2, kv_heads=2, head_dim=16,
                        page_size=1, tp_size=1, kv_scales=pool.scales_digest())

    plain, fp8 = layout(torch.bfloat16), layout(FP8)
    assert fp8.pairing_problems(fp8) == []
    assert plain.pairing_problems(fp8) == ["dtype: prefill has bfloat16, decode has float8_e4m3fn",
                                           f"kv_scales: prefill has none, decode has {fp8.kv_scales}"]
    rescaled = layout(FP8, [(1.0, 1.0), (0.5, 1.0)])
    assert fp8.pairing_problems(rescaled) == [f"kv_scales: prefill has {fp8.kv_scales}, decode has {rescaled.kv_scales}"]


@needs_kernels
@pytest.mark.parametrize("splits", [1, 2])
def test_an_fp8_pool_is_read_in_blocks_of_128_keys(monkeypatch, splits):
    """16-bit queries over an FP8 pool take 128 keys per block (keys_per_block). The interpreter
    computes this kernel only in float32, so the block is forced here: lengths at, across and
    short of its edges equal attention over the dequantized pool."""
    from meshserve.layers.attention import triton_decode
    from tests.decode_cases import make_decode_case

    assert triton_decode.keys_per_block(2, 128, fp8_pool=True) == triton_decode.FP8_BLOCK_N == 128
    assert triton_decode.keys_per_block(2, 128, fp8_pool=False) == triton_decode.BLOCK_N == 64
    assert triton_decode.keys_per_block(4, 128, fp8_pool=True) == 64  # float32 tiles would double
    monkeypatch.setattr(triton_decode, "keys_per_block", lambda *args: triton_decode.FP8_BLOCK_N)
    case = make_decode_case(4, 2, 32, [1, 127, 128, 129, 300], torch.float32, DEVICE)
    ks, vs = 0.37, 1.9
    k8, v8 = quantize_kv(case.k_cache, ks, FP8), quantize_kv(case.v_cache, vs, FP8)
    got = triton_decode.decode_attention(case.rotated_q(), None, k8, v8, case.table, case.rows, case.seq_lens,
                                         case.scale, splits=splits, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, case.reference((k8.float() * ks, v8.float() * vs)), rtol=1e-4, atol=1e-5)
