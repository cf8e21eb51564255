"""The Triton paged decode kernel equals PyTorch SDPA over the same pages, and (fused) stores the
rotated new keys and the new values exactly where the reference would; a mixed extend step
(prompts, then the decodes riding in it through the decode kernel) equals the same reference
(CUDA only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 64)])
def test_decode_kernel_matches_sdpa(fused, dtype, heads, kv_heads, head_dim):
    from tests.decode_cases import make_decode_case

    case = make_decode_case(heads, kv_heads, head_dim, [1, 64, 65, 1999], dtype, "cuda")
    before = case.k_cache.clone(), case.v_cache.clone()
    out = case.run(fused=fused)
    expected = case.expected_caches(before)
    # float32 keys may differ in the last bit (the compiler contracts x * cos + y * sin into an
    # FMA); bfloat16 keys are rounded like the reference, bit for bit.
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(case.k_cache, expected[0], **tol)
    assert torch.equal(case.v_cache, expected[1])
    ref = case.reference(expected)
    for b in range(out.shape[0]):
        err = (out[b].float() - ref[b]).norm() / ref[b].norm()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (b, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "v_head_dim", "fp8_scales"),
                         [(32, 8, 128, None, None), (32, 8, 128, None, (0.5, 2.0)), (9, 3, 64, None, None),
                          (16, 1, 576, 512, None)], ids=["llama-8b", "llama-8b-fp8-kv", "gqa-3", "mla"])
def test_mixed_step_matches_sdpa(dtype, heads, kv_heads, head_dim, v_head_dim, fp8_scales):
    """The Triton backend's extend on a mixed step (prompt rows through the extend kernel, decode
    rows through the decode kernel, the new tokens stored by the rotate-and-store kernel first)
    against float32 SDPA over the pool (dequantized when FP8), and against every row through the
    extend kernel."""
    from meshserve.layers.attention.triton import TritonBackend
    from meshserve.layers.attention.triton_extend import extend_attention
    from tests.mixed_step_case import PROMPT_ROWS, SEQUENCES, make_mixed_step

    step = make_mixed_step(heads, kv_heads, head_dim, dtype, "cuda", v_head_dim=v_head_dim, fp8_scales=fp8_scales)
    assert step.batch.decode_rows == len(SEQUENCES) - PROMPT_ROWS
    out = step.run(TritonBackend())
    ref = step.reference()
    batch, pool = step.batch, step.batch.kv_pool
    all_extend = extend_attention(step.rotated_q(), pool.k[0], pool.v[0], batch.req_to_token.table, batch.req_rows,
                                  batch.seq_lens, batch.extend_lens, batch.extend_starts, batch.host.max_extend_len,
                                  step.layer.scaling, k_scale=pool.k_scale[0], v_scale=pool.v_scale[0])
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for t in range(out.shape[0]):
        for other in (ref, all_extend.float()):
            err = (out[t].float() - other[t]).norm() / other[t].norm()
            assert err < bound, (t, float(err))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extend_kernel_16_bit_tiles_are_as_accurate_as_pytorch(dtype):
    """16-bit heads take the 128 x 128 tiles (WIDE_TILES), which no float32 test can run (they would
    need twice the shared memory). Against attention computed in float32 from the same inputs, the
    kernel's error must be that of PyTorch's own fused 16-bit attention: prompts of ragged
    lengths in one launch, and a later chunk over a cached prefix."""
    from meshserve.bench.extend_attention import Case, float32_reference, make_inputs, torch_call, triton_call
    from meshserve.layers.attention.triton_extend import WIDE_TILES, extend_tiles
    from meshserve.layers.kernels.device import max_shared_bytes

    if extend_tiles(128, dtype.itemsize, max_shared_bytes(torch.device("cuda"))) != WIDE_TILES:
        pytest.skip("this GPU has too little shared memory for the 128 x 128 tiles (it takes NARROW_TILES)")
    torch.manual_seed(0)
    for case in (Case("ragged", [0] * 5, [1, 127, 129, 300, 1000]), Case("chunk", [700], [513])):
        x = make_inputs(case, 32, 8, 128, dtype, torch.device("cuda"))
        exact = float32_reference(case, x)
        err = (triton_call(x, WIDE_TILES)().float() - exact).abs()
        if not any(case.prefix_lens):
            torch_err = (torch_call(case, x, torch.nn.attention.SDPBackend.FLASH_ATTENTION)().float() - exact).abs()
            assert err.mean() <= 1.1 * torch_err.mean(), (case.name, err.mean().item(), torch_err.mean().item())
            assert err.max() <= 2 * torch_err.max(), (case.name, err.max().item(), torch_err.max().item())
        # Independent of PyTorch: a 16-bit output's rounding (2**-8 relative for bf16) of values of
        # magnitude ~0.1 to 1 bounds the mean error well below 1e-3.
        assert err.mean() < 1e-3 and err.max() < 5e-2, (case.name, err.mean().item(), err.max().item())
