"""The Triton paged decode kernel equals PyTorch SDPA over the same pages, and (fused) stores the
rotated new keys and the new values exactly where the reference would (CUDA only)."""

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
