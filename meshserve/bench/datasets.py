"""Synthetic benchmark prompts, shared by ``bench_serving`` and ``hf_baseline``.

Both tools call :func:`generate_requests`, so the same flags and tokenizer give the same
prompts byte for byte; that is what makes their throughput numbers comparable.

Length semantics follow SGLang's ``--random-range-ratio`` (not vLLM's): every input and
output length is drawn uniformly from ``[max(1, int(L * ratio)), L]``. With the default
ratio 0.0 requests therefore average about half of the stated length; ratio 1.0 gives
exactly ``L`` for every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

DATASET_NAMES: tuple[str, ...] = ("random-ids", "random")

RANGE_RATIO_HELP = (
    "SGLang semantics: every input and output length is drawn uniformly from "
    "[max(1, int(LEN * RATIO)), LEN]. 0.0 (the default) means U[1, LEN], so requests average "
    "about half of LEN; 1.0 means exactly LEN for every request. (vLLM's 0.0 means exact "
    "lengths; this tool does not follow vLLM here.)"
)


@runtime_checkable
class TokenizerLike(Protocol):
    """What prompt generation needs from a tokenizer (a HF tokenizer satisfies it).

    A protocol rather than a transformers type so tests can use a stand-in object.
    ``all_special_ids`` is optional and read with ``getattr``.
    """

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One synthetic request.

    ``input_ids`` is what a server fed token ids processes (exactly ``prompt_len`` ids).
    ``prompt`` is the text form, for backends that only take text.
    """

    prompt: str
    input_ids: list[int]
    prompt_len: int
    output_len: int


def sample_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> np.ndarray:
    """``n`` lengths uniform in ``[max(1, int(length * range_ratio)), length]`` (inclusive)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range ratio must be in [0, 1], got {range_ratio}")
    low = max(1, int(length * range_ratio))
    # integers() excludes the high end, hence + 1: LEN itself must be reachable.
    return rng.integers(low, length + 1, size=n)


def candidate_token_ids(tokenizer: TokenizerLike) -> np.ndarray:
    """Ordinary token ids to draw prompts from.

    Special tokens (BOS/EOS, chat markers) are excluded: an EOS or an end-of-turn token in the
    middle of a prompt is not what a benchmark means to measure, and some tokenizers refuse
    to round-trip them as text.
    """
    vocab_size = int(tokenizer.vocab_size)
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if 0 <= int(i) < vocab_size}
    ids = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("tokenizer has no ordinary (non-special) token ids")
    return ids


def generate_requests(
    tokenizer: TokenizerLike,
    dataset_name: str,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[BenchRequest]:
    """Build ``num_prompts`` synthetic requests, deterministically for ``seed``.

    ``random-ids``: the prompt is exactly the sampled token ids (``prompt_len`` equals the
    sampled input length); ``prompt`` is those ids decoded, for text-only backends.

    ``random``: the sampled ids are decoded to text and the text is encoded again the way a
    server would tokenize it; ``input_ids``/``prompt_len`` are that re-encoding, i.e. the true
    input length, which can differ from the sampled one because decoding random ids and
    re-tokenizing does not round-trip.
    """
    if dataset_name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset_name!r}; choose from {DATASET_NAMES}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")

    # One generator, consumed in a fixed order (input lengths, output lengths, then the ids
    # request by request), so every consumer of the same seed sees the same stream.
    rng = np.random.default_rng(seed)
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    candidates = candidate_token_ids(tokenizer)

    requests: list[BenchRequest] = []
    for in_len, out_len in zip(input_lens.tolist(), output_lens.tolist()):
        ids = candidates[rng.integers(0, candidates.size, size=in_len)].tolist()
        text = tokenizer.decode(ids)
        if dataset_name == "random":
            ids = list(_encode(tokenizer, text))
        requests.append(BenchRequest(prompt=text, input_ids=ids, prompt_len=len(ids), output_len=int(out_len)))
    return requests


def _encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Encode as a server would; HF ``BatchEncoding``-like results are unwrapped."""
    out: Any = tokenizer.encode(text)
    if hasattr(out, "input_ids"):
        out = out.input_ids
    return [int(i) for i in out]
