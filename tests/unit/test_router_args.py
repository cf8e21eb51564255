"""The router's command line (sglang-router's flags) and its torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshserve.router.args import PrefillServer, parse_router_args

REPO = Path(__file__).resolve().parents[2]


def test_regular_mode_defaults_and_flags() -> None:
    args = parse_router_args(["--worker-urls", "http://a:1/", "http://b:2", "--policy", "round_robin",
                              "--api-key", "k", "--health-check-interval-secs", "2", "--health-failure-threshold", "4",
                              "--retry-max-retries", "1", "--cb-failure-threshold", "2",
                              "--request-timeout-secs", "30", "--max-payload-size", "4096"])
    assert args.worker_urls == ("http://a:1", "http://b:2")
    assert (args.host, args.port, args.policy, args.api_key) == ("127.0.0.1", 30000, "round_robin", "k")
    assert (args.health.interval_s, args.health.failure_threshold, args.max_retries, args.cb_failure_threshold,
            args.request_timeout_s, args.max_payload_size) == (2.0, 4, 1, 2, 30.0, 4096)
    assert parse_router_args([]).policy == "cache_aware"  # sglang-router's default


def test_pd_mode_prefills_with_and_without_bootstrap_ports() -> None:
    args = parse_router_args(["--pd-disaggregation", "--prefill", "http://p1:30000", "8998",
                              "--prefill", "http://p2:30000", "--prefill", "http://p3:30000", "none",
                              "--decode", "http://d1:30000", "--decode", "http://d2:30000",
                              "--prefill-policy", "round_robin", "--decode-policy", "power_of_two"])
    assert args.prefill == (PrefillServer("http://p1:30000", 8998), PrefillServer("http://p2:30000"),
                            PrefillServer("http://p3:30000"))
    assert args.decode == ("http://d1:30000", "http://d2:30000")
    assert (args.prefill_policy_name, args.decode_policy_name) == ("round_robin", "power_of_two")
    assert parse_router_args(["--pd-disaggregation", "--prefill", "http://p", "--decode", "http://d",
                              "--policy", "random"]).decode_policy_name == "random"


@pytest.mark.parametrize(("argv", "named"), [
    (["--no-such-flag"], "--no-such-flag"),
    (["--worker"], "--worker"),  # an abbreviation of --worker-urls is not accepted
    (["--service-discovery"], "--service-discovery"),
    (["--prometheus-port=29000"], "--prometheus-port"),
    (["--policy", "fastest"], "--policy"),
    (["--pd-disaggregation", "--decode", "http://d"], "--prefill"),
    (["--pd-disaggregation", "--prefill", "http://p", "--decode", "http://d", "--worker-urls", "http://w"],
     "--worker-urls"),
    (["--prefill", "http://p", "--decode", "http://d"], "--pd-disaggregation"),
    (["--pd-disaggregation", "--prefill", "http://p", "80x", "--decode", "http://d"], "bootstrap port"),
    (["--pd-disaggregation", "--prefill", "http://p", "1", "2", "--decode", "http://d"], "--prefill"),
    (["--prefill-policy", "random"], "--prefill-policy"),
    (["--health-check-interval-secs", "0"], "--health-check-interval-secs"),
    (["--retry-max-retries", "-1"], "--retry-max-retries"),
])
def test_bad_command_lines_are_refused_by_name(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_router_args(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_the_router_imports_no_torch() -> None:
    """The module as `python -m` runs it (up to the parse), the app, and the meshserve command."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['meshserve.launch_router', '--help']\n"
        "try:\n"
        "    runpy.run_module('meshserve.launch_router', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import meshserve.router.app, meshserve.__main__\n"
        "from meshserve.router.app import create_router_app\n"
        "from meshserve.router.args import parse_router_args\n"
        "create_router_app(parse_router_args(['--worker-urls', 'http://127.0.0.1:9']))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("no torch"), done.stderr
    assert "--worker-urls" in done.stdout


def test_meshserve_router_command_is_the_launcher() -> None:
    done = subprocess.run([sys.executable, "-m", "meshserve", "router", "--bogus"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--bogus" in done.stderr
