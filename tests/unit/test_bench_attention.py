"""The attention benchmarks' own arithmetic, on the CPU (Triton's interpreter): bench.extend_attention
lays a batch out in a scattered pool and computes the float32 reference every variant is judged
by, and counts the multiply-adds its TFLOP/s divide; bench.mixed_attention's two ways of running
a mixed step agree."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_extend_bench_reference_and_flop_count():
    from meshserve.bench.extend_attention import Case, float32_reference, make_inputs, triton_call
    from meshserve.layers.attention.triton_extend import NARROW_TILES

    case = Case("tiny", [0, 5], [3, 2])
    # Visible keys: 1 + 2 + 3 for the fresh prompt, 6 + 7 for the two tokens over 5 cached ones.
    assert case.visible_keys == 19
    torch.manual_seed(0)
    x = make_inputs(case, 4, 2, 16, torch.float32, DEVICE)
    assert [int(n) for n in x.seq_lens] == [3, 7] and x.max_extend == 3
    table_slots = torch.cat([x.table[0, :3], x.table[1, :7]])
    assert len(set(table_slots.tolist())) == 10 and 0 not in table_slots.tolist()  # distinct, slot 0 reserved
    exact = float32_reference(case, x)
    # The last token of the cached-prefix sequence sees all 7 keys: its output is SDPA over them.
    q, k, v = x.q[4], x.k[x.table[1, :7]], x.v[x.table[1, :7]]
    weights = torch.softmax(torch.einsum("hd,thd->ht", q, k.repeat_interleave(2, dim=1)) / 4.0, dim=-1)
    expected = torch.einsum("ht,thd->hd", weights, v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(exact[4], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(triton_call(x, NARROW_TILES)(), exact, rtol=1e-4, atol=1e-5)


def test_mixed_bench_ways_agree():
    from meshserve.bench.mixed_attention import mixed_step

    torch.manual_seed(0)
    calls = mixed_step(decodes=3, ctx=20, chunk=9, prefix=4, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32,
                       device=DEVICE)
    torch.testing.assert_close(calls["split"](), calls["all extend"](), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(calls["decodes"](), calls["all extend"]()[9:], rtol=1e-4, atol=1e-5)


def test_decode_bench_lays_sequences_out_in_scattered_pages():
    """Every slot used once, never page 0; within a page a sequence's slots are contiguous; with
    page size 1 every token is on its own."""
    from meshserve.bench.decode_attention import scattered_pages

    torch.manual_seed(0)
    for page_size in (1, 16):
        table = scattered_pages(5, 37, page_size, torch.device("cpu"))
        assert table.shape == (5, 37)
        assert table.unique().numel() == table.numel() and int(table.min()) >= page_size
        starts = table[:, ::page_size]
        assert (starts % page_size == 0).all()
        offsets = torch.arange(37) % page_size
        assert torch.equal(table - offsets, starts.repeat_interleave(page_size, dim=1)[:, :37])
