"""GrammarBackend: compiles grammars against the model's vocabulary off the scheduler's critical
path, and fills the per-step token masks of a batch's structured rows.

* Compilation runs in one background thread; `compile` returns at once with a Future, and the
  scheduler keeps the request in its grammar queue (other requests keep running) until the
  future is done. Futures are cached by (kind, text), so n > 1 sequences, retries and repeated
  schemas compile once; xgrammar keeps its own cache of compiled grammars behind that.
* A matcher (one per sequence) is advanced on the host with each accepted token. Each step the
  host writes one bitmask row per structured sequence (32 tokens per int32, xgrammar's layout);
  the sampler ships it to the device with the step's other inputs and applies it there, so the
  only device-to-host transfer per step is still the sampled tokens.
* Every rank of a tensor-parallel group compiles and advances the same matchers with the same
  (broadcast) tokens, so their masks agree; the leader's sample decides anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar

from meshserve.grammar.spec import JSON_OPTIONS, GrammarSpec

logger = logging.getLogger("meshserve")

# Compiled grammars kept (by spec). A cached entry is one compiled grammar: its token-mask cache
# is typically tens of kB to a few MB, so this bounds the memory at a few hundred MB at worst.
MAX_CACHED_GRAMMARS = 512


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        """`vocab_size`: the model's (logits columns that can be sampled), which may exceed the
        tokenizer's; the extra ids are never allowed by a mask."""
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                        stop_token_ids=list(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        # Tokens free of raw control characters (bytes < 0x20). JSON never has one unescaped: in
        # strings they must be escaped, and between values our grammars allow spaces only. Yet
        # xgrammar 0.2.8's strings with minLength/maxLength accept any character but quote,
        # backslash, CR and LF, so a JSON row's mask is also ANDed with this one.
        safe = torch.tensor([all(b >= 0x20 for b in token) for token in info.decoded_vocab]
                            + [False] * (vocab_size - len(info.decoded_vocab)), dtype=torch.bool)
        self._json_safe = _pack_bits(safe, xgrammar.get_bitmask_shape(1, vocab_size)[1])
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshserve-grammar")
        self._cache: dict[GrammarSpec, Future[xgrammar.CompiledGrammar]] = {}

    def compile(self, spec: GrammarSpec) -> Future[xgrammar.CompiledGrammar]:
        future = self._cache.pop(spec, None)  # re-inserted: the dict's order is least recently used first
        if future is None or (future.done() and future.exception() is not None):
            future = self._thread.submit(self._compile, spec)
        self._cache[spec] = future
        while len(self._cache) > MAX_CACHED_GRAMMARS:
            del self._cache[next(iter(self._cache))]
        return future

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        if spec.kind == "json_schema":
            return self._compiler.compile_json_schema(spec.text, **JSON_OPTIONS)
        return self._compiler.compile_grammar(spec.grammar())

    @staticmethod
    def matcher(compiled: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(compiled)

    def token_bitmask(self, rows: Sequence[tuple[xgrammar.GrammarMatcher, str] | None]) -> torch.Tensor | None:
        """[B, ceil(vocab/32)] int32 host bitmask of the tokens each row may take next, from its
        (matcher, grammar kind); all ones for rows given None (free text, and finished rows whose
        token will be discarded). None when no row has a matcher."""
        if all(row is None for row in rows):
            return None
        bitmask = xgrammar.allocate_token_bitmask(len(rows), self.vocab_size)  # all ones
        for i, row in enumerate(rows):
            if row is None or row[0].is_terminated():
                continue
            row[0].fill_next_token_bitmask(bitmask, i)
            if row[1] == "json_schema":
                bitmask[i] &= self._json_safe
        return bitmask

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _pack_bits(allowed: torch.Tensor, words: int) -> torch.Tensor:
    """A [V] bool tensor as one bitmask row of `words` int32 (xgrammar's layout: token t is bit
    t % 32 of word t // 32; ids past V are off)."""
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)  # < 2**32, exact in int64
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
