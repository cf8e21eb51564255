"""What the TokenizerManager is asked (GenerateRequest), what it yields (SequenceOutput), the
accumulated result of one sequence (SequenceResult), and the errors the HTTP layer maps to
status codes. Shared by the HTTP routes and the offline Engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshserve.messages import Bootstrap, FinishReason, TopLogprob
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


# SGLang's default --disaggregation-bootstrap-port: what a router's `bootstrap_port: null` means
# (sglang-router sends null for a prefill given without a port).
DEFAULT_BOOTSTRAP_PORT = 8998


def bootstrap_from_fields(host: str | None, port: int | None, room: int | None) -> Bootstrap | None:
    """The request fields `bootstrap_host`, `bootstrap_port`, `bootstrap_room` as one Bootstrap:
    none given means a plain request; a host and a room are needed together."""
    if host is None and room is None and port is None:
        return None
    if host is None or room is None:
        raise InvalidRequest("bootstrap_host and bootstrap_room go together (a PD router sets both)",
                             param="bootstrap_host" if host is None else "bootstrap_room")
    if not 0 <= room < 1 << 64:
        raise InvalidRequest("bootstrap_room must be in [0, 2**64)", param="bootstrap_room")
    port = DEFAULT_BOOTSTRAP_PORT if port is None else port
    if not 0 < port < 1 << 16:
        raise InvalidRequest("bootstrap_port must be in [1, 65535]", param="bootstrap_port")
    return Bootstrap(host=host, port=port, room=room)


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One client request, before tokenization. Exactly one of text / input_ids / messages."""

    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None  # OpenAI chat messages, content already text
    tools: list[dict[str, Any]] | None = None  # OpenAI tools, for the chat template
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # True when the client did not choose max_new_tokens: the default is then lowered to what
    # fits in the context (SGLang/vLLM behaviour) instead of refused.
    fit_max_new_tokens: bool = False
    n: int = 1
    return_logprob: bool = False
    top_logprobs_num: int = 0
    rid: str | None = None  # the client's id; generated when None
    bootstrap: Bootstrap | None = None  # prefill-decode disaggregation: where the halves meet


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
