"""What the engine needs to know about a model, resolved once from the server arguments.

Every process builds the same ModelConfig from the same ServerArgs, so the tokenizer side and
the scheduler side can never disagree on context length, vocabulary or end-of-sequence ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig, PretrainedConfig

from meshserve.cluster.layout import KVHeadShare
from meshserve.config.preflight import SUPPORTED_ARCHITECTURES
from meshserve.config.quantization import Fp8Scheme, QuantizationError, resolve_quantization

if TYPE_CHECKING:
    from meshserve.config.server_args import ServerArgs

_DTYPE_ALIASES = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ModelConfigError(ValueError):
    """The model directory cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    model_path: str
    tokenizer_path: str | None  # None with --skip-tokenizer-init
    served_model_name: str
    architecture: str
    dtype: str  # "float32" | "bfloat16" | "float16"
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    hf_config: PretrainedConfig = field(compare=False, repr=False)
    # FP8 linear layers: from config.json's quantization_config, or --quantization fp8.
    quantization: Fp8Scheme | None = None
    # The model's recommended sampling (generation_config.json), the default for OpenAI requests
    # that leave those fields out -- as vLLM (--generation-config auto) and SGLang
    # (--sampling-defaults model) do. Only the keys of GENERATION_CONFIG_SAMPLING_KEYS.
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        explicit = getattr(self.hf_config, "head_dim", None)
        return explicit or self.hf_config.hidden_size // self.num_heads

    # The KV cache per token and layer. Multi-head latent attention (DeepSeek-V2/V3: the config
    # has kv_lora_rank) caches one latent "head" [c_kv | k_rope], the same on every rank, and
    # reads its values out of c_kv (KVPool's latent layout); other models cache K and V of
    # their KV heads, split over the attention-TP ranks (each replicated when fewer than ranks).

    @property
    def is_mla(self) -> bool:
        return getattr(self.hf_config, "kv_lora_rank", None) is not None

    def kv_heads_per_rank(self, attn_tp_size: int) -> int:
        return 1 if self.is_mla else KVHeadShare(self.num_kv_heads, attn_tp_size).per_rank

    @property
    def kv_head_dim(self) -> int:
        if self.is_mla:
            return self.hf_config.kv_lora_rank + self.hf_config.qk_rope_head_dim
        return self.head_dim

    @property
    def kv_latent_v_dim(self) -> int | None:
        """MLA: the values are the first kv_lora_rank features of the cached key."""
        return self.hf_config.kv_lora_rank if self.is_mla else None

    @classmethod
    def from_server_args(cls, args: ServerArgs) -> ModelConfig:
        from meshserve.config.default_model import DEFAULT_MODEL_NAME, default_model_path

        model_args = args.model
        if model_args.model_path is None:
            model_path = str(default_model_path())
            default_name = DEFAULT_MODEL_NAME
        else:
            model_path = model_args.model_path
            default_name = model_args.model_path
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ModelConfigError(
                f"--model-path {model_path!r} is not a local Hugging Face model directory (no config.json); "
                "meshserve never downloads from a model hub"
            )
        hf_config = _load_hf_config(path, allow_custom_code_config=model_args.trust_remote_code)
        architectures = getattr(hf_config, "architectures", None) or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(
                f"architecture {architectures} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            quantization = resolve_quantization(getattr(hf_config, "quantization_config", None),
                                                model_args.quantization)
        except QuantizationError as err:
            raise ModelConfigError(str(err)) from None
        return cls(
            model_path=model_path,
            tokenizer_path=None if model_args.skip_tokenizer_init else (model_args.tokenizer_path or model_path),
            served_model_name=model_args.served_model_name or default_name,
            architecture=arch,
            dtype=_resolve_dtype(model_args.dtype, hf_config),
            context_length=_resolve_context_length(model_args.context_length, hf_config),
            vocab_size=hf_config.vocab_size,
            eos_token_ids=_eos_token_ids(path, hf_config),
            hf_config=hf_config,
            sampling_defaults=_sampling_defaults(path),
            quantization=quantization,
        )


def _load_hf_config(path: Path, *, allow_custom_code_config: bool) -> PretrainedConfig:
    """config.json as transformers' config class for its model_type.

    Invariant: no Python file of the model directory is ever imported (trust_remote_code is
    always False here, as in load_tokenizer): meshserve runs only its own model implementations,
    so custom configuration code could only be a way in. A config.json that declares custom code
    (`auto_map`) is therefore refused unless --trust-remote-code is given, and then read as the
    plain config of its model_type; the architecture check that follows names anything
    meshserve does not implement."""
    config_file = path / "config.json"
    if "auto_map" in _read_json(config_file) and not allow_custom_code_config:
        raise ModelConfigError(
            f"{config_file} declares custom code (auto_map), which meshserve never runs; pass "
            "--trust-remote-code to load it as the plain config of its model_type"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except ValueError as err:
        raise ModelConfigError(f"cannot read {config_file} as a plain transformers config: {err}") from None


def _resolve_dtype(requested: str, hf_config: PretrainedConfig) -> str:
    requested = _DTYPE_ALIASES.get(requested, requested)
    if requested != "auto":
        return requested
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    name = str(declared).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def _resolve_context_length(requested: int | None, hf_config: PretrainedConfig) -> int:
    native = getattr(hf_config, "max_position_embeddings", None)
    if requested is None:
        if native is None:
            raise ModelConfigError("the model config has no max_position_embeddings; pass --context-length")
        return native
    if requested <= 0:
        raise ModelConfigError(f"--context-length must be positive, got {requested}")
    if native is not None and requested > native:
        # Rotary scaling beyond the trained length changes outputs silently; refuse instead.
        raise ModelConfigError(
            f"--context-length {requested} exceeds the model's max_position_embeddings {native}"
        )
    return requested


def _eos_token_ids(path: Path, hf_config: PretrainedConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json (which may list several) or else config.json."""
    ids: list[int] = []
    for source in (_read_json(path / "generation_config.json").get("eos_token_id"), hf_config.eos_token_id):
        if source is None:
            continue
        for token_id in source if isinstance(source, list) else [source]:
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


# generation_config.json keys that are sampling parameters under the same name (vLLM's list).
GENERATION_CONFIG_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(path: Path) -> dict[str, float]:
    generation_config = _read_json(path / "generation_config.json")
    if generation_config.get("do_sample") is False:
        # transformers' meaning: greedy, whatever temperature says (it may hold a leftover value).
        return {"temperature": 0.0}
    return {key: generation_config[key] for key in GENERATION_CONFIG_SAMPLING_KEYS
            if isinstance(generation_config.get(key), int | float)}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
