"""The OpenAI-compatible API: request schemas (pydantic, validated by FastAPI), their conversion
to GenerateRequest, and response / stream-chunk / error bodies.

Semantics follow OpenAI, with the extensions SGLang and vLLM accept (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens). A field that
meshserve does not implement is refused with a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from meshserve.grammar.spec import JSON_OBJECT_SCHEMA
from meshserve.messages import TopLogprob
from meshserve.sampling_params import MAX_N, MAX_NEW_TOKENS_LIMIT, MAX_TOP_LOGPROBS, SamplingParams
from meshserve.server.api_wire import SSE_DONE, APIError, sse
from meshserve.server.generation import (GenerateError, GenerateRequest, SequenceOutput, SequenceResult,
                                         bootstrap_from_fields)
from meshserve.server.tool_calls import ToolCallError, ToolCallFormat, ToolCallStream, ToolRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# JSON has no -inf; a token the model rules out completely gets this logprob (vLLM does the same).
MIN_LOGPROB = -9999.0


def check_model(requested: str | None, served_model_name: str, model_path: str) -> None:
    """404 model_not_found unless the request names the served model (or its path, or none)."""
    if requested not in (None, served_model_name, model_path):
        raise APIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served_model_name}`",
            param="model",
            code="model_not_found",
        )


# ---- request schemas -----------------------------------------------------------------------


NO_SAMPLING_DEFAULTS: Mapping[str, float] = types.MappingProxyType({})


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise APIError(400, "tool_calls: arguments must be a JSON object text", param="messages") from None
    return {**call, "function": function}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def grammar(self) -> dict[str, str]:
        """The SamplingParams grammar field this format asks for (none for text)."""
        if self.type == "json_object":
            return {"json_schema": JSON_OBJECT_SCHEMA}
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            return {"json_schema": json.dumps(self.json_schema.schema_)}
        return {}


class _RequestBase(BaseModel):
    """Fields common to chat and text completions. Unknown fields are ignored (clients send
    extras such as `store` or `metadata`); known but unimplemented ones are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # structured output (docs/structured-output.md): OpenAI's response_format, SGLang's regex / ebnf
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    # prefill-decode disaggregation (SGLang): set by a PD router, never by end users
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _generate_request(self, max_tokens: int | None, fit: bool, sampling_defaults: Mapping[str, float],
                          extra_grammar: dict[str, str] | None = None, **fields: Any) -> GenerateRequest:
        """`max_tokens` None means "as many as fit"; `fit` lets a default shrink to fit;
        `sampling_defaults`: the model's sampling (ModelConfig.sampling_defaults) for the fields
        the request leaves out; `fields`: the prompt and the logprob fields of GenerateRequest."""
        if self.logit_bias:
            raise APIError.not_supported("logit_bias")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        sources = [(name, grammar) for name, grammar in (
            ("response_format", self.response_format.grammar() if self.response_format else None),
            ("regex", {"regex": self.regex} if self.regex is not None else None),
            ("ebnf", {"ebnf": self.ebnf} if self.ebnf is not None else None),
            ("tool_choice", extra_grammar),
        ) if grammar]
        if len(sources) > 1:
            names = ", ".join(name for name, _ in sources)
            raise APIError(400, f"at most one output constraint per request, got {names}", param=sources[1][0])
        grammar = sources[0][1] if sources else {}
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }
        sampling = SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS_LIMIT if max_tokens is None else max_tokens,
            min_new_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            **grammar,
            **{**sampling_defaults, **{name: value for name, value in optional.items() if value is not None}},
        )
        bootstrap = bootstrap_from_fields(self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)
        return GenerateRequest(sampling=sampling, fit_max_new_tokens=fit or max_tokens is None, n=self.n,
                               bootstrap=bootstrap, **fields)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, `developer` read as `system`."""
        if isinstance(self.content, list):
            kinds = {part.type for part in self.content} - {"text"}
            if kinds:
                raise APIError.not_supported("messages", f" content of type {', '.join(sorted(kinds))}")
            content = "".join(part.text or "" for part in self.content)
        else:
            content = self.content or ""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            # Chat templates (Qwen's, Llama 3's) read the arguments as a mapping.
            message["tool_calls"] = [_template_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def tool_request(self, parser: str | None) -> ToolRequest:
        """What the request asks of tools, with `parser` (--tool-call-parser or the model's
        default) as the format."""
        try:
            return ToolRequest.from_fields(self.tools, self.tool_choice, parser)
        except ToolCallError as err:
            raise APIError(400, str(err), param=err.param) from None

    def to_generate_request(self, sampling_defaults: Mapping[str, float] = NO_SAMPLING_DEFAULTS,
                            tools: ToolRequest | None = None) -> GenerateRequest:
        """`tools`: tool_request()'s answer (None: the request's tools are not allowed)."""
        if tools is None and (self.tools or self.tool_choice not in (None, "none", "auto")):
            raise APIError.not_supported("tools" if self.tools else "tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._generate_request(
            max_tokens,
            fit=False,
            sampling_defaults=sampling_defaults,
            extra_grammar=tools.grammar if tools is not None else None,
            messages=[m.to_template() for m in self.messages],
            tools=self.tools or None,
            return_logprob=self.logprobs,
            top_logprobs_num=self.top_logprobs or 0,
        )


class CompletionRequest(_RequestBase):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_generate_request(self, sampling_defaults: Mapping[str, float] = NO_SAMPLING_DEFAULTS) -> GenerateRequest:
        if self.echo:
            raise APIError.not_supported("echo")
        if self.suffix is not None:
            raise APIError.not_supported("suffix")
        if self.best_of not in (None, self.n):
            raise APIError.not_supported("best_of", " other than n")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError.not_supported("prompt", " as a batch of several prompts")
            prompt = prompt[0]
        source = {"text": prompt} if isinstance(prompt, str) else {"input_ids": list(prompt)}
        # The default 16 may shrink to fit the context; a client's explicit value may not.
        fit = "max_tokens" not in self.model_fields_set
        return self._generate_request(
            self.max_tokens,
            fit=fit,
            sampling_defaults=sampling_defaults,
            return_logprob=self.logprobs is not None,
            top_logprobs_num=self.logprobs or 0,
            **source,
        )


# ---- responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseContext:
    """What every body of one response shares."""

    id: str
    created: int
    model: str
    token_text: Callable[[int], str]  # one token as text, for logprobs
    logprobs: bool
    include_token_ids: bool  # --skip-tokenizer-init: text is empty, so choices carry ids

    @classmethod
    def new(cls, prefix: str, model: str, token_text: Callable[[int], str], *, logprobs: bool,
            include_token_ids: bool) -> ResponseContext:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, token_text, logprobs, include_token_ids)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _finish_reason(result: SequenceResult | SequenceOutput) -> dict[str, Any]:
    finish = result.finish
    if finish is None:
        return {"finish_reason": None}
    return {"finish_reason": finish.kind, "matched_stop": finish.matched}


def usage(results: Sequence[SequenceResult]) -> dict[str, Any]:
    """Token usage of a request: its prompt once (shared by the n sequences), all completions."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": max(r.cached_tokens for r in results)},
    }


def _chat_logprobs(ctx: ResponseContext, ids: list[int], logprobs: list[float],
                   tops: list[list[TopLogprob]]) -> dict[str, Any] | None:
    if not ctx.logprobs:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = ctx.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    content = []
    for i, (token_id, logprob) in enumerate(zip(ids, logprobs)):
        top = tops[i] if i < len(tops) else []
        content.append({**entry(token_id, logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in top]})
    return {"content": content}


def _completion_logprobs(ctx: ResponseContext, ids: list[int], logprobs: list[float],
                         tops: list[list[TopLogprob]], text_offset: int) -> dict[str, Any] | None:
    if not ctx.logprobs:
        return None
    tokens = [ctx.token_text(t) for t in ids[: len(logprobs)]]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp) for lp in logprobs],
        "top_logprobs": [{ctx.token_text(t.token_id): _finite(t.logprob) for t in top} for top in tops] or None,
        "text_offset": offsets,
    }


def _with_tool_calls(message: dict[str, Any], finish: dict[str, Any], calls: list) -> None:
    """Put parsed calls into a message or delta: `tool_calls`, finish_reason tool_calls (when the
    output ended by itself, not by a length limit)."""
    if not calls:
        return
    message["tool_calls"] = [call.body(i) for i, call in enumerate(calls)]
    if finish.get("finish_reason") == "stop":
        finish["finish_reason"] = "tool_calls"


def chat_completion_response(ctx: ResponseContext, results: Sequence[SequenceResult],
                             tool_format: ToolCallFormat | None = None) -> dict[str, Any]:
    """`tool_format`: parse tool calls out of the text in this format (None: plain text)."""
    choices = []
    for r in results:
        content, calls = tool_format.parse(r.text) if tool_format is not None else (r.text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        finish = _finish_reason(r)
        _with_tool_calls(message, finish, calls)
        choices.append({"index": r.index, "message": message,
                        "logprobs": _chat_logprobs(ctx, r.token_ids, r.logprobs, r.top_logprobs), **finish})
    return {"id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": usage(results)}


def completion_response(ctx: ResponseContext, results: Sequence[SequenceResult]) -> dict[str, Any]:
    choices = []
    for r in results:
        choice = {
            "index": r.index,
            "text": r.text,
            "logprobs": _completion_logprobs(ctx, r.token_ids, r.logprobs, r.top_logprobs, 0),
            **_finish_reason(r),
        }
        if ctx.include_token_ids:
            choice["token_ids"] = r.token_ids
        choices.append(choice)
    return {"id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": usage(results)}


def _chunk(ctx: ResponseContext, obj: str, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
    """A stream chunk; with include_usage every chunk has `"usage": null` but the last (OpenAI)."""
    body = {"id": ctx.id, "object": obj, "created": ctx.created, "model": ctx.model, "choices": choices}
    if include_usage:
        body["usage"] = None
    return body


def chat_role_chunk(ctx: ResponseContext, index: int, include_usage: bool) -> dict[str, Any]:
    """The first chunk of each choice: the assistant role, no content yet."""
    choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _chunk(ctx, "chat.completion.chunk", [choice], include_usage)


def _carries_anything(ctx: ResponseContext, out: SequenceOutput) -> bool:
    """Whether a chunk for `out` would say something: ids whose text is still held back (an
    incomplete character, a possible stop string) would make an empty delta, so none is sent."""
    return bool(out.text or out.finish is not None or (ctx.logprobs and out.logprobs)
                or (ctx.include_token_ids and out.token_ids))


def chat_delta_chunk(ctx: ResponseContext, out: SequenceOutput, include_usage: bool,
                     tool_stream: ToolCallStream | None = None) -> dict[str, Any] | None:
    """The chunk for one output, or None when it would be empty. `tool_stream`: this choice's
    tool-call parsing (None: plain text); its calls go out with the output's finish."""
    calls: list = []
    if tool_stream is not None:
        text = tool_stream.push(out.text)
        if out.finish is not None:
            rest, calls = tool_stream.finish()
            text += rest
        out = dataclasses.replace(out, text=text)
    if not _carries_anything(ctx, out):
        return None
    delta: dict[str, Any] = {"content": out.text} if out.text else {}
    finish = _finish_reason(out)
    _with_tool_calls(delta, finish, calls)
    choice = {
        "index": out.index,
        "delta": delta,
        "logprobs": _chat_logprobs(ctx, out.token_ids, out.logprobs, out.top_logprobs),
        **finish,
    }
    return _chunk(ctx, "chat.completion.chunk", [choice], include_usage)


def completion_delta_chunk(ctx: ResponseContext, out: SequenceOutput, include_usage: bool,
                           text_offset: int) -> dict[str, Any] | None:
    """The chunk for one output, or None when it would be empty. `text_offset`: characters of
    this choice streamed before it (for logprobs' text_offset)."""
    if not _carries_anything(ctx, out):
        return None
    choice = {
        "index": out.index,
        "text": out.text,
        "logprobs": _completion_logprobs(ctx, out.token_ids, out.logprobs, out.top_logprobs, text_offset),
        **_finish_reason(out),
    }
    if ctx.include_token_ids:
        choice["token_ids"] = out.token_ids
    return _chunk(ctx, "text_completion", [choice], include_usage)


def usage_chunk(ctx: ResponseContext, obj: str, results: Sequence[SequenceResult]) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, the request's usage."""
    return {**_chunk(ctx, obj, [], include_usage=False), "usage": usage(results)}
