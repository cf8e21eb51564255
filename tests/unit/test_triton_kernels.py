"""The Triton kernels against their PyTorch references, in Triton's interpreter on the CPU (the
same kernels run compiled on the GPU machine, where these tests run too)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rmsnorm_ref(x, w, eps, residual=None):
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype), x


def _rotary_ref(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("hidden", [64, 96])
def test_rmsnorm_matches_reference(hidden):
    from meshserve.layers.kernels.rmsnorm import rmsnorm

    gen = torch.Generator().manual_seed(hidden)
    x, r = torch.randn(5, hidden, generator=gen), torch.randn(5, hidden, generator=gen)
    w = torch.randn(hidden, generator=gen)
    x, r, w = x.to(DEVICE), r.to(DEVICE), w.to(DEVICE)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), _rmsnorm_ref(x, w, 1e-6)[0], rtol=1e-5, atol=1e-5)
    out, summed = rmsnorm(x, w, 1e-6, r)
    ref_out, ref_summed = _rmsnorm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(summed, ref_summed)
    # Per-head norms (Qwen3) arrive as [T, H, D] views with a row stride.
    qkv = torch.randn(3, 4 * hidden, generator=gen).to(DEVICE)
    heads = qkv[:, : 2 * hidden].view(3, 2, hidden)
    torch.testing.assert_close(rmsnorm(heads, w, 1e-6), _rmsnorm_ref(heads, w, 1e-6)[0], rtol=1e-5, atol=1e-5)


def test_silu_and_mul_matches_reference():
    from meshserve.layers.kernels.activation import silu_and_mul

    gate_up = torch.randn(7, 2 * 1500, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def _rotate_and_store(q, k, v, cos, sin, positions, cache_slots=40):
    """Run the fused kernel into fresh zeroed caches; returns (k_cache, v_cache, slots)."""
    from meshserve.layers.kernels.rotary import rotate_and_store_

    k_cache = torch.zeros(cache_slots, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(cache_slots, generator=torch.Generator().manual_seed(5))[: q.shape[0]].to(q.device)
    rotate_and_store_(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    return k_cache, v_cache, slots


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (6, 6, 32)])
def test_rotate_and_store_matches_reference(heads, kv_heads, head_dim):
    """q and k rotated in place; rotated k and untouched v land in their slots and nowhere else."""
    gen = torch.Generator().manual_seed(heads)
    tokens, max_pos = 9, 50
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)

    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q_ref, k_ref = _rotary_ref(q, c, s), _rotary_ref(k, c, s)
    v_before = v.clone()
    k_cache, v_cache, slots = _rotate_and_store(q, k, v, cos, sin, positions)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v_before)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    expected_k[slots], expected_v[slots] = k, v
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (3, 3, 32)])
def test_decode_attention_matches_sdpa(fused, splits, heads, kv_heads, head_dim):
    """One block, exact blocks, a ragged tail, long. Fused, the kernel rotates each new query and
    key, stores the key and value in their slots (and nowhere else) and attends to them."""
    from tests.decode_cases import make_decode_case

    case = make_decode_case(heads, kv_heads, head_dim, [1, 64, 65, 517], torch.float32, DEVICE, seed=splits + heads)
    before = case.k_cache.clone(), case.v_cache.clone()
    out = case.run(splits=splits, fused=fused)
    expected = case.expected_caches(before)
    torch.testing.assert_close(case.k_cache, expected[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(case.v_cache, expected[1])
    torch.testing.assert_close(out, case.reference(expected), rtol=1e-4, atol=1e-5)


def _check_extend_attention(heads: int, kv_heads: int, head_dim: int, prefix_lens: list[int], extend_lens: list[int],
                            tiles=None, fp8_scales: tuple[float, float] | None = None) -> None:
    """The extend kernel over every sequence at once equals SDPA per sequence, K/V gathered from
    scattered slots (sequence b takes table row b + 1: rows and batch order differ). With
    fp8_scales the pool holds FP8 K/V stored with those scales, and SDPA reads stored * scale."""
    from meshserve.cache.kv_pool import quantize_kv
    from meshserve.layers.attention.triton_extend import extend_attention

    gen = torch.Generator().manual_seed(heads + sum(extend_lens))
    width = max(p + n for p, n in zip(prefix_lens, extend_lens))
    slots = width * len(extend_lens) + 1
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(DEVICE)
    k_scale, v_scale = fp8_scales or (1.0, 1.0)
    pool_k, pool_v = k, v
    if fp8_scales:
        pool_k, pool_v = quantize_kv(k, k_scale, torch.float8_e4m3fn), quantize_kv(v, v_scale, torch.float8_e4m3fn)
        k, v = pool_k.float() * k_scale, pool_v.float() * v_scale
    table = torch.stack([torch.randperm(slots - 1, generator=gen)[:width] + 1 for _ in range(len(extend_lens) + 1)])
    table = table.to(DEVICE)
    rows = torch.arange(1, len(extend_lens) + 1, device=DEVICE)
    seq_lens = torch.tensor([p + n for p, n in zip(prefix_lens, extend_lens)], device=DEVICE)
    q = torch.randn(sum(extend_lens), heads, head_dim, generator=gen).to(DEVICE)
    ext = torch.tensor(extend_lens, device=DEVICE)
    out = extend_attention(q, pool_k, pool_v, table, rows, seq_lens, ext, ext.cumsum(0) - ext, max(extend_lens),
                           head_dim**-0.5, k_scale=k_scale, v_scale=v_scale, tiles=tiles)
    start = 0
    for b, (prefix, new) in enumerate(zip(prefix_lens, extend_lens)):
        sl = table[rows[b], : prefix + new]
        mask = torch.arange(prefix + new, device=DEVICE)[None, :] <= torch.arange(prefix, prefix + new, device=DEVICE)[:, None]
        ref = F.scaled_dot_product_attention(q[start : start + new].transpose(0, 1), k[sl].transpose(0, 1),
                                             v[sl].transpose(0, 1), attn_mask=mask, scale=head_dim**-0.5,
                                             enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[start : start + new], ref, rtol=1e-4, atol=1e-5)
        start += new


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 64), (3, 3, 32)])
def test_extend_attention_matches_sdpa(heads, kv_heads, head_dim):
    """Prefixes of 0, 3 and 70 cached tokens with 1, 130 and 64 new ones, in one launch."""
    _check_extend_attention(heads, kv_heads, head_dim, [0, 3, 70], [1, 130, 64])


@pytest.mark.parametrize("tiles", ["wide", "narrow"])
def test_extend_attention_at_the_diagonal(tiles):
    """Where the unmasked key blocks end and the diagonal's begin: prefixes on and off key-block
    boundaries (63, 64, 127), query blocks ending exactly at, just past and before a block, with
    the 128-row tiles 16-bit heads take (WIDE_TILES) and the 64-row ones of float32."""
    from meshserve.layers.attention.triton_extend import NARROW_TILES, WIDE_TILES

    _check_extend_attention(4, 2, 32, [0, 63, 64, 127, 5, 0], [128, 129, 65, 2, 257, 1],
                            tiles=WIDE_TILES if tiles == "wide" else NARROW_TILES)


def test_extend_tiles_fit_the_device_shared_memory():
    """16-bit 128-wide heads take the 128 x 128 tiles (224 KiB) where they fit (H100/H200: 227 KiB),
    the 64 x 64 ones on an A100 (163 KiB); float32 and 256-wide heads always the 64 x 64 ones."""
    from meshserve.layers.attention.triton_extend import (NARROW_TILES, PADDED_TILES, WIDE_TILES, extend_tiles,
                                                           shared_bytes)

    h100, a100 = 232_448, 166_912  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    assert shared_bytes(WIDE_TILES, 128, 2) == 224 * 1024
    assert extend_tiles(128, 2, h100) == extend_tiles(128, 2) == WIDE_TILES
    assert extend_tiles(128, 2, a100) == NARROW_TILES and shared_bytes(NARROW_TILES, 128, 2) <= a100
    assert extend_tiles(128, 4, h100) == extend_tiles(256, 2, h100) == NARROW_TILES
    assert extend_tiles(40, 2, h100) == PADDED_TILES


def test_extend_attention_reads_an_fp8_pool_with_its_scales():
    """An FP8 pool is read as stored, the scales folded into the scores and the output: equal to
    SDPA over stored * scale, with scales that are not powers of two."""
    _check_extend_attention(4, 2, 32, [0, 70], [65, 30], fp8_scales=(0.37, 1.9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, tests/gpu/test_cuda_matches_hf covers the Triton "
                    "backend against transformers (and the GPU machines lack the default model's tokenizer)")
@pytest.mark.parametrize(("fused_max_batch", "mixed"), [(0, True), (64, False)], ids=["separate-mixed", "fused"])
def test_engine_with_triton_backend_matches_torch_native(tiny_llama_dir, monkeypatch, fused_max_batch, mixed):
    """The whole engine on the Triton backend (in the interpreter on CPU machines): concurrent
    prompts of uneven lengths, chunked prefill (extend over a cached prefix) and decode give the
    same greedy tokens as the torch_native reference backend and as transformers — with decode
    steps bringing the new tokens in through the separate kernel (0) or inside decode attention
    (64); with the running sequences' decodes riding in the prefill steps (--enable-mixed-chunk,
    their rows through the decode kernel) or waiting for decode steps of their own."""
    from meshserve.layers.attention import triton_decode
    from meshserve.layers.attention.triton import TritonBackend
    from tests.hf_reference import hf_greedy

    monkeypatch.setattr(triton_decode, "FUSED_NEW_TOKEN_MAX_BATCH", fused_max_batch)
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    prompts = [list(range(3 + 7 * i, 8 + 18 * i)) for i in range(4)]  # 5, 16, 27 and 38 tokens
    requests = {f"r{i}": (p, greedy(12)) for i, p in enumerate(prompts)}
    device = ["--device", DEVICE, "--dtype", "float32"]
    reference = run_to_completion(build_scheduler(tiny_llama_dir, *device, "--attention-backend", "torch_native",
                                                  device=DEVICE), requests)
    scheduler = build_scheduler(tiny_llama_dir, *device, "--chunked-prefill-size", "8", "--disable-cuda-graph",
                                "--attention-backend", "torch_native", device=DEVICE)
    scheduler.runner.attn_backend = TritonBackend()  # --attention-backend triton is refused on CPU
    scheduler.mixed_chunk = mixed  # always on for the CPU, where --enable-mixed-chunk cannot turn it off
    forward, extend_lens = scheduler.runner.forward, []
    scheduler.runner.forward = lambda step: extend_lens.append(step.extend_lens) or forward(step)
    got = run_to_completion(scheduler, requests)
    assert {r: output_ids(o) for r, o in got.items()} == {r: output_ids(o) for r, o in reference.items()}
    assert [output_ids(got[f"r{i}"]) for i in range(4)] == hf_greedy(tiny_llama_dir, prompts, 12)
    # Prefill steps that carried decodes after their prompt rows: with mixed chunks only.
    carried = [lens for lens in extend_lens if lens[0] > 1 and lens[-1] == 1]
    assert bool(carried) == mixed


def test_bfloat16_kernels_round_like_reference():
    """bfloat16: each kernel rounds where the eager reference rounds (see kernels/rounding.py), so
    outputs are identical but for float32 reduction order or exp/rsqrt implementations moving a
    rare element by one unit."""
    from meshserve.layers.kernels.activation import silu_and_mul
    from meshserve.layers.kernels.rmsnorm import rmsnorm

    gen = torch.Generator().manual_seed(7)
    x, r = torch.randn(6, 256, generator=gen).bfloat16(), torch.randn(6, 256, generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(256, generator=gen)).bfloat16()
    out, summed = rmsnorm(x.to(DEVICE), w.to(DEVICE), 1e-5, r.to(DEVICE))
    ref_out, ref_summed = _rmsnorm_ref(x, w, 1e-5, r)
    assert torch.equal(summed.cpu(), ref_summed)
    assert (out.cpu() == ref_out).float().mean() > 0.99

    gate_up = (3 * torch.randn(6, 512, generator=gen)).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert (silu_and_mul(gate_up.to(DEVICE)).cpu() == F.silu(gate) * up).float().mean() > 0.99

    d = 64
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([torch.arange(100).float()[:, None] * inv_freq[None, :]] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qkv = torch.randn(5, 6 * d, generator=gen).bfloat16()
    positions = torch.randint(0, 100, (5,), generator=gen)
    q, k = qkv[:, : 4 * d].view(5, 4, d), qkv[:, 4 * d : 5 * d].view(5, 1, d)

    c, s = cos[positions].bfloat16().unsqueeze(1), sin[positions].bfloat16().unsqueeze(1)
    q_ref, k_ref = _rotary_ref(q, c, s), _rotary_ref(k, c, s)
    qkv_dev = qkv.to(DEVICE)
    q_dev, k_dev = qkv_dev[:, : 4 * d].view(5, 4, d), qkv_dev[:, 4 * d : 5 * d].view(5, 1, d)
    v_dev = qkv_dev[:, 5 * d :].view(5, 1, d)
    k_cache, _, slots = _rotate_and_store(q_dev, k_dev, v_dev, cos.to(DEVICE), sin.to(DEVICE), positions.to(DEVICE))
    assert torch.equal(q_dev.cpu(), q_ref) and torch.equal(k_dev.cpu(), k_ref)
    assert torch.equal(k_cache[slots].cpu(), k_ref)

    # Decode attention's own rotation of the new key, as stored in the pool.
    from tests.decode_cases import make_decode_case

    case = make_decode_case(4, 1, d, [3, 70], torch.bfloat16, DEVICE, seed=3)
    before = case.k_cache.clone(), case.v_cache.clone()
    out = case.run()
    expected = case.expected_caches(before)
    assert torch.equal(case.k_cache, expected[0]) and torch.equal(case.v_cache, expected[1])
    if DEVICE == "cuda":  # Triton's interpreter gets bfloat16 dots wrong (1e8-sized outputs, before this kernel too)
        torch.testing.assert_close(out.float(), case.reference(expected), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "v_head_dim", "fp8_scales"),
                         [(8, 2, 64, None, None), (4, 1, 48, 32, None), (6, 3, 32, None, (0.5, 2.0))],
                         ids=["gqa", "latent", "fp8-pool"])
def test_mixed_step_decodes_take_the_decode_kernel(monkeypatch, heads, kv_heads, head_dim, v_head_dim, fp8_scales):
    """A mixed extend step on the Triton backend: the prompt rows go through one extend launch
    and the decode rows riding in the step through one decode launch; together they equal the
    float32 SDPA reference, the all-extend path (every row through the extend kernel) and the
    torch_native backend — over an FP8 pool too, read with the layer's scales."""
    from meshserve.layers.attention import triton_decode, triton_extend
    from meshserve.layers.attention.torch_native import TorchNativeBackend
    from meshserve.layers.attention.triton import TritonBackend
    from tests.mixed_step_case import PROMPT_ROWS, SEQUENCES, make_mixed_step

    step = make_mixed_step(heads, kv_heads, head_dim, torch.float32, DEVICE, v_head_dim=v_head_dim,
                           fp8_scales=fp8_scales, seed=heads)
    assert step.batch.decode_rows == len(SEQUENCES) - PROMPT_ROWS
    calls: list[tuple[str, int, list[int]]] = []  # (kernel, query rows, sequences' lengths)

    def spy(name, kernel, seq_lens_at):
        def call(*args, **kwargs):
            calls.append((name, args[0].shape[0], args[seq_lens_at].tolist()))
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setattr(triton_extend, "extend_attention", spy("extend", triton_extend.extend_attention, 5))
    monkeypatch.setattr(triton_decode, "decode_attention", spy("decode", triton_decode.decode_attention, 6))
    split = step.run(TritonBackend())
    totals = [prefix + new for prefix, new in SEQUENCES]
    prompt_tokens = sum(new for _, new in SEQUENCES[:PROMPT_ROWS])
    assert calls == [("extend", prompt_tokens, totals[:PROMPT_ROWS]),
                     ("decode", len(SEQUENCES) - PROMPT_ROWS, totals[PROMPT_ROWS:])]
    reference = step.reference()
    torch.testing.assert_close(split, reference, rtol=1e-4, atol=1e-5)

    batch, pool = step.batch, step.batch.kv_pool
    all_extend = triton_extend.extend_attention(
        step.rotated_q(), pool.k[0], pool.v[0], batch.req_to_token.table, batch.req_rows, batch.seq_lens,
        batch.extend_lens, batch.extend_starts, batch.host.max_extend_len, step.layer.scaling,
        k_scale=pool.k_scale[0], v_scale=pool.v_scale[0])
    torch.testing.assert_close(split, all_extend, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.run(TorchNativeBackend()), reference, rtol=1e-4, atol=1e-5)
