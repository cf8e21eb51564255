"""Dynamo 1.6's backend request and response dicts <-> meshserve's sampling parameters and
stream outputs. Torch- and Dynamo-free, so the mapping is unit-testable.

A request (the frontend already tokenized and templated it) carries `token_ids`,
`stop_conditions`, `sampling_options`, `output_options` and, when disaggregated,
`bootstrap_info`. Each response item carries the new `token_ids`; the last one a
`finish_reason` and `completion_usage`. What meshserve cannot honour is refused by name (a
ValueError, which Dynamo returns to the client as an error) rather than ignored.
"""

from __future__ import annotations

from typing import Any

from meshserve.messages import Bootstrap, FinishReason
from meshserve.server.generation import SequenceOutput

# Dynamo's finish reasons: meshserve's "abort" is Dynamo's "cancelled" (as SGLang's is).
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def sampling_params(request: dict[str, Any], *, with_stop_strings: bool) -> dict[str, Any]:
    """/generate's sampling_params (SGLang's names) for one Dynamo request. Stop strings need
    a tokenizer in the engine (`with_stop_strings`); the frontend applies them to its own text
    in any case."""
    stop = request.get("stop_conditions") or {}
    options = request.get("sampling_options") or {}
    if (options.get("n") or 1) != 1 or (options.get("best_of") or 1) != 1:
        raise ValueError("n and best_of > 1 are not supported by the meshserve Dynamo worker")
    if options.get("use_beam_search"):
        raise ValueError("use_beam_search is not supported by meshserve")
    if options.get("guided_decoding") is not None:
        raise ValueError("guided_decoding is not supported by the meshserve Dynamo worker")
    params: dict[str, Any] = {}
    if stop.get("max_tokens") is not None:
        params["max_new_tokens"] = stop["max_tokens"]
    if stop.get("min_tokens") is not None:
        params["min_new_tokens"] = stop["min_tokens"]
    if stop.get("ignore_eos"):
        params["ignore_eos"] = True
    if stop.get("stop_token_ids"):
        params["stop_token_ids"] = list(stop["stop_token_ids"])
    if with_stop_strings and stop.get("stop"):
        params["stop"] = list(stop["stop"])
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed"):
        if options.get(name) is not None:
            params[name] = options[name]
    if "temperature" in params:
        # Floats cross Dynamo's msgpack as f32: 0.7 arrives as 0.699999988...; round back.
        params["temperature"] = round(float(params["temperature"]), 6)
    for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if name in params:
            params[name] = round(float(params[name]), 6)
    output = request.get("output_options") or {}
    for name in ("logprobs", "prompt_logprobs"):
        if output.get(name) is not None:
            raise ValueError(f"output_options.{name} is not supported by the meshserve Dynamo worker")
    if output.get("skip_special_tokens") is not None:
        params["skip_special_tokens"] = bool(output["skip_special_tokens"])
    return params


def bootstrap(request: dict[str, Any]) -> Bootstrap | None:
    """Where a disaggregated request's halves meet: the frontend's `bootstrap_info` (the prefill
    worker advertised host and port; the frontend picked the room)."""
    info = request.get("bootstrap_info")
    if not info:
        return None
    return Bootstrap(host=str(info["bootstrap_host"]), port=int(info["bootstrap_port"]),
                     room=int(info["bootstrap_room"]))


def response_item(output: SequenceOutput) -> dict[str, Any]:
    """One stream item; the last carries finish_reason and the usage."""
    item: dict[str, Any] = {"token_ids": list(output.token_ids), "index": 0}
    if output.finish is not None:
        item["finish_reason"] = finish_reason(output.finish)
        item["completion_usage"] = {
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": output.cached_tokens},
        }
    return item


def finish_reason(finish: FinishReason) -> str:
    return FINISH_REASONS[finish.kind]


CANCELLED_ITEM: dict[str, Any] = {"token_ids": [], "index": 0, "finish_reason": "cancelled"}
