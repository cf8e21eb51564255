"""What the TokenizerManager is asked (GenerateRequest), what it yields (SequenceOutput), the
accumulated result of one sequence (SequenceResult), and the errors the HTTP layer maps to
status codes. Shared by the HTTP routes and the offline Engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshserve.messages import FinishReason, TopLogprob
from meshserve.sampling_params import SamplingParams


class GenerateError(Exception):
    """Base of the errors a generation can end with; `status` is the HTTP status to answer."""

    status = 500


class InvalidRequest(GenerateError, ValueError):
    """The request cannot be served as asked (bad prompt, does not fit the context, ...)."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    @classmethod
    def from_problems(cls, problems: Sequence[Mapping[str, Any]]) -> InvalidRequest:
        """pydantic's errors() -> one error naming each bad field (`messages.0.role: ...`)."""

        def where(problem: Mapping[str, Any]) -> str:
            return ".".join(str(part) for part in problem.get("loc", ()) if part != "body")

        message = "; ".join(f"{where(p) or 'body'}: {p.get('msg', 'invalid')}" for p in problems)
        return cls(message or "invalid request body", param=(where(problems[0]) or None) if problems else None)


class ServiceUnavailable(GenerateError):
    """The scheduler is not running (not started yet, failed, died, or the server is stopping)."""

    status = 503


class RequestAborted(GenerateError):
    """The scheduler ended the sequence with finish kind "abort" (its message says why)."""

    status = 500


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One client request, before tokenization. Exactly one of text / input_ids / messages."""

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # OpenAI chat messages, content already text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # True when the client did not choose max_new_tokens: the default is then lowered to what
    # fits in the context (SGLang/vLLM behaviour) instead of refused.
    fit_max_new_tokens: bool = False
    n: int = 1
    return_logprob: bool = False
    top_logprobs_num: int = 0
    rid: str | None = None  # the client's id; generated when None


@dataclass(frozen=True)
class SequenceOutput:
    """What one step added to sequence `index` of a request: new text and ids (deltas), the
    logprobs aligned with the ids, and on the sequence's last output its `finish`. Token counts
    are totals so far."""

    index: int
    rid: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[TopLogprob]]
    finish: FinishReason | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class SequenceResult:
    """One sequence's outputs accumulated (for non-streaming responses and cumulative streams)."""

    index: int
    rid: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, out: SequenceOutput) -> None:
        self.rid = out.rid
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.finish = out.finish
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        self.completion_tokens = out.completion_tokens
