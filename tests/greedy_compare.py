"""Greedy output of the engine against transformers: exactly in float32, and in bfloat16 except at
near-ties of the reference (its top two logits within NEAR_TIE of each other, relative, at the
first divergence), each one printed. Used by the GPU tests, and on the CPU by the bf16 test of
routing ties (tests/router_ties.py)."""

from __future__ import annotations

import torch

NEW_TOKENS = 32
NEAR_TIE = 0.01  # relative gap of the reference's top-2 logits that counts as a tie in bf16


def random_prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 33, 100, 257)]


def hf_greedy(model_dir, dtype, prompts, device="cuda", before_prompt=None):
    """transformers' greedy output (NEW_TOKENS per prompt, one prompt at a time) and its logits at
    each step; `before_prompt(model, i)` runs before prompt i (to hook the model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    outs, logits_at = [], []
    for i, p in enumerate(prompts):
        if before_prompt is not None:
            before_prompt(model, i)
        with torch.no_grad():
            g = model.generate(torch.tensor([p], device=device), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        outs.append(g.sequences[0, len(p):].tolist())
        logits_at.append([step[0].float() for step in g.logits])
    return outs, logits_at


def first_divergence(got: list[int], ref: list[int]) -> int:
    """The index of the first token that differs (len(ref) when none does)."""
    return next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))


def assert_matches(outputs: list[list[int]], reference: list[list[int]], ref_logits, dtype: str,
                   near_tie: float = NEAR_TIE) -> None:
    for i, (got, ref) in enumerate(zip(outputs, reference)):
        if got == ref:
            continue
        assert dtype == "bfloat16", f"float32 must match exactly: prompt {i}: {got} != {ref}"
        at = first_divergence(got, ref)
        top2 = ref_logits[i][at].topk(2).values
        gap = float((top2[0] - top2[1]) / top2[0].abs())
        print(f"prompt {i}: bf16 divergence at token {at}, reference top-2 relative gap {gap:.4f}")
        assert gap < near_tie, f"prompt {i} diverges at token {at} without a near-tie (gap {gap:.4f})"
