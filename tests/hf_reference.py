"""Reference outputs from plain Hugging Face transformers (the correctness oracle, DESIGN.md §4).

``hf_greedy`` is what engine outputs are compared against token for token: float32 on CPU,
greedy, one prompt at a time (no padding, so no padding-dependent numerics), and no stopping at
EOS -- exactly ``max_new_tokens`` tokens come back, matching an engine request with
``ignore_eos=True`` and ``max_tokens=max_new_tokens``. EOS is *not* suppressed (``min_new_tokens``
would mask it and change the argmax); it is simply not a stop condition.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


@functools.lru_cache(maxsize=4)
def _load(model_dir: str) -> PreTrainedModel:
    # Cached per resolved path for the life of the test process; models are never mutated after
    # this function returns, so sharing them between tests is safe.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    config = copy.deepcopy(model.generation_config)
    # generate() falls back to the model's generation_config for every field it is not given,
    # so EOS stopping is switched off here, not per call.
    config.eos_token_id = None
    config.do_sample = False
    config.num_beams = 1
    # Sampling knobs some checkpoints ship; irrelevant for greedy, unset them to avoid warnings.
    config.temperature = None
    config.top_p = None
    config.top_k = None
    model.generation_config = config
    return model


def load_hf_model(model_dir: Path | str) -> PreTrainedModel:
    """The cached float32 CPU transformers model for ``model_dir``."""
    return _load(str(Path(model_dir).resolve()))


@torch.inference_mode()
def hf_greedy(
    model_dir: Path | str, prompts_token_ids: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt; returns only the ``max_new_tokens`` new token ids."""
    model = load_hf_model(model_dir)
    # generate() wants a pad id even for one unpadded prompt; any id works, none is ever padded.
    pad_token_id = getattr(model.config, "pad_token_id", None) or 0
    outputs: list[list[int]] = []
    for prompt in prompts_token_ids:
        if not prompt:
            raise ValueError("hf_greedy needs non-empty prompts")
        input_ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
        )
        new_tokens = out[0, len(prompt) :].tolist()
        # Invariant the comparison relies on: no early stop, whatever the tokens were.
        assert len(new_tokens) == max_new_tokens, (len(new_tokens), max_new_tokens)
        outputs.append(new_tokens)
    return outputs
