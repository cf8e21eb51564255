"""Per-request sampling parameters: one struct shared by the HTTP layer, the messages and the sampler."""

from __future__ import annotations

import math

import msgspec

# Generous but finite: a request may not ask for more than this many new tokens, whatever the
# context length says. It keeps absurd values out of the scheduler's arithmetic.
MAX_NEW_TOKENS_LIMIT = 1 << 20
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # sequences per request (OpenAI's limit on choices)
# Every integer that reaches the scheduler must fit its int64 msgpack fields and int32 device
# tensors; these bounds are why no value can overflow past the edge (issue 10, item 4).
MAX_TOP_K = (1 << 31) - 1
MAX_TOKEN_ID = (1 << 31) - 1
# Stop strings are matched against the text every step; a few long ones are plenty.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


class SamplingParamsError(ValueError):
    """A sampling value out of range; the HTTP layer turns it into a 400."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one sequence asks of the sampler and of the stop logic.

    `n` is not here: the TokenizerManager fans a request with n > 1 out into n sequences.
    `temperature == 0` means greedy (argmax), whatever top_p/top_k/min_p say.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = no top-k cut
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Structured output (meshserve/grammar/): at most one of a JSON schema (JSON text), a regular
    # expression or an EBNF grammar (xgrammar's dialect) that every output must match in full.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the output's grammar, kind one of json_schema, regex, ebnf; None for
        free text. The pair is also the key of the compiled-grammar cache."""
        for kind in ("json_schema", "regex", "ebnf"):
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalty(self) -> bool:
        """Whether any penalty changes the logits (they count the tokens generated so far)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError naming the first bad field."""

        def bad(field: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"{field}: {why}")

        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise bad("max_new_tokens", f"must be in [0, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        for field, value, low, high in (
            ("temperature", self.temperature, 0.0, 100.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            ("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
            ("presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("repetition_penalty", self.repetition_penalty, 0.0, 10.0),
        ):
            if not math.isfinite(value) or not low <= value <= high:
                raise bad(field, f"must be in [{low}, {high}], got {value}")
        if self.top_p == 0.0:
            raise bad("top_p", "must be > 0")
        if self.repetition_penalty == 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1 or 0 (disabled) or in [1, {MAX_TOP_K}], got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for stop in self.stop:
            if not 0 < len(stop) <= MAX_STOP_STRING_CHARS:
                raise bad("stop", f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters")
            if (problem := text_problem(stop)) is not None:
                raise bad("stop", problem)
        given = [kind for kind in ("json_schema", "regex", "ebnf") if getattr(self, kind) is not None]
        if len(given) > 1:
            raise bad(given[1], f"give at most one of json_schema, regex, ebnf (got {', '.join(given)})")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        high = MAX_TOKEN_ID + 1 if vocab_size is None else vocab_size
        if any(not 0 <= t < high for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"token ids must be in [0, {high})")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be served, or None: it must be Unicode that UTF-8 can carry. A lone
    surrogate (possible in a Python str) would otherwise fail later, in the tokenizer or the
    msgpack encoder, as a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid Unicode text ({err.reason} at position {err.start})"
    return None
