"""Which network interface and address this node uses to talk to the rest of the cluster.

The wrong interface is the most common root cause of multi-node start-up hangs
(LESSONS.md: gloo resolving the hostname to 127.0.0.1, a VPN or docker bridge on the default
route, ``GLOO_SOCKET_IFNAME`` not accepting NCCL's ``^lo,docker`` syntax). The choice, in
order:

1. ``GLOO_SOCKET_IFNAME``, else ``NCCL_SOCKET_IFNAME``, read with NCCL's syntax (comma list of
   name prefixes; ``^`` excludes; ``=`` asks for exact names) and resolved to ONE concrete
   interface that is up and has an address of the rendezvous' family. Among several matches
   the one that routes to the ``--dist-init-addr`` host wins, else the first by index.
2. Otherwise the interface that routes to the ``--dist-init-addr`` host: connecting a UDP
   socket sends nothing but makes the kernel pick the source address of that route, which
   ``psutil.net_if_addrs()`` maps back to an interface.

Loopback is refused when ``--nnodes > 1`` unless the user literally asked for it (the
dist-init host is a loopback literal or ``localhost``): then every node is this machine.
:func:`export_for_torch` then pins gloo (and NCCL, unless the user set it) to the choice,
because gloo only understands a plain interface name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import psutil

__all__ = [
    "ClusterNet",
    "HostPort",
    "IfnameSpec",
    "Interface",
    "NetError",
    "choose_cluster_interface",
    "export_for_torch",
    "list_interfaces",
    "resolve_host",
    "route_source",
]

logger = logging.getLogger("meshserve")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Environment variables naming the cluster interface, in precedence order. gloo's own variable
#: wins because gloo is what every rank uses for the CPU group.
IFNAME_ENV_VARS: tuple[str, ...] = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

#: Pause between two attempts to resolve the dist-init host name.
RESOLVE_RETRY_S = 1.0


class NetError(RuntimeError):
    """The cluster network cannot be chosen; the message says why and what to change."""


# --------------------------------------------------------------------------------------------
# HOST:PORT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostPort:
    """A parsed ``--dist-init-addr``. ``host`` never carries IPv6 brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, value: str, *, flag: str = "--dist-init-addr") -> HostPort:
        """``host:port``, ``1.2.3.4:port`` or ``[v6addr]:port`` (brackets required for IPv6,
        since ``::1:5000`` is ambiguous)."""
        text = value.strip()
        if text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1 : close + 2] != ":":
                raise NetError(f"{flag} {value!r}: expected [IPV6]:PORT")
            host, port_text = text[1:close], text[close + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise NetError(f"{flag} {value!r}: expected HOST:PORT")
            if ":" in host:
                raise NetError(f"{flag} {value!r}: put an IPv6 address in brackets, "
                               f"e.g. [{host}]:{port_text}")
        if not host:
            raise NetError(f"{flag} {value!r}: the host is empty")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise NetError(f"{flag} {value!r}: the port must be a number in 1..65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --------------------------------------------------------------------------------------------
# Interfaces and NCCL's SOCKET_IFNAME syntax
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    up: bool
    addresses: tuple[IPAddress, ...]  # IPv4 and IPv6; link-local IPv6 keeps its scope id

    def address_of(self, family: socket.AddressFamily) -> IPAddress | None:
        """The interface's first address of ``family``, global addresses before link-local."""
        version = 6 if family == socket.AF_INET6 else 4
        mine = [a for a in self.addresses if a.version == version]
        mine.sort(key=lambda a: a.is_link_local)  # stable: keeps the kernel's order otherwise
        return mine[0] if mine else None

    def describe(self) -> str:
        shown = ", ".join(str(a) for a in self.addresses) or "no address"
        return f"{self.name} ({shown}{'' if self.up else ', down'})"


def list_interfaces() -> list[Interface]:
    """Every interface of this machine, ordered by kernel index."""
    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    out: list[Interface] = []
    for index, name in sorted(socket.if_nameindex()):
        parsed: list[IPAddress] = []
        for entry in addrs.get(name, ()):
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    parsed.append(ipaddress.ip_address(entry.address))
                except ValueError:
                    logger.debug("ignoring unparsable address %r of %s", entry.address, name)
        up = stats[name].isup if name in stats else False
        out.append(Interface(name=name, index=index, up=up, addresses=tuple(parsed)))
    return out


@dataclass(frozen=True)
class IfnameSpec:
    """NCCL's ``NCCL_SOCKET_IFNAME`` syntax: ``[^][=]name[,name...]``.

    Names are prefixes (``eth`` matches ``eth0``) unless ``=`` asks for exact names; ``^``
    turns the list into an exclusion list. A plain gloo value (``eth0``) is a special case.
    """

    names: tuple[str, ...]
    exclude: bool = False
    exact: bool = False

    @classmethod
    def parse(cls, text: str) -> IfnameSpec:
        rest = text.strip()
        exclude = rest.startswith("^")
        rest = rest.removeprefix("^")
        exact = rest.startswith("=")
        rest = rest.removeprefix("=")
        names = tuple(n.strip() for n in rest.split(",") if n.strip())
        if not names:
            raise NetError(f"interface list {text!r} names no interface")
        return cls(names=names, exclude=exclude, exact=exact)

    def matches(self, name: str) -> bool:
        hit = any(name == n if self.exact else name.startswith(n) for n in self.names)
        return hit != self.exclude


# --------------------------------------------------------------------------------------------
# Resolution and routing
# --------------------------------------------------------------------------------------------


def resolve_host(host: str, *, deadline: float,
                 getaddrinfo: Callable[..., list] = socket.getaddrinfo) -> IPAddress:
    """The first address ``host`` resolves to, retrying until ``deadline`` (monotonic).

    Retrying matters on Kubernetes, where the leader's DNS name appears only once its pod is
    scheduled, possibly after the workers started.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            infos = getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            return ipaddress.ip_address(infos[0][4][0])
        except socket.gaierror as err:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetError(f"cannot resolve the --dist-init-addr host {host!r} after "
                               f"{attempts} attempt(s): {err}") from err
            if attempts == 1:
                logger.info("waiting for %r to resolve (%s); retrying until the start-up "
                            "timeout", host, err)
            time.sleep(min(RESOLVE_RETRY_S, remaining))


def _numeric_sockaddr(host: str, port: int,
                      kind: socket.SocketKind) -> tuple[socket.AddressFamily, tuple]:
    """(family, sockaddr) for a numeric address; carries the scope id of link-local IPv6
    (``fe80::1%eth0``), which a plain ``(host, port)`` tuple cannot express."""
    try:
        info = socket.getaddrinfo(host, port, 0, kind, 0, socket.AI_NUMERICHOST)[0]
    except socket.gaierror as err:
        raise NetError(f"{host!r} is not a numeric IP address: {err}") from err
    return info[0], info[4]


def route_source(destination: IPAddress) -> IPAddress:
    """The local address the kernel would use to reach ``destination``.

    ``connect`` on a UDP socket sends no packet; it only selects the route and binds the
    socket to that route's source address.
    """
    family, sockaddr = _numeric_sockaddr(str(destination), 9, socket.SOCK_DGRAM)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(sockaddr)
        except OSError as err:
            raise NetError(f"no route from this node to {destination}: {err}") from err
        return ipaddress.ip_address(sock.getsockname()[0])


def _strip_scope(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def _is_literal_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNet:
    """This node's side of the cluster network.

    ``address`` is on ``interface``; node 0 binds its coordinator there. ``dist_init_ip`` is
    the resolved ``--dist-init-addr`` host: the address every node r > 0 connects to.
    """

    interface: str
    address: str
    family: socket.AddressFamily
    reason: str
    dist_init: HostPort
    dist_init_ip: str

    def describe(self) -> str:
        """One line, printed at start-up on every node."""
        fam = "IPv6" if self.family == socket.AF_INET6 else "IPv4"
        return (f"cluster network: interface {self.interface}, address {self.address} ({fam}); "
                f"{self.reason}")


def choose_cluster_interface(
    dist_init: HostPort,
    nnodes: int,
    *,
    deadline: float,
    environ: Mapping[str, str] = os.environ,
    interfaces: Sequence[Interface] | None = None,
    resolve: Callable[[str, float], IPAddress] | None = None,
    route: Callable[[IPAddress], IPAddress] = route_source,
) -> ClusterNet:
    """Pick this node's cluster interface (module docstring).

    ``dist_init`` is the rendezvous (``PortPlan.dist_init``: the user's ``--dist-init-addr``,
    or the loopback address picked for a single node). ``deadline`` (monotonic) bounds
    host-name resolution. ``interfaces``/``resolve``/``route`` are injectable for tests.
    """
    resolve = resolve or (lambda host, dl: resolve_host(host, deadline=dl))
    dist_ip = resolve(dist_init.host, deadline)
    family = socket.AF_INET6 if dist_ip.version == 6 else socket.AF_INET
    ifaces = list(interfaces) if interfaces is not None else list_interfaces()

    if nnodes > 1 and dist_ip.is_loopback and not _is_literal_loopback(dist_init.host):
        # The classic /etc/hosts trap: node 0's own name maps to 127.0.1.1.
        raise NetError(
            f"--dist-init-addr host {dist_init.host!r} resolves to {dist_ip} (loopback) on this "
            f"node, but --nnodes {nnodes} needs an address the other nodes can reach; give "
            f"node 0's cluster IP, or fix the name in /etc/hosts")

    env_name = next((v for v in IFNAME_ENV_VARS if environ.get(v, "").strip()), None)
    if env_name is not None:
        iface, address, reason = _from_env(env_name, environ[env_name], ifaces, family,
                                           dist_ip, route)
    else:
        iface, address = _from_route(ifaces, dist_ip, route)
        reason = f"routes to {dist_ip} (--dist-init-addr {dist_init})"

    if nnodes > 1 and address.is_loopback and not dist_ip.is_loopback:
        raise NetError(
            f"refusing loopback interface {iface.name} ({address}) for a {nnodes}-node "
            f"cluster: other nodes cannot reach it ({reason}); name the interface on the "
            f"cluster network in GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME, or unset them")
    return ClusterNet(interface=iface.name, address=str(address), family=family, reason=reason,
                      dist_init=dist_init, dist_init_ip=str(dist_ip))


def _from_env(env_name: str, value: str, ifaces: Sequence[Interface],
              family: socket.AddressFamily, dist_ip: IPAddress,
              route: Callable[[IPAddress], IPAddress]) -> tuple[Interface, IPAddress, str]:
    spec = IfnameSpec.parse(value)
    candidates = [i for i in ifaces if i.up and spec.matches(i.name) and i.address_of(family)]
    fam = "IPv6" if family == socket.AF_INET6 else "IPv4"
    if not candidates:
        listing = "; ".join(i.describe() for i in ifaces) or "none"
        raise NetError(f"{env_name}={value!r} matches no interface that is up and has an "
                       f"{fam} address (interfaces: {listing})")
    chosen = candidates[0]
    try:
        routed = _strip_scope(route(dist_ip))
    except NetError:
        routed = None  # the variable decides; a missing route is not fatal here
    for cand in candidates:
        if routed is not None and routed in {_strip_scope(a) for a in cand.addresses}:
            return cand, routed, (f"{env_name}={value} selects {cand.name}, which routes to "
                                  f"{dist_ip}")
    address = chosen.address_of(family)
    assert address is not None  # candidates all have one
    extra = f" (first of {len(candidates)} matches)" if len(candidates) > 1 else ""
    return chosen, address, f"{env_name}={value} selects {chosen.name}{extra}"


def _from_route(ifaces: Sequence[Interface], dist_ip: IPAddress,
                route: Callable[[IPAddress], IPAddress]) -> tuple[Interface, IPAddress]:
    source = _strip_scope(route(dist_ip))
    for iface in ifaces:
        if source in {_strip_scope(a) for a in iface.addresses}:
            return iface, source
    raise NetError(f"the route to {dist_ip} uses source address {source}, which no interface "
                   f"holds; set GLOO_SOCKET_IFNAME to the cluster interface")


def export_for_torch(net: ClusterNet,
                     environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Pin torch.distributed to the chosen interface; returns ``NAME=value`` lines set.

    gloo only takes plain interface names, so ``GLOO_SOCKET_IFNAME`` is always overwritten with
    the resolved name. ``NCCL_SOCKET_IFNAME`` is set (exact match) only when the user did not
    set it: NCCL understands its own syntax, and the user may know about IB/RoCE devices.
    Child processes (the scheduler ranks) inherit the environment.
    """
    changed = [f"GLOO_SOCKET_IFNAME={net.interface}"]
    environ["GLOO_SOCKET_IFNAME"] = net.interface
    if not environ.get("NCCL_SOCKET_IFNAME", "").strip():
        environ["NCCL_SOCKET_IFNAME"] = f"={net.interface}"
        changed.append(f"NCCL_SOCKET_IFNAME=={net.interface}")
    return changed
