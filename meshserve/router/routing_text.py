"""The text a request is routed by (cache-aware affinity): what the worker's prefix cache sees
first, as far as the router can tell without a tokenizer."""

from __future__ import annotations

from typing import Any


def routing_text(body: Any) -> str:
    """Chat: the messages' contents in order; completions: the prompt; /generate: the text or
    the token ids (as their decimal list). Anything else routes as "" (no affinity)."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("messages"), list):
        return "".join(_content(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    for key in ("prompt", "text", "input_ids"):
        value = body.get(key)
        if value is not None:
            return value if isinstance(value, str) else str(value)
    return ""


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
