"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from torch import nn

from meshserve.models.llama import LlamaForCausalLM
from meshserve.models.qwen2 import Qwen2ForCausalLM
from meshserve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
