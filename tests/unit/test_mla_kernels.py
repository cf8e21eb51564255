"""The paged Triton attention kernels on the latent (MLA) KV layout — one KV head of
[c_kv | k_rope], values its leading features (a view with K's strides) — against SDPA, in
Triton's interpreter on the CPU (compiled on the GPU machine, where these tests run too); and
the tiny DeepSeek-V3 on the Triton backend equal to transformers."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, LATENT, ROPE = 4, 32, 8


def _latent_pool(slots: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(slots, 1, LATENT + ROPE, generator=gen).to(DEVICE)
    return k, k[..., :LATENT]


def _reference(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                          scale=0.3, enable_gqa=True).transpose(0, 1)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_reads_the_latent_layout(splits):
    from meshserve.layers.attention.triton_decode import decode_attention

    gen = torch.Generator().manual_seed(splits)
    k, v = _latent_pool(400, gen)
    lens = [1, 64, 65, 130]
    table = torch.stack([torch.randperm(399, generator=gen)[:200] + 1 for _ in lens]).to(DEVICE)
    rows = torch.arange(len(lens), device=DEVICE)
    q = torch.randn(len(lens), HEADS, LATENT + ROPE, generator=gen).to(DEVICE)
    out = decode_attention(q, None, k, v, table, rows, torch.tensor(lens, device=DEVICE), 0.3, splits=splits)
    assert out.shape == (len(lens), HEADS, LATENT)
    for b, n in enumerate(lens):
        sl = table[b, :n]
        torch.testing.assert_close(out[b : b + 1], _reference(q[b : b + 1], k[sl], v[sl]), rtol=1e-4, atol=1e-5)


def test_extend_attention_reads_the_latent_layout():
    from meshserve.layers.attention.triton_extend import extend_attention

    gen = torch.Generator().manual_seed(0)
    k, v = _latent_pool(400, gen)
    table = torch.stack([torch.randperm(399, generator=gen)[:200] + 1 for _ in range(2)]).to(DEVICE)
    prefix_lens, extend_lens = [0, 70], [5, 66]
    seq_lens = torch.tensor([p + n for p, n in zip(prefix_lens, extend_lens)], device=DEVICE)
    ext = torch.tensor(extend_lens, device=DEVICE)
    q = torch.randn(sum(extend_lens), HEADS, LATENT + ROPE, generator=gen).to(DEVICE)
    out = extend_attention(q, k, v, table, torch.arange(2, device=DEVICE), seq_lens, ext, ext.cumsum(0) - ext,
                           max(extend_lens), 0.3)
    start = 0
    for b, (prefix, new) in enumerate(zip(prefix_lens, extend_lens)):
        sl = table[b, : prefix + new]
        mask = torch.arange(prefix + new, device=DEVICE)[None, :] <= torch.arange(prefix, prefix + new,
                                                                                   device=DEVICE)[:, None]
        torch.testing.assert_close(out[start : start + new], _reference(q[start : start + new], k[sl], v[sl], mask),
                                   rtol=1e-4, atol=1e-5)
        start += new


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, tests/gpu/test_moe_gpu.py covers it")
def test_deepseek_v3_on_the_triton_backend_matches_transformers(tiny_deepseek_v3_dir):
    from meshserve.layers.attention.triton import TritonBackend
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    prompts = [list(range(5, 12)), list(range(300, 340))]
    scheduler = build_scheduler(tiny_deepseek_v3_dir, "--chunked-prefill-size", "16")
    scheduler.runner.attn_backend = TritonBackend()  # --attention-backend triton is refused on CPU
    outs = run_to_completion(scheduler, {str(i): (p, greedy(6)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(2)] == hf_greedy(tiny_deepseek_v3_dir, prompts, 6)
