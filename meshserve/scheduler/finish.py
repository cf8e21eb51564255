"""FinishChecker: decides, after each new token, whether a sequence is done and why."""

from __future__ import annotations

from meshserve.messages import FinishReason
from meshserve.scheduler.request import Req

# Stop strings are searched in the detokenized tail of the output; a few extra tokens beyond the
# longest stop string (in characters, an upper bound on tokens) cover a match that straddles the
# newest token.
_STOP_TAIL_EXTRA_TOKENS = 4


class FinishChecker:
    def __init__(self, *, eos_token_ids: tuple[int, ...], tokenizer=None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer

    def check(self, req: Req) -> FinishReason | None:
        sampling = req.sampling
        token = req.output_ids[-1]
        past_min = len(req.output_ids) >= sampling.min_new_tokens
        if past_min:
            if token in sampling.stop_token_ids:
                return FinishReason("stop", matched=token)
            if token in self.eos_token_ids and not sampling.ignore_eos:
                return FinishReason("stop", matched=token)
            if sampling.stop and self.tokenizer is not None:
                matched = self._stop_string(req)
                if matched is not None:
                    return FinishReason("stop", matched=matched)
        if req.tokens_left <= 0:
            return FinishReason("length", message="reached the context length" if req.context_limited else None)
        return None

    def _stop_string(self, req: Req) -> str | None:
        window = max(len(s) for s in req.sampling.stop) + _STOP_TAIL_EXTRA_TOKENS
        tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=req.sampling.skip_special_tokens)
        # The earliest-ending match wins, so the text is cut at the first stop string that completed.
        best: tuple[int, str] | None = None
        for stop in req.sampling.stop:
            at = tail.find(stop)
            if at >= 0 and (best is None or at + len(stop) < best[0]):
                best = (at + len(stop), stop)
        return None if best is None else best[1]
