"""Incremental detokenization of one sequence, with stop-string trimming.

Invariants (what the tests pin down):

* Streamed text never ends in half a character: a byte-level token that leaves a multi-byte
  character incomplete decodes to U+FFFD, and such text is held until the character completes
  (or the sequence ends).
* The streamed pieces concatenated are exactly the final text: there is no separate
  "non-streaming" decode path, the final text *is* the concatenation.
* The text never contains a stop string, and ends right before the first one generated (OpenAI
  semantics). While streaming, a tail that could still grow into a stop string is held back.
* The text of a stop token (EOS or a `stop_token_ids` entry) is not part of the output, as in
  SGLang and vLLM; its id stays in the output ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshserve.messages import FinishReason

# Ids -> text for one sequence, with the request's skip_special_tokens already bound.
DecodeFn = Callable[[Sequence[int]], str]

# Decoding the first output token together with a few prompt tokens keeps its leading space:
# SentencePiece-style decoders strip the space of the first token of a decoded sequence.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Token ids in, text deltas out (the prefix/read-offset method of vLLM and SGLang).

    `_ids[_prefix:_read]` is a window of already-emitted tokens decoded again as context, so
    that the text of `_ids[_read:]` comes out as it would in a full decode (merged spaces,
    multi-byte characters spanning tokens).
    """

    def __init__(self, decode: DecodeFn, prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that `new_ids` complete; "" while a character is still incomplete."""
        self._ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text remains at the end of the sequence, incomplete characters included."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        context = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(context) or (not final and text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]


class StopStringFilter:
    """Text deltas in, text safe to emit out: cut at the first stop string, hold back a tail
    that is a proper prefix of some stop string.

    Invariant: no stop string ever starts inside emitted text. Held text is the longest suffix
    of the text so far that is a proper prefix of a stop string, so any stop string that
    completes later starts inside the held part.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._held = ""
        self.matched: str | None = None  # the stop string found, once found

    def push(self, text: str) -> str:
        if self.matched is not None:
            return ""
        text = self._held + text
        hit = min(((text.find(s), s) for s in self._stop if s in text), default=None)
        if hit is not None:
            position, self.matched = hit
            self._held = ""
            return text[:position]
        keep = max((_overlap(text, s) for s in self._stop), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held tail, at the end of the sequence (it did not become a stop string)."""
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


class SequenceDetokenizer:
    """One sequence's output ids -> text, streaming-safe (see the module invariants)."""

    def __init__(self, decode: DecodeFn, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._decoder = IncrementalDecoder(decode, prompt_ids)
        self._filter = StopStringFilter(stop)

    @property
    def stop_matched(self) -> str | None:
        """The stop string this detokenizer found in the text, if any. Once set, no more text
        is produced; the caller ends the sequence even if the scheduler has not (yet)."""
        return self._filter.matched

    def push(self, new_ids: Sequence[int], finish: FinishReason | None = None) -> str:
        """Text to emit for `new_ids`; with `finish` (the sequence's last delta) also the rest."""
        if finish is not None and isinstance(finish.matched, int) and new_ids and new_ids[-1] == finish.matched:
            new_ids = new_ids[:-1]
        text = self._filter.push(self._decoder.push(new_ids))
        if finish is not None:
            text += self._filter.push(self._decoder.flush()) + self._filter.flush()
        return text
