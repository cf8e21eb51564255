"""Reference outputs from plain Hugging Face transformers (the correctness oracle, DESIGN.md §4).

``hf_greedy`` is what engine outputs are compared against token for token: float32 on CPU,
greedy, one prompt at a time (no padding, so no padding-dependent numerics), and no stopping at
EOS -- exactly ``max_new_tokens`` tokens come back, matching an engine request with
``ignore_eos=True`` and ``max_tokens=max_new_tokens``. EOS is *not* suppressed (``min_new_tokens``
would mask it and change the argmax); it is simply not a stop condition.

``default_model_reference`` is the oracle for the embedded default model: transformers loading the
GGUF file itself with its own GGUF loader, not meshserve's converted directory, so a conversion
bug (q/k rows left in llama.cpp's order, a wrong tensor) cannot hide in both sides.
"""

from __future__ import annotations

import copy
import functools
import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


@functools.lru_cache(maxsize=4)
def _load(model_dir: str) -> PreTrainedModel:
    # Cached per resolved path for the life of the test process; models are never mutated after
    # this function returns, so sharing them between tests is safe.
    return _for_reference(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))


def _for_reference(model: PreTrainedModel) -> PreTrainedModel:
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


def hf_greedy(
    model_dir: Path | str, prompts_token_ids: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each prompt; returns only the ``max_new_tokens`` new token ids."""
    return greedy_generate(load_hf_model(model_dir), prompts_token_ids, max_new_tokens)


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel, prompts_token_ids: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """hf_greedy on a loaded model. The attention mask is explicit: generate() would otherwise
    infer one that hides every pad token of the prompt, and SmolLM2's pad token is <|im_end|>,
    which every chat prompt contains."""
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


# Chat prompts the default model's reference answers (one GGUF load per test session serves all).
DEFAULT_MODEL_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
)
DEFAULT_MODEL_NEW_TOKENS = 32


@dataclass(frozen=True)
class DefaultModelReference:
    tensor_sha256: dict[str, str]  # parameter name -> sha256 of its float32 bytes, as transformers loads the GGUF
    config: dict  # transformers' config from the GGUF (to_dict())
    chat_prompt_ids: list[list[int]]  # DEFAULT_MODEL_CHAT_PROMPTS through the chat template
    chat_outputs: list[list[int]]  # greedy, DEFAULT_MODEL_NEW_TOKENS each, no EOS stop


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def default_chat_prompt_ids(tokenizer_dir: Path | str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for p in DEFAULT_MODEL_CHAT_PROMPTS]


@functools.lru_cache(maxsize=1)
def default_model_reference() -> DefaultModelReference:
    """Loads the default model's GGUF with transformers' own loader (float32) once per test
    process, records what the tests compare against, and frees the model (~0.6 GB) at once.
    Costs ~15-20 s on the 2-core CI machine (transformers parses the GGUF's metadata slowly)."""
    from meshserve.config.default_model import default_gguf_path, default_model_path

    gguf = default_gguf_path()
    model = _for_reference(AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                dtype=torch.float32))
    try:
        # The prompts go through the converted tokenizer, whose template and ids
        # test_default_model.py pins down separately.
        prompts = default_chat_prompt_ids(default_model_path())
        return DefaultModelReference(
            tensor_sha256={name: tensor_sha256(t) for name, t in model.state_dict().items()},
            config=model.config.to_dict(),
            chat_prompt_ids=prompts,
            chat_outputs=greedy_generate(model, prompts, DEFAULT_MODEL_NEW_TOKENS),
        )
    finally:
        del model
        gc.collect()
