"""What must be identical on every node of a cluster, compared at the join handshake.

Mismatched arguments or model files across nodes otherwise deadlock inside NCCL until a
30-minute watchdog fires (LESSONS.md). Node 0 compares each joining node's Fingerprint with its
own and refuses with :meth:`Fingerprint.diff`: one line per field, named by its flag.

Cheap by design: the model is identified by its config.json (parsed, so formatting does not
matter), the *names and sizes* of its weight files plus any index json, and the tokenizer
files' contents (small). Weights are never fully hashed at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from meshserve.config.model_config import ModelConfig
    from meshserve.config.server_args import ServerArgs

__all__ = ["GRAPH_SHAPING_ARGS", "Fingerprint", "GraphValue", "ModelFiles"]

# Server arguments (ServerArgs field names) that must be equal on every node. The reason
# common to all: every rank runs the same program step by step (SPMD, DESIGN §2), so anything
# that changes which collectives a rank issues, with which shapes, or which scheduling decision
# it takes, turns a difference into a hang or into silently wrong output.
# Deliberately NOT here: node_rank, host/port, dist_init_addr and base_gpu_id (legitimately
# per node), model_path/tokenizer_path (paths may differ; the files' hashes are compared
# instead), served_model_name/api_key/log_level/stream_interval (only node 0 serves HTTP),
# dist_timeout (a local patience, not a shape).
GRAPH_SHAPING_ARGS: tuple[str, ...] = (
    # Topology: the world size, global rank layout and the groups every rank creates.
    "tp_size", "nnodes", "dp_size", "ep_size", "enable_dp_attention", "enable_dp_lm_head",
    "moe_a2a_backend", "ep_num_redundant_experts", "enable_eplb", "eplb_rebalance_num_iterations",
    # Device type decides the backend (NCCL vs gloo); both ends of a collective must agree.
    "device",
    # Tensor shapes and dtypes of every layer and collective (resolved from the model config).
    "dtype", "context_length", "quantization", "kv_cache_dtype",
    # Random weights on one node and the checkpoint's on another would serve garbage.
    "load_format",
    # KV pool geometry and scheduling inputs: every rank must take the same decisions.
    "page_size", "max_total_tokens", "mem_fraction_static", "disable_radix_cache",
    "max_running_requests", "max_prefill_tokens", "chunked_prefill_size", "schedule_policy",
    "schedule_conservativeness", "random_seed", "grammar_backend", "skip_tokenizer_init",
    "enable_overlap_schedule", "disable_overlap_schedule", "enable_mixed_chunk",
    # Which collectives run outside the model: captured CUDA graphs contain collectives, and
    # the deterministic check adds one per step; a rank that skips them hangs the others.
    "attention_backend", "cuda_graph_max_bs", "disable_cuda_graph",
    "enable_deterministic_check",
    # The role of the whole server in prefill-decode disaggregation.
    "disaggregation_mode",
)

# Files whose names end so are weights: compared by name and size, never read.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Small files that change tokenization or the end-of-sequence ids: compared by content,
# because every rank's scheduler detects stop strings and EOS itself.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "generation_config.json")
_SHORT = 12  # hex digits of a hash shown in messages


def _sha256(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


class ModelFiles(msgspec.Struct, frozen=True, kw_only=True):
    """Hashes that identify a model directory cheaply (module docstring)."""

    path: str  # informational: paths may differ across nodes
    config_hash: str
    weights_hash: str
    weights_files: int
    weights_bytes: int
    tokenizer_hash: str

    @classmethod
    def of(cls, model_path: str | os.PathLike[str],
           tokenizer_path: str | os.PathLike[str] | None = None) -> ModelFiles:
        model = Path(model_path)
        config = model / "config.json"
        config_canonical = (json.dumps(json.loads(config.read_text()), sort_keys=True).encode()
                            if config.is_file() else b"")
        files = sorted(p for p in model.iterdir() if p.is_file())
        weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
        indexes = [p for p in files if p.name.endswith(".index.json")]
        sizes = [(p.name, p.stat().st_size) for p in weights]
        weights_hash = _sha256(
            [f"{name}\0{size}\n".encode() for name, size in sizes]
            + [p.name.encode() + b"\0" + p.read_bytes() for p in indexes])
        tok = Path(tokenizer_path) if tokenizer_path is not None else model
        tokenizer_hash = _sha256(
            name.encode() + b"\0" + (tok / name).read_bytes()
            for name in _TOKENIZER_FILES if (tok / name).is_file())
        return cls(path=str(model), config_hash=_sha256([config_canonical]),
                   weights_hash=weights_hash, weights_files=len(sizes),
                   weights_bytes=sum(size for _, size in sizes), tokenizer_hash=tokenizer_hash)

    def describe(self) -> str:
        return (f"{self.path}: config.json {self.config_hash[:_SHORT]}, {self.weights_files} "
                f"weight file(s) of {_size(self.weights_bytes)} {self.weights_hash[:_SHORT]}, "
                f"tokenizer {self.tokenizer_hash[:_SHORT]}")


GraphValue = str | int | float | bool | None


class Fingerprint(msgspec.Struct, frozen=True, kw_only=True):
    """One node's identity for the join handshake. Compared by :meth:`diff`, except
    ``device_count`` (nodes may hold different numbers of devices and use --base-gpu-id)."""

    meshserve_version: str
    torch_version: str
    nccl_version: str | None  # None on cpu
    graph: dict[str, GraphValue]  # GRAPH_SHAPING_ARGS -> value, resolved where possible
    model: ModelFiles | None  # None when the command compares no model (doctor without one)
    device_count: int  # CUDA devices visible to this node (0 on cpu); informational

    @classmethod
    def collect(cls, *, device: str, graph: Mapping[str, GraphValue],
                model: ModelFiles | None) -> Fingerprint:
        """This process's versions and devices plus the given arguments and model hashes."""
        import torch

        import meshserve

        nccl: str | None = None
        count = 0
        if device == "cuda" and torch.cuda.is_available():
            count = torch.cuda.device_count()
            version = torch.cuda.nccl.version()
            nccl = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
        return cls(meshserve_version=meshserve.__version__, torch_version=str(torch.__version__),
                   nccl_version=nccl, graph=dict(graph), model=model, device_count=count)

    @classmethod
    def from_server_args(cls, args: ServerArgs, model_config: ModelConfig) -> Fingerprint:
        """The fingerprint of a server: dtype and context length as resolved by the model
        config (``auto`` on two nodes with the same model is no difference)."""
        graph: dict[str, GraphValue] = {name: args.get(name) for name in GRAPH_SHAPING_ARGS}
        graph["device"] = args.resolved_device()
        graph["dtype"] = model_config.dtype
        graph["context_length"] = model_config.context_length
        model = ModelFiles.of(model_config.model_path, model_config.tokenizer_path)
        return cls.collect(device=args.resolved_device(), graph=graph, model=model)

    def diff(self, other: Fingerprint, *, self_name: str = "this node",
             other_name: str = "the other node") -> list[str]:
        """One line per difference, e.g. ``--context-length: node 0 has 2048, node 1 has 1024``.
        Empty when the nodes may form a cluster."""
        a, b = self_name, other_name
        lines: list[str] = []

        def differs(label: str, mine: object, theirs: object) -> None:
            if mine != theirs:
                lines.append(f"{label}: {a} has {_show(mine)}, {b} has {_show(theirs)}")

        differs("meshserve version", self.meshserve_version, other.meshserve_version)
        differs("torch version", self.torch_version, other.torch_version)
        differs("NCCL version", self.nccl_version, other.nccl_version)
        for name in sorted(self.graph.keys() | other.graph.keys()):
            differs("--" + name.replace("_", "-"), self.graph.get(name, _MISSING),
                    other.graph.get(name, _MISSING))
        mm, om = self.model, other.model
        if (mm is None) != (om is None):
            differs("--model-path", mm.path if mm else _MISSING, om.path if om else _MISSING)
        elif mm is not None and om is not None:
            for what, key in (("config.json", "config_hash"), ("weight files (names and sizes)",
                              "weights_hash"), ("tokenizer files", "tokenizer_hash")):
                if getattr(mm, key) != getattr(om, key):
                    lines.append(f"--model-path {what}: {a} has {mm.path} "
                                 f"({getattr(mm, key)[:_SHORT]}), {b} has {om.path} "
                                 f"({getattr(om, key)[:_SHORT]})")
        return lines


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _show(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, _Missing):
        return repr(value)
    return str(value)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
