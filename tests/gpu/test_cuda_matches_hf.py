"""On CUDA: the engine's greedy output equals transformers on the same random weights — exactly
in float32, and in bfloat16 except at documented near-ties (the top two logits of the reference
within 1% of each other at the first divergence). Skipped without CUDA; run on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from tests.greedy_compare import NEW_TOKENS, assert_matches, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

@pytest.mark.parametrize("engine_args", [(), ("--disable-cuda-graph",), ("--attention-backend", "torch_native")],
                         ids=["triton+graphs", "triton-eager", "torch_native"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_greedy_matches_transformers(tmp_path, dtype, engine_args):
    _check_greedy_matches_transformers(tmp_path, dtype, engine_args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_fused_decode_matches_transformers(tmp_path, monkeypatch, dtype):
    """The four prompts decode as one batch of 4, past the batch size up to which decode
    attention rotates and stores the new tokens itself; raise that limit so this path, which
    batch-1 serving takes, is checked against transformers too."""
    from meshserve.layers.attention import triton_decode

    monkeypatch.setattr(triton_decode, "FUSED_NEW_TOKEN_MAX_BATCH", 8)
    _check_greedy_matches_transformers(tmp_path, dtype, ())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_prefills_replay_extend_graphs_and_match_transformers(tmp_path, monkeypatch, dtype):
    """The prompts (up to 512 tokens, at most 8 per step) are prefilled by replaying the extend
    graphs (executor/extend_graph.py), and the output still equals transformers'."""
    from meshserve.executor.extend_graph import ExtendGraphRunner

    replays: list[int] = []
    run = ExtendGraphRunner._run
    monkeypatch.setattr(ExtendGraphRunner, "_run", lambda self, bucket: replays.append(bucket) or run(self, bucket))
    _check_greedy_matches_transformers(tmp_path, dtype, ())
    assert replays, "no prefill ran in an extend graph"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_mixed_chunks_match_transformers(tmp_path, monkeypatch, dtype):
    """--enable-mixed-chunk with 64-token chunks: the 100- and 257-token prompts are prefilled over
    several steps, each carrying the running sequences' decodes, whose rows take the decode
    kernel (eager: the extend graphs would run these small steps with every row through the
    extend kernel); the output still equals transformers'."""
    from meshserve.layers.attention.triton import TritonBackend

    decode_rows: list[int] = []
    extend = TritonBackend.extend
    monkeypatch.setattr(TritonBackend, "extend", lambda self, layer, q, k, v, batch:
                        decode_rows.append(batch.decode_rows) or extend(self, layer, q, k, v, batch))
    _check_greedy_matches_transformers(tmp_path, dtype, ("--enable-mixed-chunk", "--chunked-prefill-size", "64",
                                                         "--disable-cuda-graph"))
    assert max(decode_rows) > 0, "no extend step carried decodes"


# The near-tie of these bf16 comparisons on CUDA. Measured on the H200 (2026-12-04): an extend
# kernel whose output error against float32 attention equals PyTorch's fused bf16 attention's
# (mean 8.4e-5, max 8e-3 at a 4,096-token prompt; bench.extend_attention) let the 33-token prompt
# diverge at its fourth token where the reference's top two are 1.31 % apart, and the same prompt
# diverges at its 19th token (gap 0.00 %) when only the decode path changes: bf16 rounding moves
# the top-2 gap by more than greedy_compare's 1 %, as for the MoE models (router_ties.py).
CUDA_BF16_NEAR_TIE = 0.02


def _check_greedy_matches_transformers(tmp_path, dtype: str, engine_args: tuple[str, ...]) -> None:
    from meshserve.bench.random_model import SHAPES, write_random_model
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    model_dir = write_random_model("llama-small", tmp_path / "m", dtype=dtype)
    prompts = random_prompts(SHAPES["llama-small"]["vocab_size"])
    reference, ref_logits = hf_greedy(model_dir, getattr(torch, dtype), prompts)
    scheduler = build_scheduler(model_dir, "--skip-tokenizer-init", "--max-total-tokens", "4096",
                                "--cuda-graph-max-bs", "8", *engine_args, device="cuda")
    outs = run_to_completion(scheduler, {str(i): (p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)})
    assert_matches([output_ids(outs[str(i)]) for i in range(len(prompts))], reference, ref_logits, dtype,
                   near_tie=CUDA_BF16_NEAR_TIE)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_greedy_matches_transformers(tmp_path, tp):
    """tp ranks on tp GPUs (NCCL, CUDA graphs, Triton attention), bf16: the same output as
    transformers, hence as tp = 1, except at near-ties of the reference."""
    from meshserve.bench.random_model import SHAPES, write_random_model
    from tests.tp_worker import tp_generate

    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    model_dir = write_random_model("llama-small", tmp_path / "m", dtype="bfloat16")
    prompts = random_prompts(SHAPES["llama-small"]["vocab_size"])
    reference, ref_logits = hf_greedy(model_dir, torch.bfloat16, prompts)
    got = tp_generate(model_dir, tp, prompts, NEW_TOKENS, tmp_path, ("--skip-tokenizer-init", "--max-total-tokens",
                                                                     "4096", "--cuda-graph-max-bs", "8"), "cuda")
    assert_matches(got, reference, ref_logits, "bfloat16")
