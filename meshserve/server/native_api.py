"""SGLang's native `/generate` API: request schema, conversion to GenerateRequests, and the
response body (shared with the offline Engine, whose results have the same shape).

Request:  {"text" | "input_ids", "sampling_params": {SGLang names}, "stream", "return_logprob",
           "top_logprobs_num", "return_text_in_logprobs", "rid"}; text/input_ids may be a batch.
Response: {"text", "output_ids", "meta_info": {"id", "finish_reason": {"type", "matched" |
           "length"}, "prompt_tokens", "completion_tokens", "cached_tokens",
           ["output_token_logprobs", "output_top_logprobs"]}}; a list for a batch or n > 1.
Unknown fields are refused (400), so a feature meshserve lacks is never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from meshserve.messages import FinishReason
from meshserve.sampling_params import MAX_N, MAX_TOP_LOGPROBS, SamplingParams
from meshserve.server.generation import GenerateRequest, InvalidRequest, SequenceResult, bootstrap_from_fields

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128


class NativeSamplingParams(BaseModel):
    """`sampling_params` of /generate, with SGLang's names and defaults."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = None  # None: SGLang's default 128, lowered to fit the context
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's newer name for seed
    # Structured output (docs/structured-output.md): a JSON schema (JSON text, as SGLang takes it,
    # or the object itself), a regular expression, or an EBNF grammar.
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None

    def to_sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=SGLANG_DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed if self.seed is not None else self.sampling_seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            json_schema=json.dumps(self.json_schema) if isinstance(self.json_schema, dict) else self.json_schema,
            regex=self.regex,
            ebnf=self.ebnf,
        )


class GenerateReqInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    return_text_in_logprobs: bool = False
    logprob_start_len: int = -1
    rid: str | list[str] | None = None
    # prefill-decode disaggregation (SGLang): set by a PD router; one per prompt for a batch
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | None | list[int | None] = None
    bootstrap_room: int | list[int] | None = None
    # Fields sglang-router adds to every /generate body it forwards. Their default values are
    # accepted (they ask for nothing); a value that asks for something meshserve lacks is refused.
    model: str | None = None
    log_metrics: bool = True
    no_logs: bool = False
    background: bool = False
    return_hidden_states: bool = False
    return_bytes: bool = False
    return_entropy: bool = False

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or bool(self.input_ids and isinstance(self.input_ids[0], list))

    def to_generate_requests(self) -> list[GenerateRequest]:
        """One GenerateRequest per prompt (several for a batch)."""
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequest("give exactly one of text, input_ids")
        if self.logprob_start_len != -1:
            raise InvalidRequest("logprob_start_len (prompt logprobs) is not supported yet", param="logprob_start_len")
        for name in ("background", "return_hidden_states", "return_bytes", "return_entropy"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported", param=name)
        prompts: list[dict[str, Any]]
        if self.text is not None:
            prompts = [{"text": t} for t in (self.text if isinstance(self.text, list) else [self.text])]
        else:
            batch = self.input_ids if self.is_batch else [self.input_ids]
            prompts = [{"input_ids": list(ids)} for ids in batch]  # type: ignore[union-attr]
        rids = self._rids(len(prompts))
        bootstraps = self._bootstraps(len(prompts))
        sampling = self.sampling_params.to_sampling()
        return [
            GenerateRequest(
                sampling=sampling,
                fit_max_new_tokens=self.sampling_params.max_new_tokens is None,
                n=self.sampling_params.n,
                return_logprob=self.return_logprob,
                top_logprobs_num=self.top_logprobs_num,
                rid=rid,
                bootstrap=bootstrap,
                **prompt,
            )
            for prompt, rid, bootstrap in zip(prompts, rids, bootstraps)
        ]

    def _bootstraps(self, count: int) -> list:
        """One Bootstrap (or None) per prompt: the fields are lists for a batch, as in SGLang."""
        fields = (self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)
        if not any(isinstance(f, list) for f in fields):
            return [bootstrap_from_fields(*fields)] * count  # type: ignore[arg-type]
        columns = [f if isinstance(f, list) else [f] * count for f in fields]
        if any(len(column) != count for column in columns):
            raise InvalidRequest("bootstrap fields must be one per prompt (lists for a batch)", param="bootstrap_room")
        return [bootstrap_from_fields(*row) for row in zip(*columns)]

    def _rids(self, count: int) -> list[str | None]:
        if self.rid is None:
            return [None] * count
        rids = self.rid if isinstance(self.rid, list) else [self.rid]
        if len(rids) != count or isinstance(self.rid, list) != self.is_batch:
            raise InvalidRequest("rid must be one id per prompt (a list for a batch)", param="rid")
        return list(rids)


def engine_requests(
    prompt: Any, sampling_params: Any, input_ids: Any
) -> tuple[list[GenerateRequest], bool]:
    """meshserve.Engine.generate's arguments as GenerateRequests (one per prompt, in order) and
    whether they form a batch. They are validated as a /generate body is, so every bad argument
    -- wrong type, out of range, unknown sampling field -- raises InvalidRequest."""
    try:
        whole = GenerateReqInput(text=prompt, input_ids=input_ids)
        if (whole.text is None) == (whole.input_ids is None):
            raise InvalidRequest("give exactly one of prompt, input_ids")
        prompts: list[dict[str, Any]]
        if whole.text is not None:
            prompts = [{"text": t} for t in (whole.text if isinstance(whole.text, list) else [whole.text])]
        else:
            batch = whole.input_ids if whole.is_batch else [whole.input_ids]
            prompts = [{"input_ids": ids} for ids in batch]  # type: ignore[union-attr]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(params)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        inputs = [GenerateReqInput(sampling_params=p, **source) for source, p in zip(prompts, params)]
    except ValidationError as err:
        raise InvalidRequest.from_problems(err.errors()) from None
    return [r for i in inputs for r in i.to_generate_requests()], whole.is_batch


def finish_reason(finish: FinishReason | None, completion_tokens: int) -> dict[str, Any] | None:
    if finish is None:
        return None
    if finish.kind == "length":
        return {"type": "length", "length": completion_tokens}
    return {"type": finish.kind, "matched": finish.matched}


def native_response(
    result: SequenceResult,
    *,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    token_text: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """One sequence's /generate body. `token_text` (for return_text_in_logprobs) fills the
    third element of each logprob entry; it is None otherwise, as in SGLang."""

    def entry(logprob: float, token_id: int) -> list[Any]:
        return [logprob, token_id, token_text(token_id) if token_text is not None else None]

    meta: dict[str, Any] = {
        "id": result.rid,
        "finish_reason": finish_reason(result.finish, result.completion_tokens),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in zip(result.logprobs, result.token_ids)]
    if top_logprobs_num:
        meta["output_top_logprobs"] = [[entry(t.logprob, t.token_id) for t in top] for top in result.top_logprobs]
    return {"text": result.text, "output_ids": result.token_ids, "meta_info": meta}
