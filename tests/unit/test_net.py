"""Tests for meshserve.cluster.net (interface choice) and meshserve.cluster.port_plan.

Interface choice is tested on an injected interface table and route function, so that no
packet leaves loopback; the real-socket paths are exercised on loopback, and, when running as
root with `ip`, across two network namespaces joined by a veth pair that the test creates.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshserve.cluster import net
from meshserve.cluster.net import (
    ClusterNet,
    HostPort,
    IfnameSpec,
    Interface,
    NetError,
    choose_cluster_interface,
    export_for_torch,
    resolve_host,
)
from meshserve.cluster.port_plan import PortPlan, PortPlanError
from meshserve.config.server_args import ServerArgs
from tests import netns

ip = ipaddress.ip_address


def iface(name: str, *addrs: str, index: int = 0, up: bool = True) -> Interface:
    return Interface(name=name, index=index, up=up, addresses=tuple(ip(a) for a in addrs))


# A machine with the usual traps: docker bridge, an IB-over-IP interface, one interface down.
FAKE = [
    iface("lo", "127.0.0.1", "::1", index=1),
    iface("docker0", "172.17.0.1", index=2),
    iface("eth0", "10.0.0.2", "fd00::2", "fe80::2%eth0", index=3),
    iface("ib0", "10.1.0.2", index=4),
    iface("eth1", "10.2.0.2", index=5, up=False),
]
# Which source address the kernel would pick for each destination.
ROUTES = {"10.0.0.1": "10.0.0.2", "10.1.0.1": "10.1.0.2", "fd00::1": "fd00::2",
          "127.0.0.1": "127.0.0.1", "127.0.1.1": "127.0.0.1", "172.17.0.5": "172.17.0.1"}


def fake_route(dest: ipaddress.IPv4Address | ipaddress.IPv6Address):
    return ip(ROUTES[str(dest)])


def choose(addr: str, nnodes: int = 2, env: dict[str, str] | None = None,
           names: dict[str, str] | None = None) -> ClusterNet:
    """choose_cluster_interface on the fake machine; `names` maps host names to addresses."""
    names = names or {}
    return choose_cluster_interface(
        HostPort.parse(addr), nnodes, deadline=time.monotonic() + 1, environ=env or {},
        interfaces=FAKE, resolve=lambda host, _deadline: ip(names.get(host, host)),
        route=fake_route)


# ---- HOST:PORT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("10.0.0.1:20000", "10.0.0.1", 20000),
    ("node0.cluster.local:29500", "node0.cluster.local", 29500),
    ("[::1]:5000", "::1", 5000),
    ("[fd00::1]:65535", "fd00::1", 65535),
    ("[fe80::1%eth0]:5000", "fe80::1%eth0", 5000),
])
def test_host_port_parses_ipv4_names_and_bracketed_ipv6(text: str, host: str, port: int) -> None:
    parsed = HostPort.parse(text)
    assert (parsed.host, parsed.port) == (host, port)
    assert str(parsed) == text


@pytest.mark.parametrize(("text", "needle"), [
    ("::1:5000", "brackets"),
    ("10.0.0.1", "HOST:PORT"),
    ("10.0.0.1:0", "1..65535"),
    ("10.0.0.1:70000", "1..65535"),
    ("[::1]5000", "[IPV6]:PORT"),
    (":5000", "empty"),
])
def test_host_port_rejects_malformed(text: str, needle: str) -> None:
    with pytest.raises(NetError, match=r".*" + needle.replace("[", r"\[").replace("]", r"\]")):
        HostPort.parse(text)


# ---- NCCL's SOCKET_IFNAME syntax ---------------------------------------------------------------


def test_ifname_exclusion_list() -> None:
    spec = IfnameSpec.parse("^lo,docker")
    assert spec.exclude and not spec.exact and spec.names == ("lo", "docker")
    assert [i.name for i in FAKE if spec.matches(i.name)] == ["eth0", "ib0", "eth1"]


def test_ifname_exact_match() -> None:
    spec = IfnameSpec.parse("=eth0")
    assert spec.matches("eth0")
    assert not spec.matches("eth0.100") and not spec.matches("eth1")


def test_ifname_prefix_comma_list() -> None:
    spec = IfnameSpec.parse("eth, ib")
    assert [n for n in ("eth0", "eth1", "ib0", "enp3s0", "lo") if spec.matches(n)] == [
        "eth0", "eth1", "ib0"]


def test_ifname_excluding_exact_names() -> None:
    spec = IfnameSpec.parse("^=docker0,lo")
    assert not spec.matches("docker0") and not spec.matches("lo")
    assert spec.matches("docker1") and spec.matches("lo2")


def test_ifname_empty_list_is_an_error() -> None:
    with pytest.raises(NetError, match="names no interface"):
        IfnameSpec.parse("^")


# ---- the choice --------------------------------------------------------------------------------


def test_route_decides_without_environment() -> None:
    chosen = choose("10.0.0.1:20000")
    assert (chosen.interface, chosen.address, chosen.family) == ("eth0", "10.0.0.2", socket.AF_INET)
    assert "routes to 10.0.0.1" in chosen.reason
    assert chosen.dist_init_ip == "10.0.0.1"
    assert "interface eth0, address 10.0.0.2 (IPv4)" in chosen.describe()


def test_nccl_syntax_in_env_resolves_to_the_routed_match() -> None:
    # ^lo,docker leaves eth0 and ib0 (eth1 is down); ib0 routes to the dist-init host.
    chosen = choose("10.1.0.1:20000", env={"NCCL_SOCKET_IFNAME": "^lo,docker"})
    assert (chosen.interface, chosen.address) == ("ib0", "10.1.0.2")
    assert "NCCL_SOCKET_IFNAME=^lo,docker" in chosen.reason


def test_env_without_routed_match_takes_the_first_match() -> None:
    chosen = choose("172.17.0.5:20000", env={"NCCL_SOCKET_IFNAME": "^lo,docker"})
    assert (chosen.interface, chosen.address) == ("eth0", "10.0.0.2")
    assert "first of 2 matches" in chosen.reason


def test_gloo_variable_wins_over_nccl() -> None:
    chosen = choose("10.0.0.1:20000", env={"GLOO_SOCKET_IFNAME": "ib0",
                                           "NCCL_SOCKET_IFNAME": "=eth0"})
    assert chosen.interface == "ib0"
    assert chosen.reason.startswith("GLOO_SOCKET_IFNAME=ib0")


def test_env_matching_nothing_usable_lists_interfaces() -> None:
    with pytest.raises(NetError, match=r"GLOO_SOCKET_IFNAME='eth1'.*eth1 \(10\.2\.0\.2, down\)"):
        choose("10.0.0.1:20000", env={"GLOO_SOCKET_IFNAME": "eth1"})
    with pytest.raises(NetError, match="matches no interface"):
        choose("10.0.0.1:20000", env={"NCCL_SOCKET_IFNAME": "=eth"})


def test_loopback_refused_for_remote_peers() -> None:
    with pytest.raises(NetError, match="refusing loopback interface lo"):
        choose("10.0.0.1:20000", env={"GLOO_SOCKET_IFNAME": "lo"})


def test_loopback_allowed_when_everything_is_local() -> None:
    for addr in ("127.0.0.1:20000", "localhost:20000"):
        chosen = choose(addr, names={"localhost": "127.0.0.1"})
        assert (chosen.interface, chosen.address) == ("lo", "127.0.0.1")


def test_hostname_resolving_to_loopback_refused_for_several_nodes() -> None:
    names = {"node0": "127.0.1.1"}  # Debian's /etc/hosts entry for the machine's own name
    with pytest.raises(NetError, match=r"'node0' resolves to 127\.0\.1\.1 \(loopback\)"):
        choose("node0:20000", names=names)
    assert choose("node0:20000", nnodes=1, names=names).interface == "lo"


def test_ipv6_dist_init_addr() -> None:
    chosen = choose("[fd00::1]:20000")
    assert (chosen.interface, chosen.address, chosen.family) == ("eth0", "fd00::2", socket.AF_INET6)
    assert "(IPv6)" in chosen.describe()
    # An env-selected interface is asked for an IPv6 address: global before link-local.
    assert choose("[fd00::1]:20000", env={"GLOO_SOCKET_IFNAME": "eth0"}).address == "fd00::2"
    with pytest.raises(NetError, match="IPv6 address"):
        choose("[fd00::1]:20000", env={"GLOO_SOCKET_IFNAME": "ib0"})


def test_source_address_on_no_interface_is_an_error() -> None:
    with pytest.raises(NetError, match="no interface holds"):
        choose_cluster_interface(HostPort.parse("10.0.0.1:1"), 2, deadline=time.monotonic() + 1,
                                 environ={}, interfaces=FAKE[:2],
                                 resolve=lambda h, d: ip(h), route=fake_route)


def test_real_machine_loopback_ipv4_and_ipv6() -> None:
    chosen = choose_cluster_interface(HostPort.parse("127.0.0.1:20000"), 2,
                                      deadline=time.monotonic() + 1, environ={})
    assert chosen.address == "127.0.0.1"
    assert ip("127.0.0.1") in next(i for i in net.list_interfaces()
                                   if i.name == chosen.interface).addresses
    if not socket.has_ipv6 or not any(ip("::1") in i.addresses for i in net.list_interfaces()):
        pytest.skip("no ::1 on this machine")
    chosen6 = choose_cluster_interface(HostPort.parse("[::1]:20000"), 2,
                                       deadline=time.monotonic() + 1, environ={})
    assert (chosen6.address, chosen6.family) == ("::1", socket.AF_INET6)


def test_resolution_retries_until_the_name_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "RESOLVE_RETRY_S", 0.01)
    calls = []

    def late_dns(host: str, port: None, **kw: object) -> list:
        calls.append(host)
        if len(calls) < 3:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0))]

    assert resolve_host("leader.svc", deadline=time.monotonic() + 5,
                        getaddrinfo=late_dns) == ip("10.0.0.1")
    assert len(calls) == 3


def test_resolution_gives_up_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "RESOLVE_RETRY_S", 0.05)

    def no_dns(host: str, port: None, **kw: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    started = time.monotonic()
    with pytest.raises(NetError, match=r"cannot resolve .*'leader\.svc' after \d+ attempt"):
        resolve_host("leader.svc", deadline=started + 0.3, getaddrinfo=no_dns)
    assert time.monotonic() - started < 1.0


def test_export_pins_gloo_and_fills_nccl_only_when_unset() -> None:
    chosen = choose("10.0.0.1:20000", env={"GLOO_SOCKET_IFNAME": "^lo,docker"})
    env = {"GLOO_SOCKET_IFNAME": "^lo,docker"}
    assert export_for_torch(chosen, env) == ["GLOO_SOCKET_IFNAME=eth0", "NCCL_SOCKET_IFNAME==eth0"]
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth0"}
    env = {"NCCL_SOCKET_IFNAME": "^docker"}
    export_for_torch(chosen, env)
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "^docker"}


# ---- port plan ---------------------------------------------------------------------------------


def test_port_plan_from_dist_init_addr() -> None:
    args = ServerArgs().replace(tp_size=4, nnodes=2, node_rank=1,
                                dist_init_addr="10.0.0.1:20000", port=30000)
    plan = PortPlan.from_args(args)
    ports = (plan.rendezvous_port, plan.coordinator_port, plan.scheduler_link_port)
    assert ports == (20000, 20001, 20002)
    assert plan.rendezvous_url == "tcp://10.0.0.1:20000"
    text = plan.describe()
    assert "node 1 of 2" in text and "base port 20000 from --dist-init-addr" in text
    for needle in ("10.0.0.1:20000", "rendezvous", "10.0.0.1:20001", "coordinator",
                   "10.0.0.1:20002", "scheduler link", "127.0.0.1:30000", "ephemeral"):
        assert needle in text


def test_port_plan_ipv6_brackets() -> None:
    plan = PortPlan.from_args(ServerArgs().replace(nnodes=2, dist_init_addr="[fd00::1]:20000"))
    assert plan.rendezvous_url == "tcp://[fd00::1]:20000"
    assert "[fd00::1]:20001" in plan.describe()


def test_port_plan_refuses_collisions_and_overflow() -> None:
    with pytest.raises(PortPlanError, match="--port 20001 collides"):
        PortPlan.from_args(ServerArgs().replace(nnodes=2, dist_init_addr="h:20000", port=20001))
    with pytest.raises(PortPlanError, match="beyond 65535"):
        PortPlan.from_args(ServerArgs().replace(nnodes=2, dist_init_addr="h:65534"))
    with pytest.raises(PortPlanError, match="needs --dist-init-addr"):
        PortPlan.from_args(ServerArgs().replace(nnodes=2))


def test_port_plan_picks_free_loopback_ports_for_one_node() -> None:
    plan = PortPlan.from_args(ServerArgs().replace(tp_size=2))
    assert plan.picked and plan.base.host == "127.0.0.1"
    for port in (plan.rendezvous_port, plan.coordinator_port, plan.scheduler_link_port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
    assert "picked on loopback" in plan.describe()


def test_port_plan_one_rank_has_no_cluster_ports() -> None:
    plan = PortPlan.from_args(ServerArgs())
    assert plan.dist_init is None
    assert "no cluster ports" in plan.describe()
    with pytest.raises(PortPlanError):
        _ = plan.rendezvous_port


# ---- two network namespaces (root only) --------------------------------------------------------

@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    with netns.two_namespaces() as names:
        yield names


def _in_ns(ns: str, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


CHOOSE = f"""
    import json, time
    from meshserve.cluster.net import HostPort, NetError, choose_cluster_interface
    try:
        c = choose_cluster_interface(HostPort.parse("{netns.SUBNET}.1:20000"), 2,
                                     deadline=time.monotonic() + 2)
        print(json.dumps({{"interface": c.interface, "address": c.address}}))
    except NetError as err:
        print(json.dumps({{"error": str(err)}}))
"""


def test_namespaces_route_choice_and_loopback_refusal(two_namespaces: tuple[str, str]) -> None:
    ns_a, ns_b = two_namespaces
    env_clean = {"GLOO_SOCKET_IFNAME": "", "NCCL_SOCKET_IFNAME": ""}
    a = json.loads(_in_ns(ns_a, CHOOSE, env_clean).stdout)
    b = json.loads(_in_ns(ns_b, CHOOSE, env_clean).stdout)
    assert a == {"interface": f"msa{os.getpid() % 100000}", "address": f"{netns.SUBNET}.1"}
    assert b == {"interface": f"msb{os.getpid() % 100000}", "address": f"{netns.SUBNET}.2"}
    refused = json.loads(_in_ns(ns_b, CHOOSE, {"GLOO_SOCKET_IFNAME": "lo"}).stdout)
    assert "refusing loopback interface lo" in refused["error"]


def test_namespaces_doctor_ok(two_namespaces: tuple[str, str], tmp_path: Path) -> None:
    """The doctor across two namespaces: gloo all-reduce over the veth pair."""
    ns_a, ns_b = two_namespaces
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "", "NCCL_SOCKET_IFNAME": "",
           "MESHSERVE_CLUSTER_SECRET": "doctor-test-secret-0123456789"}
    argv = [sys.executable, "-m", "meshserve.doctor", "--dist-init-addr",
            f"{netns.SUBNET}.1:29500", "--nnodes", "2", "--device", "cpu", "--timeout", "30"]
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, *argv, "--node-rank", str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank, ns in enumerate((ns_a, ns_b))]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        assert proc.returncode == 0, out
        verdict = out.strip().splitlines()[-1]
        assert verdict.startswith("doctor: OK — 2 node(s), interface ms"), out
        assert f"({netns.SUBNET}.{rank + 1})" in verdict
