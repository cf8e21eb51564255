"""Tests for meshserve.config.server_args: flags, defaults, validation and refusals."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from meshserve.config import server_args as sa
from meshserve.config.server_args import (
    CacheArgs,
    DisaggArgs,
    HttpArgs,
    ModelArgs,
    ParallelArgs,
    SchedulerArgs,
    ServerArgs,
    ServerArgsError,
    build_parser,
)

SEEDS_DIR = Path("/work/shared/seeds")


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend torch sees no GPU, so that device resolution is deterministic."""
    monkeypatch.setattr(sa, "cuda_is_available", lambda: False)


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend torch sees a GPU."""
    monkeypatch.setattr(sa, "cuda_is_available", lambda: True)


def problems_of(argv: list[str]) -> tuple[str, ...]:
    """Parse argv and return the validation problems (empty when valid)."""
    try:
        ServerArgs.parse_args(argv).validate()
    except ServerArgsError as err:
        return err.problems
    return ()


# ---------------------------------------------------------------------------------------------
# Defaults and parsing
# ---------------------------------------------------------------------------------------------


def test_defaults_follow_sglang(on_cpu: None) -> None:
    args = ServerArgs.from_cli([])
    assert args == ServerArgs()
    assert args.http.host == "127.0.0.1"
    assert args.http.port == 30000
    assert args.disagg.disaggregation_bootstrap_port == 8998
    assert args.disagg.disaggregation_mode == "null"
    assert args.disagg.disaggregation_transfer_backend == "nixl"  # not SGLang's mooncake: see docs/disaggregation.md
    assert args.disagg.disaggregation_transfer_timeout == 30.0
    assert args.scheduler.max_prefill_tokens == 16384
    assert args.scheduler.schedule_policy == "lpm"
    assert args.scheduler.schedule_conservativeness == 1.0
    assert args.scheduler.grammar_backend == "xgrammar"
    assert args.scheduler.stream_interval == 1
    assert args.model.model_path is None  # embedded default model
    assert args.model.dtype == "auto"
    assert args.parallel.tp_size == args.parallel.dp_size == args.parallel.ep_size == 1
    assert args.parallel.nnodes == 1 and args.parallel.node_rank == 0
    assert args.parallel.moe_a2a_backend == "none"
    assert args.cache.page_size == 1
    assert args.cache.disable_radix_cache is False
    assert args.http.log_level == "info"
    assert dict(args.explicit_flags) == {}


def test_dataclass_defaults_equal_parser_defaults() -> None:
    namespace = build_parser().parse_args([])
    for concern in (ModelArgs, ParallelArgs, CacheArgs, SchedulerArgs, HttpArgs, DisaggArgs):
        for f in dataclasses.fields(concern):
            assert getattr(namespace, f.name) == f.default, f.name


def test_every_field_is_a_flag_and_every_flag_a_field() -> None:
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    fields = {
        f.name
        for concern in (ModelArgs, ParallelArgs, CacheArgs, SchedulerArgs, HttpArgs, DisaggArgs)
        for f in dataclasses.fields(concern)
    }
    assert dests == fields


@pytest.mark.parametrize(
    ("argv", "name", "expected"),
    [
        (["--model-path", "/m"], "model_path", "/m"),
        (["--model", "/m"], "model_path", "/m"),
        (["--tp-size", "4"], "tp_size", 4),
        (["--tp", "4"], "tp_size", 4),
        (["--tensor-parallel-size", "4"], "tp_size", 4),
        (["--dp-size", "2"], "dp_size", 2),
        (["--dp", "2"], "dp_size", 2),
        (["--ep-size", "8"], "ep_size", 8),
        (["--ep", "8"], "ep_size", 8),
        (["--expert-parallel-size", "8"], "ep_size", 8),
        (["--dtype", "half"], "dtype", "float16"),
        (["--dtype", "float"], "dtype", "float32"),
        (["--dtype", "bf16"], "dtype", "bfloat16"),
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--chunked-prefill-size", "-1"], "chunked_prefill_size", -1),
        (["--mem-fraction-static", "0.8"], "mem_fraction_static", 0.8),
        (["--log-level", "DEBUG"], "log_level", "debug"),
        (["--attention-backend", "torch_native"], "attention_backend", "torch_native"),
        (["--schedule-conservativeness", "0.3"], "schedule_conservativeness", 0.3),
    ],
)
def test_flag_spellings(argv: list[str], name: str, expected: object) -> None:
    args = ServerArgs.parse_args(argv)
    assert args.get(name) == expected
    assert args.explicit_flags[name] == argv[0]


def test_grouped_access() -> None:
    args = ServerArgs.parse_args(["--tp", "2", "--port", "8080", "--page-size", "1"])
    assert args.parallel.tp_size == 2
    assert args.http.port == 8080
    assert args.cache.page_size == 1


@pytest.mark.parametrize(
    ("flag", "concern", "name"),
    [
        ("--trust-remote-code", "model", "trust_remote_code"),
        ("--skip-tokenizer-init", "model", "skip_tokenizer_init"),
        ("--enable-dp-attention", "parallel", "enable_dp_attention"),
        ("--enable-dp-lm-head", "parallel", "enable_dp_lm_head"),
        ("--disable-radix-cache", "cache", "disable_radix_cache"),
        ("--disable-cuda-graph", "scheduler", "disable_cuda_graph"),
        ("--enable-deterministic-check", "scheduler", "enable_deterministic_check"),
        ("--enable-metrics", "http", "enable_metrics"),
    ],
)
def test_boolean_switches(flag: str, concern: str, name: str) -> None:
    assert getattr(getattr(ServerArgs.parse_args([]), concern), name) is False
    assert getattr(getattr(ServerArgs.parse_args([flag]), concern), name) is True
    with pytest.raises(SystemExit) as exc:  # store_true: no value
        ServerArgs.parse_args([f"{flag}=true"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-flag"],
        ["--mod", "/m"],  # abbreviation of --model / --model-path
        ["--tp-s", "2"],  # abbreviation of --tp-size
        ["--disable-radix"],
        ["--dtype", "int8"],
        ["--schedule-policy", "random"],
        ["--attention-backend", "flashinfer"],
        ["--device", "tpu"],
        ["--tp", "two"],
        ["positional"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ServerArgs.from_cli(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_overlap_schedule_resolution() -> None:
    """On by default where the device runs asynchronously (CUDA), off on the CPU unless asked."""
    assert SchedulerArgs().resolved_overlap_schedule("cuda")
    assert not SchedulerArgs().resolved_overlap_schedule("cpu")
    assert SchedulerArgs(enable_overlap_schedule=True).resolved_overlap_schedule("cpu")
    assert not SchedulerArgs(disable_overlap_schedule=True).resolved_overlap_schedule("cuda")


def test_chunked_prefill_resolution() -> None:
    assert ServerArgs().scheduler.resolved_chunked_prefill_size("cuda") == sa.DEFAULT_CHUNKED_PREFILL_SIZE
    assert ServerArgs().scheduler.resolved_chunked_prefill_size("cpu") == sa.CPU_CHUNKED_PREFILL_SIZE
    assert SchedulerArgs(chunked_prefill_size=-1).resolved_chunked_prefill_size("cpu") is None
    assert SchedulerArgs(chunked_prefill_size=512).resolved_chunked_prefill_size("cuda") == 512


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "0"], "--port must be a TCP port in 1..65535, got 0"),
        (["--port", "70000"], "--port must be a TCP port"),
        (["--disaggregation-bootstrap-port", "-5"], "--disaggregation-bootstrap-port must be"),
        (["--tp", "0"], "--tp must be >= 1, got 0"),
        (["--dp-size", "-1"], "--dp-size must be >= 1"),
        (["--nnodes", "0"], "--nnodes must be >= 1"),
        (["--node-rank", "2", "--nnodes", "2"], "--node-rank must be in 0..1"),
        (["--mem-fraction-static", "0"], "--mem-fraction-static must be in (0, 1), got 0.0"),
        (["--mem-fraction-static", "1.0"], "must be in (0, 1)"),
        (["--mem-fraction-static", "1.5"], "must be in (0, 1)"),
        (["--max-total-tokens", "0"], "--max-total-tokens must be >= 1"),
        (["--page-size", "0"], "--page-size must be >= 1"),
        (["--chunked-prefill-size", "0"], "must be -1 (no chunking) or >= 1, got 0"),
        (["--chunked-prefill-size", "-2"], "must be -1 (no chunking) or >= 1, got -2"),
        (["--max-prefill-tokens", "0"], "--max-prefill-tokens must be >= 1"),
        (["--max-running-requests", "0"], "--max-running-requests must be >= 1"),
        (["--stream-interval", "0"], "--stream-interval must be >= 1"),
        (["--cuda-graph-max-bs", "0"], "--cuda-graph-max-bs must be >= 1"),
        (["--context-length", "0"], "--context-length must be >= 1"),
        (["--dist-timeout", "0"], "--dist-timeout must be >= 1"),
        (["--dist-init-addr", "nohost"], "must be HOST:PORT"),
        (["--base-gpu-id", "-1"], "--base-gpu-id must be >= 0"),
        (["--host", ""], "--host must not be empty"),
        (["--enable-overlap-schedule", "--disable-overlap-schedule"], "contradict each other"),
        (["--schedule-conservativeness", "0"], "--schedule-conservativeness must be > 0, got 0.0"),
        (["--schedule-conservativeness", "-0.5"], "--schedule-conservativeness must be > 0, got -0.5"),
        (["--schedule-conservativeness", "nan"], "--schedule-conservativeness must be > 0, got nan"),
    ],
)
def test_value_errors(on_gpu: None, argv: list[str], needle: str) -> None:
    problems = problems_of(argv)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--chunked-prefill-size", "-1"],
        ["--chunked-prefill-size", "1"],
        ["--max-total-tokens", "4096", "--page-size", "1"],
        ["--port", "1"],
        ["--port", "65535"],
        ["--random-seed", "0"],
        ["--disaggregation-bootstrap-port", "8998", "--disaggregation-mode", "null"],
        ["--model", "/m", "--served-model-name", "x", "--trust-remote-code", "--skip-tokenizer-init"],
        ["--enable-metrics", "--api-key", "k", "--host", "0.0.0.0"],
        ["--moe-a2a-backend", "none", "--tp", "1", "--nnodes", "1", "--node-rank", "0"],
        ["--grammar-backend", "xgrammar", "--schedule-policy", "fcfs"],
        ["--schedule-conservativeness", "0.1"],
        ["--schedule-conservativeness", "2.5"],
    ],
)
def test_valid_on_cpu(on_cpu: None, argv: list[str]) -> None:
    assert problems_of(argv) == ()


def test_mem_fraction_static_accepted_on_cpu_with_a_warning(on_cpu: None) -> None:
    # The seeds pass it on every command line; on cpu it is accepted and said to have no effect.
    for argv in (["--device", "cpu", "--mem-fraction-static", "0.8"], ["--mem-fraction-static", "0.8"]):
        assert problems_of(argv) == ()
        (note,) = ServerArgs.parse_args(argv).without_effect()
        assert "--mem-fraction-static" in note and "no effect on cpu" in note
    assert ServerArgs.parse_args(["--device", "cpu"]).without_effect() == []


def test_mem_fraction_static_fine_on_gpu(on_gpu: None) -> None:
    assert problems_of(["--mem-fraction-static", "0.8"]) == ()
    assert problems_of(["--device", "cuda", "--mem-fraction-static", "0.8"]) == ()
    assert ServerArgs.parse_args(["--mem-fraction-static", "0.8"]).without_effect() == []


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa, "cuda_is_available", lambda: False)
    assert ServerArgs().resolved_device() == "cpu"
    assert ServerArgs.parse_args(["--device", "cuda"]).resolved_device() == "cuda"
    (problem,) = problems_of(["--device", "cuda"])
    assert "no CUDA device" in problem
    monkeypatch.setattr(sa, "cuda_is_available", lambda: True)
    assert ServerArgs().resolved_device() == "cuda"
    assert ServerArgs.parse_args(["--device", "cpu"]).resolved_device() == "cpu"


def test_programmatic_choices_checked(on_cpu: None) -> None:
    args = ServerArgs(scheduler=SchedulerArgs(schedule_policy="random"))
    with pytest.raises(ServerArgsError, match="invalid choice 'random'"):
        args.validate()
    assert ModelArgs(dtype="half").dtype == "float16"


def test_all_problems_reported_together(on_cpu: None) -> None:
    problems = problems_of(["--port", "0", "--page-size", "0", "--tp", "2", "--kv-cache-dtype", "fp8_e5m2",
                            "--disaggregation-mode", "prefill", "--moe-a2a-backend", "mooncake"])
    assert len(problems) == 4
    # value errors first, then refusals
    assert problems[0].startswith("--page-size") or problems[0].startswith("--port")
    assert problems[-1].startswith("not supported yet: ")


def test_from_cli_prints_every_problem_and_exits_2(
    on_cpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        ServerArgs.from_cli(["--tp", "16", "--dp-size", "16", "--ep", "16", "--nnodes", "2",
                             "--dist-init-addr", "10.0.0.1:5000", "--moe-a2a-backend", "mooncake",
                             "--kv-cache-dtype", "fp8_e5m2"])
    assert exc.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 2  # --ep and --dp-size are built
    assert all("error: not supported yet: " in line for line in err_lines)
    assert "--moe-a2a-backend mooncake" in err_lines[0] and "--kv-cache-dtype fp8_e5m2" in err_lines[1]


def test_validate_returns_self(on_cpu: None) -> None:
    args = ServerArgs()
    assert args.validate() is args


# ---------------------------------------------------------------------------------------------
# Refusals of features not built yet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--moe-a2a-backend", "mooncake"], "not supported yet: --moe-a2a-backend mooncake ("),
        (["--base-gpu-id", "1"], "not supported yet: --base-gpu-id 1"),
    ],
)
def test_refusals(on_cpu: None, argv: list[str], needle: str) -> None:
    problems = problems_of(argv)
    assert any(p.startswith(needle) for p in problems), problems


@pytest.mark.parametrize("argv", [
    ["--dp-size", "2", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:5000"],
    ["--tp", "16", "--ep", "16", "--dp-size", "16", "--enable-dp-attention", "--enable-dp-lm-head",
     "--moe-a2a-backend", "deepep", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:20000"],
    ["--dp", "2", "--disaggregation-mode", "prefill"],
    ["--tp", "16", "--dp-size", "16", "--enable-dp-attention", "--nnodes", "2", "--dist-init-addr",
     "10.0.0.1:5000", "--disaggregation-mode", "decode"],
])
def test_data_parallelism_across_nodes_and_with_disaggregation_is_accepted(on_cpu: None, argv: list[str]) -> None:
    assert problems_of(argv) == ()


def test_base_gpu_id_allowed_on_gpu(on_gpu: None) -> None:
    assert problems_of(["--base-gpu-id", "1"]) == ()


def test_page_size_is_accepted(on_cpu: None) -> None:
    assert problems_of(["--page-size", "16"]) == ()


def test_default_values_are_not_refused(on_cpu: None) -> None:
    assert problems_of([]) == ()
    assert not ServerArgs().is_explicit("disaggregation_transfer_backend")


def test_programmatic_non_default_counts_as_explicit(on_cpu: None) -> None:
    args = ServerArgs(disagg=DisaggArgs(disaggregation_transfer_backend="mooncake"))
    assert args.is_explicit("disaggregation_transfer_backend")


def test_disaggregation_flags_are_accepted(on_cpu: None) -> None:
    for argv in (["--disaggregation-mode", "prefill", "--tp", "2", "--disaggregation-transfer-backend", "mooncake"],
                 ["--disaggregation-mode", "decode", "--disaggregation-ib-device", "mlx5_0"]):
        assert problems_of(argv) == ()  # a named RDMA device is checked at start-up, on its machine
    assert problems_of(["--disaggregation-transfer-timeout", "0"]) == (
        "--disaggregation-transfer-timeout must be > 0 seconds, got 0.0",)


def test_refusal_table_rows_name_real_fields() -> None:
    for row in sa.REFUSALS:
        ServerArgs().get(row.field)  # raises KeyError on a typo
        assert row.reason


def test_refusal_message_example_from_brief(on_cpu: None) -> None:
    message = str(pytest.raises(ServerArgsError, ServerArgs.parse_args(
        ["--tp", "16", "--dp-size", "16", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:5000",
         "--kv-cache-dtype", "fp8_e5m2", "--moe-a2a-backend", "mooncake"]).validate).value)
    lines = message.splitlines()
    assert len(lines) == 2
    assert "--moe-a2a-backend" in lines[0] and "--kv-cache-dtype" in lines[1]


# ---------------------------------------------------------------------------------------------
# Serialization and immutability
# ---------------------------------------------------------------------------------------------


def test_to_dict_hides_api_key() -> None:
    args = ServerArgs.parse_args(["--api-key", "sk-secret", "--tp", "2"])
    data = args.to_dict()
    assert set(data) == {"model", "parallel", "cache", "scheduler", "http", "disagg"}
    assert data["http"]["api_key"] == "***"
    assert "sk-secret" not in repr(data)
    assert data["parallel"]["tp_size"] == 2
    assert ServerArgs().to_dict()["http"]["api_key"] is None


def test_to_dict_round_trip() -> None:
    args = ServerArgs.parse_args(["--api-key", "k", "--model", "/m", "--chunked-prefill-size", "-1"])
    assert ServerArgs.from_dict(args.to_dict(redact_secrets=False)) == args


def test_frozen() -> None:
    args = ServerArgs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.parallel = ParallelArgs()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.parallel.tp_size = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        args.explicit_flags["tp_size"] = "--tp"  # type: ignore[index]
    hash(args)  # usable as a dict key / in fingerprints


def test_replace_by_flat_name() -> None:
    args = ServerArgs().replace(tp_size=2, port=8080)
    assert args.parallel.tp_size == 2 and args.http.port == 8080
    assert ServerArgs().parallel.tp_size == 1
    with pytest.raises(TypeError):
        ServerArgs().replace(no_such=1)


def test_add_cli_args_on_foreign_parser() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--extra", type=int, default=0)
    ServerArgs.add_cli_args(parser)
    namespace = parser.parse_args(["--extra", "3", "--tp", "2"])
    assert namespace.extra == 3
    args = ServerArgs.from_namespace(namespace)
    assert args.parallel.tp_size == 2 and dict(args.explicit_flags) == {"tp_size": "--tp"}


# ---------------------------------------------------------------------------------------------
# Command lines from the seeds (user deployments) must parse, and be refused flag by flag
# ---------------------------------------------------------------------------------------------

# Plausible values for the shell variables used in the seed scripts.
SHELL_VALUES = {
    "model": "/models/llama",
    "tp_size": "16",
    "NCCL_INIT_ADDR": "node0:8000",
    "SLURM_NODEID": "1",
    "i": "1",
    "POD_INDEX": "1",
}

_LAUNCH = re.compile(
    r"(?:python3?\s+-m\s+sglang\.launch_server|python3?\s+components/(?:decode_)?worker\.py)"
)
_YAML_LAUNCH = re.compile(r"^(\s*)-\s+sglang\.launch_server\s*$")
_VAR = re.compile(r"\$\{(\w+)\}|\$\((\w+)\)|\$(\w+)")


def _substitute(text: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in SHELL_VALUES, f"no test value for shell variable ${name}"
        return SHELL_VALUES[name]

    return _VAR.sub(value, text)


def _seed_command_lines(text: str) -> list[list[str]]:
    """argv lists of every launch_server / worker invocation in a seed file."""
    commands: list[list[str]] = []
    # Shell form: join backslash continuations, then take what follows the launcher.
    # A dangling backslash before a closing code fence is a typo in the seed: drop it.
    text = re.sub(r"\\[ \t]*\n(?=```)", "\n", text)
    for line in re.sub(r"\\[ \t]*\n", " ", text).splitlines():
        match = _LAUNCH.search(line)
        if not match:
            continue
        rest = line[match.end():].strip()
        rest = rest.rstrip("&").strip()
        if rest.count('"') % 2:  # ssh host "python3 -m ... --node-rank $i"
            rest = rest[: rest.rindex('"')]
        tokens = [t for t in shlex.split(_substitute(rest)) if t != "..."]
        commands.append(tokens)
    # Kubernetes form: a YAML list after "- sglang.launch_server".
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _YAML_LAUNCH.match(line)
        if not match:
            continue
        item = re.compile(rf"^{re.escape(match.group(1))}-\s+(.*)$")
        tokens = []
        for following in lines[index + 1:]:
            item_match = item.match(following)
            if not item_match:
                break
            tokens.extend(shlex.split(_substitute(item_match.group(1))))
        commands.append(tokens)
    return commands


def _all_seed_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(SEEDS_DIR.glob("*.txt")):
        text = path.read_text()
        commands = _seed_command_lines(text)
        # Every mention of a launcher must have been extracted.
        assert len(commands) == len(re.findall(r"sglang\.launch_server|components/\w*worker\.py", text))
        found.extend((f"{path.name}#{n}", argv) for n, argv in enumerate(commands))
    return found


SEED_COMMANDS = _all_seed_commands() if SEEDS_DIR.is_dir() else []

@pytest.mark.skipif(not SEED_COMMANDS, reason="seed files not available")
def test_seed_extraction_found_the_known_deployments() -> None:
    flat = [" ".join(argv) for _, argv in SEED_COMMANDS]
    assert len(SEED_COMMANDS) >= 20
    assert any("--tensor-parallel-size 16" in c and "--model /llm-folder" in c for c in flat)
    assert any("--disaggregation-transfer-backend nixl" in c for c in flat)
    assert any("--moe-a2a-backend deepep" in c for c in flat)
    assert any("--node-rank 1" in c and "--nnodes 4" in c for c in flat)


@pytest.mark.skipif(not SEED_COMMANDS, reason="seed files not available")
@pytest.mark.parametrize(("where", "argv"), SEED_COMMANDS, ids=[w for w, _ in SEED_COMMANDS])
def test_seed_command_lines_parse_and_validate(on_gpu: None, where: str, argv: list[str]) -> None:
    args = ServerArgs.parse_args(argv)  # SystemExit(2) on any unknown flag
    try:
        args.validate()
        problems: tuple[str, ...] = ()
    except ServerArgsError as err:
        problems = err.problems
    assert problems == (), problems  # every seed deployment's flags are built


def test_kubernetes_spellings(on_gpu: None) -> None:
    argv = ["--model", "/llm-folder", "--dist-init-addr", "sglang-0.default.svc.cluster.local:5000",
            "--tensor-parallel-size", "16", "--nnodes", "2", "--node-rank", "0"]
    args = ServerArgs.parse_args(argv)
    assert args.model.model_path == "/llm-folder"
    assert args.parallel.tp_size == 16
    assert args.parallel.dist_init_addr == "sglang-0.default.svc.cluster.local:5000"
    assert args.validate() is args  # multi-node tensor parallelism is built: nothing refused


def test_attention_backend_choices_match_the_registry() -> None:
    from meshserve.layers.attention import ATTENTION_BACKENDS as REGISTRY

    assert sa.ATTENTION_BACKENDS == tuple(REGISTRY)


def test_eplb_flags(on_cpu: None) -> None:
    args = ServerArgs.parse_args(["--ep", "2", "--ep-num-redundant-experts", "2", "--enable-eplb",
                                  "--eplb-rebalance-num-iterations", "50"])
    assert (args.parallel.enable_eplb, args.parallel.eplb_rebalance_num_iterations) == (True, 50)
    assert ServerArgs().parallel.eplb_rebalance_num_iterations == 1000  # SGLang's default
    assert problems_of(["--enable-eplb", "--eplb-rebalance-num-iterations", "0"]) == (
        "--eplb-rebalance-num-iterations must be >= 1, got 0",)
