"""Attention backends by name; `--attention-backend` choices come from this registry."""

from __future__ import annotations

from meshserve.layers.attention.base import AttentionBackend
from meshserve.layers.attention.torch_native import TorchNativeBackend
from meshserve.layers.attention.triton import TritonBackend

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {"torch_native": TorchNativeBackend, "triton": TritonBackend}


def default_attention_backend(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "torch_native"


def create_attention_backend(name: str) -> AttentionBackend:
    try:
        return ATTENTION_BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; choices: {', '.join(ATTENTION_BACKENDS)}") from None
