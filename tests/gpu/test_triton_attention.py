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
