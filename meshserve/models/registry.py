"""Architecture name (config.json `architectures`) -> model class."""

from __future__ import annotations

from torch import nn

from meshserve.models.deepseek import DeepseekForCausalLM
from meshserve.models.llama import LlamaForCausalLM
from meshserve.models.mixtral import MixtralForCausalLM
from meshserve.models.qwen2 import Qwen2ForCausalLM
from meshserve.models.qwen3 import Qwen3ForCausalLM
from meshserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
}
