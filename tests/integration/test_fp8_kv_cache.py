"""--kv-cache-dtype fp8_e4m3 on the engine: greedy output equals transformers whose attention
rounds every key and value exactly as the FP8 pool stores them (fp8(clamp(x / scale)) * scale),
with per-layer scales from the checkpoint; the Triton kernels (interpreter on CPU) give the
torch_native backend's output on the FP8 pool (new tokens stored by the rotary kernel, and
inside decode attention)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.fp8_checkpoints import hf_greedy_fp8_kv, with_kv_scales
from tests.hf_reference import hf_greedy
from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

NEW_TOKENS = 12
SCALES = {0: (2.0**-6, 2.0**-7), 1: (2.0**-5, 3 * 2.0**-8)}  # exact in the checkpoint's float32


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (7, 26)]


@pytest.fixture(scope="module")
def scaled_dir(tiny_llama_dir, tmp_path_factory):
    return with_kv_scales(tiny_llama_dir, tmp_path_factory.mktemp("kv_scales") / "m", SCALES)


def _generate(scheduler, prompts) -> list[list[int]]:
    outs = run_to_completion(scheduler, {str(i): (p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)})
    return [output_ids(outs[str(i)]) for i in range(len(prompts))]


def test_fp8_kv_equals_transformers_with_rounded_kv(scaled_dir, tiny_llama_dir, prompts):
    reference = hf_greedy_fp8_kv(tiny_llama_dir, prompts, NEW_TOKENS, SCALES)
    # The scales are coarse enough that rounding changes the output: a pool that ignored them
    # (or stored unrounded values) would give transformers' plain output instead.
    assert reference != hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    scheduler = build_scheduler(scaled_dir, "--kv-cache-dtype", "fp8_e4m3", "--chunked-prefill-size", "8")
    assert scheduler.pool.k[0].dtype == torch.float8_e4m3fn and scheduler.pool.k_scale[1] == 2.0**-5
    assert _generate(scheduler, prompts) == reference


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter run; tests/gpu covers CUDA")
@pytest.mark.parametrize("fused_max_batch", [0, 64])
def test_triton_kernels_on_an_fp8_pool_match_torch_native(scaled_dir, prompts, monkeypatch, fused_max_batch):
    from meshserve.layers.attention import triton_decode
    from meshserve.layers.attention.triton import TritonBackend

    monkeypatch.setattr(triton_decode, "FUSED_NEW_TOKEN_MAX_BATCH", fused_max_batch)
    flags = ("--kv-cache-dtype", "fp8_e4m3", "--chunked-prefill-size", "8", "--attention-backend", "torch_native")
    reference = _generate(build_scheduler(scaled_dir, *flags), prompts)
    scheduler = build_scheduler(scaled_dir, *flags)
    scheduler.runner.attn_backend = TritonBackend()  # --attention-backend triton is refused on CPU
    assert _generate(scheduler, prompts) == reference
