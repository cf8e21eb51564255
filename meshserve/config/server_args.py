"""Server arguments: one frozen dataclass per concern, composed into :class:`ServerArgs`.

The command line is *generated* from the dataclass fields, so a field and its flag cannot
drift apart:

* the primary flag of a field is ``--`` + the field name with ``_`` replaced by ``-``
  (``tp_size`` -> ``--tp-size``); extra spellings (``--tp``, ``--tensor-parallel-size``),
  help text and choices live in the field's metadata (see :func:`_arg`);
* the argparse type comes from the annotation (``int | None`` -> ``int``); ``bool`` fields
  become ``store_true`` switches and must default to ``False``;
* the argparse ``dest`` of every flag is the field name, and field names are unique across
  the concerns, so a parsed namespace maps straight back onto the dataclasses.

Flags and defaults follow SGLang's ``sglang.launch_server`` so that user command lines run
unchanged with ``sglang`` replaced by ``meshserve``. Features that meshserve does not
implement yet are *parsed* (the command line is valid) but *refused* by
:meth:`ServerArgs.validate`, never silently ignored. The refusals live in one table,
:data:`REFUSALS`; delete a row when its feature lands.

Typical use::

    args = ServerArgs.from_cli(argv)        # parse + validate; exits 2 with "error: ..."
    args.parallel.tp_size                   # values are grouped by concern
    args.resolved_device()                  # "cuda" or "cpu" (resolves --device default)
    args.to_dict()                          # for /get_server_info; api_key masked
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meshserve.cluster.layout import GroupLayout, layout_problems
from meshserve.config.quantization import SERVED_QUANTIZATION

__all__ = [
    "ATTENTION_BACKENDS",
    "LOAD_BALANCE_METHODS",
    "CPU_CHUNKED_PREFILL_SIZE",
    "DEFAULT_CHUNKED_PREFILL_SIZE",
    "DTYPE_ALIASES",
    "DTYPES",
    "REFUSALS",
    "SCHEDULE_POLICIES",
    "CacheArgs",
    "DisaggArgs",
    "HttpArgs",
    "ModelArgs",
    "ParallelArgs",
    "Refusal",
    "SchedulerArgs",
    "ServerArgs",
    "ServerArgsError",
    "build_parser",
    "cuda_is_available",
    "normalize_dtype",
]


class ServerArgsError(ValueError):
    """Invalid or not-yet-supported server arguments.

    ``problems`` holds one human-readable line per problem; ``str(error)`` joins them with
    newlines, so every problem of a command line is reported at once.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Constants shared with other modules
# --------------------------------------------------------------------------------------------

#: Canonical ``--dtype`` values.
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

#: Extra ``--dtype`` spellings accepted for compatibility (SGLang/vLLM/HF habits).
DTYPE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {"half": "float16", "float": "float32", "bf16": "bfloat16"}
)

#: Choices for ``--attention-backend``: the names of ``meshserve.layers.attention.ATTENTION_BACKENDS``
#: (repeated here so that parsing flags does not import torch; a unit test keeps them equal).
ATTENTION_BACKENDS: tuple[str, ...] = ("torch_native", "triton")
LOAD_FORMATS: tuple[str, ...] = ("auto", "dummy")
#: ``--schedule-policy`` values (meshserve/scheduler/policy.py), SGLang's names.
SCHEDULE_POLICIES: tuple[str, ...] = ("lpm", "fcfs", "lof")

#: ``--quantization`` values: SGLang's, so its command lines parse; those outside
#: ``meshserve.config.quantization.SERVED_QUANTIZATION`` are refused by name (REFUSALS).
QUANTIZATION_CHOICES: tuple[str, ...] = (
    "fp8", "fbgemm_fp8", "compressed-tensors", "awq", "gptq", "marlin", "gptq_marlin", "awq_marlin",
    "bitsandbytes", "gguf", "modelopt", "modelopt_fp4", "petit_nvfp4", "w8a8_int8", "w8a8_fp8", "moe_wna16",
    "qoq", "w4afp8", "mxfp4")

#: ``--kv-cache-dtype`` values (SGLang's); all but auto and fp8_e4m3 are refused by name (REFUSALS).
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8_e4m3", "fp8_e5m2", "bf16", "bfloat16", "fp4_e2m1")

#: Choices for ``--load-balance-method`` (meshserve.server.dp_controller implements them).
LOAD_BALANCE_METHODS: tuple[str, ...] = ("round_robin", "shortest_queue")

#: Chunk size used when ``--chunked-prefill-size`` is not given (SGLang's usual default).
DEFAULT_CHUNKED_PREFILL_SIZE = 8192

#: The same on the CPU, where a token costs ~1000x a GPU's time: one 512-token chunk of
#: SmolLM2-135M is a few seconds on 2 cores, so steps stay short enough for running streams to
#: advance between chunks (docs/benchmarks.md, "CPU: long prompts and load").
CPU_CHUNKED_PREFILL_SIZE = 512

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")


def normalize_dtype(value: str) -> str:
    """Map a ``--dtype`` spelling to its canonical name (``"half"`` -> ``"float16"``).

    Unknown spellings are returned unchanged (lower-cased) so that the caller's choice check
    reports them with the list of valid values.
    """
    lowered = value.strip().lower()
    return DTYPE_ALIASES.get(lowered, lowered)


def _lower(value: str) -> str:
    return value.strip().lower()


def cuda_is_available() -> bool:
    """Whether torch sees a CUDA device. Imports torch lazily; tests may monkeypatch this."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# Field metadata -> argparse
# --------------------------------------------------------------------------------------------


def _arg(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: Sequence[str] | None = None,
    convert: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """Declare a dataclass field that is also a command-line flag.

    ``flags`` are extra spellings besides the primary ``--field-name``; ``convert`` replaces
    the type derived from the annotation (it runs before the ``choices`` check).
    """
    meta = {
        "help": help,
        "flags": flags,
        "choices": tuple(choices) if choices is not None else None,
        "convert": convert,
        "metavar": metavar,
    }
    return field(default=default, metadata=meta)


def _primary_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> type:
    """``int | None`` -> ``int``; ``bool`` -> ``bool``; rejects anything fancier."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported field type for a flag: {annotation!r}")
        annotation = members[0]
    if annotation not in (str, int, float, bool):
        raise TypeError(f"unsupported field type for a flag: {annotation!r}")
    return annotation


# Name of the namespace attribute where the actions below record explicitly given flags.
_EXPLICIT_ATTR = "_meshserve_explicit_flags"


def _record_explicit(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    seen: dict[str, str] | None = getattr(namespace, _EXPLICIT_ATTR, None)
    if seen is None:
        seen = {}
        setattr(namespace, _EXPLICIT_ATTR, seen)
    seen[dest] = option_string or _primary_flag(dest)


class _StoreAction(argparse.Action):
    """Like argparse's ``store``, but remembers that (and how) the user spelled the flag."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        _record_explicit(namespace, self.dest, option_string)


class _StoreTrueAction(argparse.Action):
    """Like argparse's ``store_true``, but remembers that the user gave the flag."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, const=True, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)
        _record_explicit(namespace, self.dest, option_string)


class _ConcernMixin:
    """Shared behaviour of the per-concern dataclasses."""

    #: Title of the concern's argument group in ``--help``.
    TITLE: ClassVar[str] = ""

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field of this concern to ``parser`` (as an argument group)."""
        group = parser.add_argument_group(cls.TITLE)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            meta = f.metadata
            if "help" not in meta:
                continue  # not a flag
            scalar = _scalar_type(hints[f.name])
            help_text: str = meta["help"]
            option_strings = [_primary_flag(f.name), *meta["flags"]]
            if scalar is bool:
                if f.default is not False:
                    raise TypeError(f"boolean flag {f.name} must default to False")
                group.add_argument(
                    *option_strings, dest=f.name, action=_StoreTrueAction, help=help_text
                )
                continue
            if f.default is not None:
                help_text += f" (default: {f.default})"
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "action": _StoreAction,
                "default": f.default,
                "type": meta["convert"] or scalar,
                "help": help_text,
            }
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
            group.add_argument(*option_strings, **kwargs)

    @classmethod
    def flag_fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        """The fields of this concern that are command-line flags."""
        return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The concerns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs(_ConcernMixin):
    """Which model to serve and how to load it."""

    TITLE: ClassVar[str] = "model"

    model_path: str | None = _arg(
        None,
        "Model directory in Hugging Face layout (config.json, safetensors, tokenizer). Omit it "
        "to serve the embedded default model (SmolLM2-135M-Instruct).",
        flags=("--model",),
    )
    tokenizer_path: str | None = _arg(
        None, "Tokenizer directory; defaults to the model path.")
    served_model_name: str | None = _arg(
        None, "Model name reported by the OpenAI API (/v1/models, responses); defaults to the "
        "model path.")
    dtype: str = _arg(
        "auto",
        "Weight and activation dtype; 'auto' follows the checkpoint's torch_dtype. Also "
        "accepts half, float, bf16.",
        choices=DTYPES,
        convert=normalize_dtype,
    )
    context_length: int | None = _arg(
        None, "Maximum context length; defaults to the model config's.")
    quantization: str | None = _arg(
        None, "Weight quantization. fp8: quantize a bf16/fp32 checkpoint at load (per-channel FP8 "
        "weights, per-token activation scales). FP8 checkpoints (fbgemm_fp8, compressed-tensors, "
        "DeepSeek block-wise fp8) are detected from config.json without it (docs/models.md).",
        choices=QUANTIZATION_CHOICES)
    trust_remote_code: bool = _arg(
        False, "Accept a config.json that declares custom code (auto_map) and read it as the "
        "plain config of its model_type. meshserve never runs code from the model directory "
        "(it runs only its own model implementations), with or without this flag.")
    skip_tokenizer_init: bool = _arg(
        False, "Do not load a tokenizer: requests carry token ids and responses return ids.")
    load_format: str = _arg(
        "auto", "How weights load. auto: the safetensors of the model directory. dummy: small random "
        "values from config.json alone, for speed and memory benchmarks of a shape without its "
        "checkpoint (outputs are meaningless).",
        choices=LOAD_FORMATS)

    def __post_init__(self) -> None:
        # Accept the same dtype aliases programmatically as on the command line.
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))


@dataclass(frozen=True)
class ParallelArgs(_ConcernMixin):
    """Devices, parallelism and the multi-node rendezvous."""

    TITLE: ClassVar[str] = "parallelism"

    device: str | None = _arg(
        None, "Device type. Default: cuda if torch sees a GPU, else cpu "
        "(see ServerArgs.resolved_device).", choices=("cuda", "cpu"))
    tp_size: int = _arg(
        1, "Tensor parallel size: total ranks across all nodes.",
        flags=("--tp", "--tensor-parallel-size"))
    dp_size: int = _arg(
        1, "Data parallel size: without --enable-dp-attention, this many independent replicas of --tp "
        "ranks each behind the one API (tp × dp ranks in all); with it, DP groups of tp / dp ranks.",
        flags=("--dp",))
    load_balance_method: str = _arg(
        "round_robin", "How requests are dealt to the DP groups (--dp-size > 1): in turn, or to the group "
        "with the fewest live sequences.", choices=LOAD_BALANCE_METHODS)
    ep_size: int = _arg(
        1, "Expert parallel size (MoE).", flags=("--ep", "--ep-size", "--expert-parallel-size"))
    nnodes: int = _arg(1, "Number of nodes.")
    node_rank: int = _arg(0, "Rank of this node, 0 .. nnodes-1 (0 serves HTTP).")
    dist_init_addr: str | None = _arg(
        None, "HOST:PORT of node 0 for the distributed rendezvous (torch.distributed "
        "tcp:// init and the cluster coordinator).", metavar="HOST:PORT")
    base_gpu_id: int = _arg(0, "First GPU index this node uses.")
    dist_timeout: int | None = _arg(
        None, "Timeout in seconds for distributed collectives once running (default 600).")
    startup_timeout: float = _arg(
        60.0, "Seconds node 0 waits for every node to join (it then names the missing ones); "
        "nodes r > 0 retry reaching node 0 (and resolving its name) for as long.")
    cluster_secret: str | None = _arg(
        None, "Shared secret every node proves it holds (HMAC challenge-response) before node 0 "
        "accepts its connections. Default: $MESHSERVE_CLUSTER_SECRET; node 0 generates one and "
        "prints it when none is given. Prefer the file or the variable: flags show in ps.")
    cluster_secret_file: str | None = _arg(
        None, "File holding the cluster secret (e.g. on shared storage; mode 600).", metavar="PATH")
    cluster_silence_timeout: float = _arg(
        15.0, "Seconds without any message from a node before it is declared dead (a stalled "
        "machine survives shorter pauses; closed connections are detected at once).")
    enable_dp_attention: bool = _arg(
        False, "Data-parallel attention with tensor/expert-parallel MoE layers.")
    enable_dp_lm_head: bool = _arg(
        False, "Data-parallel (vocabulary-replicated) LM head with DP attention.")
    moe_a2a_backend: str = _arg(
        "none", "All-to-all backend for expert parallel MoE.",
        choices=("none", "deepep", "mooncake"))
    ep_num_redundant_experts: int = _arg(
        0, "Extra physical expert slots per MoE layer holding copies of experts (at start experts 0, 1, ...; "
        "with --enable-eplb the hottest ones). Experts + these must divide by --ep.")
    enable_eplb: bool = _arg(
        False, "Expert-parallel load balancing: every --eplb-rebalance-num-iterations forward steps, place "
        "the MoE experts (and the redundant copies) anew from the measured loads and move their weights.")
    eplb_rebalance_num_iterations: int = _arg(
        1000, "Forward steps between EPLB rebalances (--enable-eplb).")


@dataclass(frozen=True)
class CacheArgs(_ConcernMixin):
    """KV cache sizing."""

    TITLE: ClassVar[str] = "kv cache"

    mem_fraction_static: float | None = _arg(
        None, "Fraction of GPU memory for weights + KV cache, in (0, 1). GPU only; on cpu "
        "size the cache with --max-total-tokens.")
    max_total_tokens: int | None = _arg(
        None, "KV cache capacity in tokens (overrides the memory-fraction sizing).")
    kv_cache_dtype: str = _arg(
        "auto", "KV cache storage: auto (the model's dtype) or fp8_e4m3 (half the bytes of bf16; one scale "
        "per layer for K and one for V, from the checkpoint's k_scale/v_scale or 1.0).",
        choices=KV_CACHE_DTYPES)
    page_size: int = _arg(1, "Tokens per KV cache page: KV is allocated, shared by the prefix cache and transferred (PD) in whole pages.")
    disable_radix_cache: bool = _arg(False, "Disable radix-tree prefix caching.")


@dataclass(frozen=True)
class SchedulerArgs(_ConcernMixin):
    """Batching, scheduling and per-step execution."""

    TITLE: ClassVar[str] = "scheduler"

    max_running_requests: int | None = _arg(
        None, "Maximum number of requests decoding at once; default derived from the KV pool.")
    max_prefill_tokens: int = _arg(16384, "Token budget of one prefill batch.")
    chunked_prefill_size: int | None = _arg(
        None, f"Split long prompts into prefill chunks of this many tokens; default "
        f"{DEFAULT_CHUNKED_PREFILL_SIZE} ({CPU_CHUNKED_PREFILL_SIZE} on cpu); -1 disables chunking.")
    schedule_policy: str = _arg(
        "lpm", "Waiting-queue order: lpm (longest cached prefix first), fcfs (arrival) or lof "
        "(longest output first: most tokens left to generate; for saturated runs with known output "
        "lengths, at the cost of arrival fairness).",
        choices=SCHEDULE_POLICIES)
    schedule_conservativeness: float = _arg(
        1.0, "Scales the KV head-room admission keeps for the tokens running requests may still "
        "generate (SGLang's meaning): the new-token ratio's start (0.7) and floor (0.1) are "
        "multiplied by it, capped at 1. Below 1 admits more at once and risks retractions; above "
        "1 admits less.")
    attention_backend: str | None = _arg(
        None, "Attention kernel backend; default picked per device.",
        choices=ATTENTION_BACKENDS)
    cuda_graph_max_bs: int | None = _arg(
        None, "Largest decode batch size captured in a CUDA graph.")
    disable_cuda_graph: bool = _arg(False, "Run decode eagerly, without CUDA graphs.")
    enable_mixed_chunk: bool = _arg(
        False, "Decode every running sequence inside each prefill step (one mixed batch), so "
        "prefills do not pause generation. Always on for cpu, where prefill steps are long.")
    disable_overlap_schedule: bool = _arg(
        False, "Run every step in lockstep. By default on CUDA the next decode step is scheduled "
        "while the device still runs the current one (one step in flight; hides the per-step host "
        "work); prefill steps run in lockstep either way.")
    enable_overlap_schedule: bool = _arg(
        False, "Overlap scheduling also on devices where it is off by default (the CPU, whose "
        "forward is synchronous: there it only delays each token by one step).")
    random_seed: int | None = _arg(None, "Random seed; default picked at start-up.")
    stream_interval: int = _arg(1, "Stream a chunk every this many generated tokens.")
    grammar_backend: str = _arg(
        "xgrammar", "Structured-output backend (JSON schema, regex, EBNF, forced tool calls; "
        "docs/structured-output.md). With none, structured requests are refused with a 400.",
        choices=("xgrammar", "none"))
    enable_deterministic_check: bool = _arg(
        False, "Debug: check every step that all ranks scheduled the same batch (hash "
        "comparison across ranks, DESIGN §2).")
    decode_log_interval: int = _arg(
        40, "Log the batch state (running and waiting requests, KV usage, generation rate) every "
        "this many decode steps; every prefill batch is logged too.")
    step_trace_file: str | None = _arg(
        None, "Debug: write one JSON line per forward step (mode, sequences, tokens, KV use, launch "
        "time) to this file, for profiling a run (`python -m meshserve.bench.step_trace FILE`). "
        "With --dp-size N each DP group writes its own file (.dpK before the suffix).")

    def resolved_overlap_schedule(self, device_type: str) -> bool:
        """Whether decode steps overlap: on CUDA unless disabled; elsewhere only when asked."""
        if self.disable_overlap_schedule:
            return False
        return self.enable_overlap_schedule or device_type == "cuda"

    def resolved_mixed_chunk(self, device_type: str) -> bool:
        """Whether prefill steps carry the running decodes: when asked, and always on the CPU."""
        return self.enable_mixed_chunk or device_type == "cpu"

    def resolved_chunked_prefill_size(self, device_type: str) -> int | None:
        """Chunk size in tokens, or ``None`` when chunking is disabled (``-1``)."""
        if self.chunked_prefill_size is None:
            return CPU_CHUNKED_PREFILL_SIZE if device_type == "cpu" else DEFAULT_CHUNKED_PREFILL_SIZE
        if self.chunked_prefill_size == -1:
            return None
        return self.chunked_prefill_size


@dataclass(frozen=True)
class HttpArgs(_ConcernMixin):
    """The HTTP front end."""

    TITLE: ClassVar[str] = "http server"

    host: str = _arg("127.0.0.1", "Address the HTTP server binds to.")
    port: int = _arg(30000, "HTTP port.")
    api_key: str | None = _arg(
        None, "Require 'Authorization: Bearer <key>' on API requests. Never printed.")
    log_level: str = _arg("info", "Logging level.", choices=LOG_LEVELS, convert=_lower)
    # Slow or hostile clients (issue 10, item 5): every connection gets an answer or is closed
    # within these bounds.
    http_header_timeout: float = _arg(
        10.0, "Seconds a client may take to send a request's headers; then the connection is closed.")
    http_body_timeout: float = _arg(
        30.0, "Seconds a client may take to send a request's whole body; then it gets a 408.")
    http_max_body_size: int = _arg(
        64 << 20, "Largest request body in bytes; a larger one gets a 413.")
    http_keep_alive_timeout: float = _arg(
        5.0, "Seconds an idle keep-alive connection stays open.")
    enable_metrics: bool = _arg(
        False, "Accepted for SGLang compatibility: meshserve always serves Prometheus "
        "metrics on /metrics.")
    tool_call_parser: str | None = _arg(
        None, "How the model writes tool calls in its output (docs/structured-output.md); default: "
        "from the model's architecture (qwen25 for Qwen2/3, llama3 for Llama).",
        choices=("hermes", "qwen", "qwen25", "llama3"))


@dataclass(frozen=True)
class DisaggArgs(_ConcernMixin):
    """Prefill-decode disaggregation."""

    TITLE: ClassVar[str] = "prefill-decode disaggregation"

    disaggregation_mode: str = _arg(
        "null", "Role of this server: null (both phases), prefill or decode.",
        choices=("null", "prefill", "decode"))
    disaggregation_ib_device: str | None = _arg(
        None, "Comma-separated RDMA devices for KV transfer (e.g. mlx5_0,mlx5_1).")
    disaggregation_transfer_backend: str = _arg(
        "nixl", "KV transfer backend between prefill and decode servers (both sides must use the same).",
        choices=("nixl", "mooncake"))
    disaggregation_bootstrap_port: int = _arg(
        8998, "Port of the prefill server's bootstrap service.")
    disaggregation_transfer_timeout: float = _arg(
        30.0, "Seconds each prefill-decode state (lookup, waiting for KV, transfer, acknowledgement) "
        "may last before the request fails with an error.")


# The concerns in ServerArgs field order: (ServerArgs attribute, dataclass).
_CONCERNS: tuple[tuple[str, type[_ConcernMixin]], ...] = (
    ("model", ModelArgs),
    ("parallel", ParallelArgs),
    ("cache", CacheArgs),
    ("scheduler", SchedulerArgs),
    ("http", HttpArgs),
    ("disagg", DisaggArgs),
)

# Flat field name -> concern attribute; also guarantees field names are unique (they are the
# argparse dests).
_CONCERN_OF: dict[str, str] = {}
for _attr, _cls in _CONCERNS:
    for _f in _cls.flag_fields():
        if _f.name in _CONCERN_OF:
            raise TypeError(f"field {_f.name} is declared by two concerns")
        _CONCERN_OF[_f.name] = _attr

# Secrets masked by ServerArgs.to_dict().
_SECRET_FIELDS = frozenset({"api_key", "cluster_secret"})
_MASK = "***"


# --------------------------------------------------------------------------------------------
# Refusals: flags that parse but whose feature is not built yet
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """One row of the refusal table: refuse ``field``'s flag when ``applies(args)``."""

    field: str
    applies: Callable[[ServerArgs], bool]
    reason: str


# Delete a row when its feature lands. Predicates see the whole ServerArgs.
REFUSALS: tuple[Refusal, ...] = (
    Refusal("moe_a2a_backend", lambda a: a.parallel.moe_a2a_backend not in ("none", "deepep"),
            "only the 'none' and 'deepep' MoE all-to-all backends are built"),
    Refusal("quantization", lambda a: a.model.quantization not in (None, *SERVED_QUANTIZATION),
            f"only {', '.join(SERVED_QUANTIZATION)} quantization is built"),
    Refusal("kv_cache_dtype", lambda a: a.cache.kv_cache_dtype not in ("auto", "fp8_e4m3"),
            "only auto and fp8_e4m3 KV caches are built"),
    Refusal("base_gpu_id",
            lambda a: a.parallel.base_gpu_id != 0 and a.resolved_device() == "cpu",
            "there are no GPU ids on cpu; use 0"),
)


# --------------------------------------------------------------------------------------------
# ServerArgs
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "meshserve.launch_server") -> argparse.ArgumentParser:
    """An argument parser for the server's flags (abbreviations disabled)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve an LLM with an OpenAI-compatible HTTP API.",
        allow_abbrev=False,
    )
    ServerArgs.add_cli_args(parser)
    return parser


@dataclass(frozen=True)
class ServerArgs:
    """All server arguments, grouped by concern (``args.parallel.tp_size``, ...).

    ``explicit_flags`` maps the field names given on the command line to the spelling the
    user typed (``{"tp_size": "--tp"}``); it is excluded from equality and hashing.
    """

    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    cache: CacheArgs = field(default_factory=CacheArgs)
    scheduler: SchedulerArgs = field(default_factory=SchedulerArgs)
    http: HttpArgs = field(default_factory=HttpArgs)
    disagg: DisaggArgs = field(default_factory=DisaggArgs)
    explicit_flags: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, repr=False
    )

    def __reduce__(self):
        # Scheduler processes are spawned with these arguments; a MappingProxyType cannot be
        # pickled, so hand the flags over as a plain dict (re-frozen by __post_init__).
        return (type(self), (self.model, self.parallel, self.cache, self.scheduler, self.http, self.disagg,
                             dict(self.explicit_flags)))

    def __post_init__(self) -> None:
        # Freeze the mapping even when a plain dict was passed in.
        if not isinstance(self.explicit_flags, types.MappingProxyType):
            object.__setattr__(
                self, "explicit_flags", types.MappingProxyType(dict(self.explicit_flags))
            )

    # ---- command line ------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Add every server flag to ``parser`` (one argument group per concern).

        Create ``parser`` with ``allow_abbrev=False`` (as :func:`build_parser` does) so that
        abbreviations such as ``--mod`` are rejected.
        """
        for _, concern in _CONCERNS:
            concern.add_cli_args(parser)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> ServerArgs:
        """Build ServerArgs from a namespace parsed by a parser set up with add_cli_args."""
        parts: dict[str, Any] = {}
        for attr, concern in _CONCERNS:
            values = {f.name: getattr(namespace, f.name) for f in concern.flag_fields()}
            parts[attr] = concern(**values)
        explicit = dict(getattr(namespace, _EXPLICIT_ATTR, None) or {})
        return cls(**parts, explicit_flags=explicit)

    @classmethod
    def parse_args(cls, argv: Sequence[str] | None = None) -> ServerArgs:
        """Parse ``argv`` (default ``sys.argv[1:]``) WITHOUT validating.

        Unknown or malformed flags exit with status 2 (argparse's behaviour).
        """
        parser = build_parser()
        namespace = parser.parse_args(list(argv) if argv is not None else None)
        return cls.from_namespace(namespace)

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> ServerArgs:
        """Parse and validate ``argv`` (default ``sys.argv[1:]``) for a command-line program.

        On any problem prints ``<prog>: error: <problem>`` (one line per problem) to stderr
        and exits with status 2. Library callers that want an exception use
        ``ServerArgs.parse_args(argv).validate()``.
        """
        parser = build_parser()
        args = cls.from_namespace(parser.parse_args(list(argv) if argv is not None else None))
        try:
            args.validate()
        except ServerArgsError as err:
            lines = "".join(f"{parser.prog}: error: {p}\n" for p in err.problems)
            parser.exit(2, lines)
        return args

    # ---- explicit flags and lookups ----------------------------------------------------

    def get(self, name: str) -> Any:
        """The value of a field by its flat name (``args.get("tp_size")``)."""
        return getattr(getattr(self, _CONCERN_OF[name]), name)

    def is_explicit(self, name: str) -> bool:
        """Whether field ``name`` was set by the user.

        True when the flag was given on the command line (even with its default value) or,
        for programmatically built args, when the value differs from the field's default.
        """
        if name in self.explicit_flags:
            return True
        concern = dict(_CONCERNS)[_CONCERN_OF[name]]
        default = {f.name: f.default for f in concern.flag_fields()}[name]
        return self.get(name) != default

    def flag_spelling(self, name: str) -> str:
        """The flag as the user typed it (``--tp``), else the primary flag (``--tp-size``)."""
        return self.explicit_flags.get(name, _primary_flag(name))

    def replace(self, **changes: Any) -> ServerArgs:
        """A copy with fields changed by flat name: ``args.replace(tp_size=2, port=0)``."""
        by_concern: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name not in _CONCERN_OF:
                raise TypeError(f"unknown server argument: {name}")
            by_concern.setdefault(_CONCERN_OF[name], {})[name] = value
        parts = {
            attr: dataclasses.replace(getattr(self, attr), **values)
            for attr, values in by_concern.items()
        }
        return dataclasses.replace(self, **parts)

    # ---- derived values ----------------------------------------------------------------

    def resolved_device(self) -> str:
        """``--device`` if given, else ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
        if self.parallel.device is not None:
            return self.parallel.device
        return "cuda" if cuda_is_available() else "cpu"

    # ---- validation --------------------------------------------------------------------

    def validate(self) -> ServerArgs:
        """Check every value; raise :class:`ServerArgsError` listing ALL problems.

        Value errors come first, then one ``not supported yet: ...`` line per refused flag.
        Returns ``self`` so that calls can be chained.
        """
        problems = list(self._value_problems())
        problems.extend(self._refusals())
        if problems:
            raise ServerArgsError(problems)
        return self

    def _iter_flag_values(self) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
        for attr, concern in _CONCERNS:
            part = getattr(self, attr)
            for f in concern.flag_fields():
                yield f, getattr(part, f.name)

    def _value_problems(self) -> Iterator[str]:
        # Choices (the parser checks them too; this covers programmatic construction).
        for f, value in self._iter_flag_values():
            choices = f.metadata["choices"]
            if choices is not None and value is not None and value not in choices:
                yield (f"{self.flag_spelling(f.name)}: invalid choice {value!r} "
                       f"(choose from {', '.join(choices)})")

        def at_least(name: str, minimum: int, *, optional: bool = False) -> Iterator[str]:
            value = self.get(name)
            if value is None and optional:
                return
            if value is None or value < minimum:
                yield f"{self.flag_spelling(name)} must be >= {minimum}, got {value}"

        def port(name: str) -> Iterator[str]:
            value = self.get(name)
            if not 1 <= value <= 65535:
                yield f"{self.flag_spelling(name)} must be a TCP port in 1..65535, got {value}"

        p, c, s = self.parallel, self.cache, self.scheduler

        # model
        yield from at_least("context_length", 1, optional=True)

        if s.enable_overlap_schedule and s.disable_overlap_schedule:
            yield "--enable-overlap-schedule and --disable-overlap-schedule contradict each other"

        # parallel
        for name in ("tp_size", "dp_size", "ep_size", "nnodes"):
            yield from at_least(name, 1)
        yield from at_least("base_gpu_id", 0)
        yield from at_least("ep_num_redundant_experts", 0)
        yield from at_least("eplb_rebalance_num_iterations", 1)
        yield from at_least("dist_timeout", 1, optional=True)
        if not p.startup_timeout >= 1:
            yield f"{self.flag_spelling('startup_timeout')} must be >= 1 second, got {p.startup_timeout}"
        if not p.cluster_silence_timeout >= 2:
            yield (f"{self.flag_spelling('cluster_silence_timeout')} must be >= 2 seconds (four "
                   f"heartbeats), got {p.cluster_silence_timeout}")
        if p.cluster_secret is not None and p.cluster_secret_file is not None:
            yield "--cluster-secret and --cluster-secret-file contradict each other; give one"
        if p.nnodes >= 1 and not 0 <= p.node_rank < p.nnodes:
            yield (f"{self.flag_spelling('node_rank')} must be in 0..{p.nnodes - 1} "
                   f"(--nnodes {p.nnodes}), got {p.node_rank}")
        if min(p.tp_size, p.dp_size, p.ep_size, p.nnodes) >= 1:
            problems = layout_problems(p.tp_size, p.dp_size, p.ep_size, p.enable_dp_attention)
            yield from problems
            layout = None if problems else GroupLayout(tp=p.tp_size, dp=p.dp_size, ep=p.ep_size,
                                                       dp_attention=p.enable_dp_attention)
            if layout is not None and layout.world_size % p.nnodes:
                ranks = (f"{self.flag_spelling('tp_size')} {p.tp_size}" if layout.replicas == 1 else
                         f"{layout.world_size} ranks ({self.flag_spelling('tp_size')} {p.tp_size} × "
                         f"{self.flag_spelling('dp_size')} {p.dp_size})")
                yield (f"{ranks} must be divisible by --nnodes {p.nnodes} "
                       "(every node runs the same number of ranks)")
        if p.enable_dp_lm_head and not p.enable_dp_attention:
            yield "--enable-dp-lm-head needs --enable-dp-attention (it splits the LM head within each DP group)"
        if p.nnodes > 1 and p.dist_init_addr is None:
            yield "--dist-init-addr HOST:PORT (node 0's address) is required when --nnodes > 1"
        if p.dist_init_addr is not None and not _is_host_port(p.dist_init_addr):
            yield (f"{self.flag_spelling('dist_init_addr')} must be HOST:PORT "
                   f"(e.g. 10.0.0.1:20000), got {p.dist_init_addr!r}")
        device = p.device
        if device == "cuda" and not cuda_is_available():
            yield ("--device cuda, but torch sees no CUDA device; use --device cpu "
                   "or leave --device out")

        # cache
        if c.mem_fraction_static is not None and not 0.0 < c.mem_fraction_static < 1.0:
            yield (f"{self.flag_spelling('mem_fraction_static')} must be in (0, 1), "
                   f"got {c.mem_fraction_static}")
        yield from at_least("max_total_tokens", 1, optional=True)
        yield from at_least("page_size", 1)

        # scheduler
        yield from at_least("max_running_requests", 1, optional=True)
        yield from at_least("max_prefill_tokens", 1)
        cps = s.chunked_prefill_size
        if cps is not None and cps != -1 and cps < 1:
            yield (f"{self.flag_spelling('chunked_prefill_size')} must be -1 (no chunking) "
                   f"or >= 1, got {cps}")
        yield from at_least("cuda_graph_max_bs", 1, optional=True)
        if not s.schedule_conservativeness > 0:  # NaN fails too
            yield (f"{self.flag_spelling('schedule_conservativeness')} must be > 0, "
                   f"got {s.schedule_conservativeness}")
        if s.attention_backend == "triton" and self.resolved_device() == "cpu":
            yield "--attention-backend triton needs --device cuda; on cpu use torch_native"
        yield from at_least("random_seed", 0, optional=True)
        yield from at_least("stream_interval", 1)
        yield from at_least("decode_log_interval", 1)

        # http / disagg
        yield from port("port")
        for name in ("http_header_timeout", "http_body_timeout", "http_keep_alive_timeout"):
            if not self.get(name) > 0:
                yield f"{self.flag_spelling(name)} must be > 0 seconds, got {self.get(name)}"
        yield from at_least("http_max_body_size", 1)
        yield from port("disaggregation_bootstrap_port")
        if not self.disagg.disaggregation_transfer_timeout > 0:
            yield (f"{self.flag_spelling('disaggregation_transfer_timeout')} must be > 0 seconds, "
                   f"got {self.disagg.disaggregation_transfer_timeout}")
        if not self.http.host:
            yield "--host must not be empty"

    def without_effect(self) -> list[str]:
        """Flags accepted but without effect here: one warning line each, for the start-up log.

        Deployment recipes (the seeds) pass GPU-only flags everywhere, so a CPU run accepts them
        rather than refusing a command line that is right for the GPU machines. Resolving the
        device may import torch: call this once the model checks have passed.
        """
        notes = []
        p = self.parallel
        if p.enable_dp_attention and p.dp_size > 1 and not p.enable_dp_lm_head:
            notes.append("--enable-dp-attention: the LM head is split within each DP group, as with "
                         "--enable-dp-lm-head (SGLang would split it over all --tp ranks)")
        if self.cache.mem_fraction_static is not None and self.resolved_device() == "cpu":
            notes.append(f"{self.flag_spelling('mem_fraction_static')} sizes GPU memory and has no effect on cpu; "
                         "the KV cache is sized by --max-total-tokens there")
        return notes

    def _refusals(self) -> Iterator[str]:
        for row in REFUSALS:
            if not row.applies(self):
                continue
            value = self.get(row.field)
            shown = self.flag_spelling(row.field)
            if not isinstance(value, bool):
                shown += f" {value}"
            yield f"not supported yet: {shown} ({row.reason})"

    # ---- serialization -----------------------------------------------------------------

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, dict[str, Any]]:
        """Nested ``{concern: {field: value}}``; secrets (api_key) become ``"***"`` when set.

        The redacted form is what /get_server_info returns. ``redact_secrets=False`` gives a
        form that :meth:`from_dict` turns back into equal ServerArgs (e.g. for child processes).
        """
        out: dict[str, dict[str, Any]] = {}
        for attr, _ in _CONCERNS:
            values = dataclasses.asdict(getattr(self, attr))
            if redact_secrets:
                for key in _SECRET_FIELDS & values.keys():
                    if values[key] is not None:
                        values[key] = _MASK
            out[attr] = values
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> ServerArgs:
        """Inverse of ``to_dict(redact_secrets=False)``; missing keys take defaults."""
        parts = {attr: concern(**dict(data.get(attr, {}))) for attr, concern in _CONCERNS}
        return cls(**parts)


def _is_host_port(value: str) -> bool:
    """``host:port`` or ``[ipv6]:port`` with a port in 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        return False
    if host.startswith("[") != host.endswith("]"):
        return False
    return 1 <= int(port) <= 65535


def main(argv: Sequence[str] | None = None) -> int:
    """Print the validated arguments as JSON (a debugging aid: ``python -m ...server_args``)."""
    import json

    args = ServerArgs.from_cli(argv)
    json.dump(args.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
