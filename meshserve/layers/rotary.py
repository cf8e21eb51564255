"""Rotary position embedding with a precomputed cos/sin table indexed by position.

The inverse frequencies come from transformers' own rope initialisers, so every rope type the
config names (default, llama3, linear, yarn, ...) matches the reference implementation exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _default_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    base = rope_parameters(config).get("rope_theta", 10000.0)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
    return 1.0 / (base**exponents), 1.0


def rope_parameters(config: PretrainedConfig) -> dict:
    """The config's rope settings (rope_parameters, or the older rope_scaling + rope_theta)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params = {**params, "rope_theta": config.rope_theta}
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        rope_type = rope_parameters(config).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(config, head_dim)  # on the CPU
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported")
        if rope_type == "dynamic":
            raise ValueError("dynamic rope scaling depends on the sequence length and is not supported")
        # Built on the CPU (the rope initialisers return CPU tensors), then placed on the device the
        # model is being constructed on. float32 tables; cast to the activation dtype at use, as
        # the reference does.
        positions = torch.arange(max_positions, dtype=torch.float, device="cpu")
        freqs = positions[:, None] * inv_freq.to("cpu")[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        device = torch.get_default_device()
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T] -> rotated (q, k), in PyTorch ops. On
        CUDA the attention layer instead rotates and stores in one kernel (kernels/rotary.py)."""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
