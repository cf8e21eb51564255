"""The Triton paged decode kernel equals PyTorch SDPA over the same pages (CUDA only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (4, 4, 64)])
def test_decode_kernel_matches_sdpa(dtype, heads, kv_heads, head_dim):
    from meshserve.layers.attention.triton_decode import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    slots, rows_total, width = 5000, 8, 2048
    k = torch.randn(slots, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    table = torch.randint(1, slots, (rows_total, width), device="cuda", generator=gen)
    rows = torch.tensor([3, 0, 7, 5], device="cuda")
    lens = torch.tensor([1, 64, 65, 1999], device="cuda")
    q = torch.randn(4, heads, head_dim, device="cuda", generator=gen).to(dtype)
    out = decode_attention(q, k, v, table, rows, lens, head_dim**-0.5)
    for b in range(4):
        s = table[rows[b], : lens[b]]
        ref = F.scaled_dot_product_attention(q[b].float()[:, None], k[s].float().transpose(0, 1),
                                             v[s].float().transpose(0, 1), scale=head_dim**-0.5,
                                             enable_gqa=True)[:, 0]
        err = (out[b].float() - ref).norm() / ref.norm()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), (b, float(err))
