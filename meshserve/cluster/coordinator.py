"""The cluster coordinator: join handshake, start-up timeout, heartbeats, fail-fast.

Before torch.distributed forms, every node r > 0 joins node 0's coordinator (port P+1 of the
port plan): it first proves that it holds the cluster secret (meshserve.cluster.auth; a peer
that cannot is dropped with one log line and learns nothing, not even why), then sends a
:class:`~meshserve.cluster.fingerprint.Fingerprint`. Node 0 refuses a
mismatch with a per-field diff, a duplicate ``--node-rank``, and names every node that has not
joined when the start-up timeout expires. Once all nodes have joined ("whole"), node 0 and
every node r > 0 exchange heartbeats. Two kinds of loss, told apart (LESSONS.md: one node
dies, the others hang and /health stays 200; and a busy machine must not stop a healthy one):

* closed: the connection ended (process exit or kill: the kernel closes its sockets) — acted
  on at once, in milliseconds;
* silent: nothing arrived for ``silence_timeout`` (default 15 s, ``--cluster-silence-timeout``)
  — a stalled machine (swap, GC, SIGSTOP) survives shorter pauses; a vanished one (power,
  network cut) is declared dead after that window.

Naming what died: a failure report is *decisive* (a process killed by a signal, a node whose
connection closed or went silent) or not (a rank that exited or raised an error, which may be
a consequence: a rank whose collective peer died fails with "connection closed" too). Node 0
acts on a decisive report at once; a non-decisive one waits ``CONSEQUENCE_GRACE_S`` for a
decisive report that names the cause, and every node exits with the one reason node 0 chose.

Topology: a star. Node 0 holds one TCP connection per node r > 0; nodes r > 0 only talk to
node 0, which relays failures (``Failure`` in, ``Shutdown`` out). Every frame is a 4-byte
big-endian length and a msgpack-encoded :data:`Message` (typed decoding; no pickle, ever).

Threads, not asyncio: the coordinator must keep its heartbeats on time whatever the
launcher's event loop is doing (tokenizing, a slow handler, or no loop at all yet during
start-up), and ``start()`` is a plain blocking call made before the HTTP server exists. The
work is a handful of sockets (one per node), so one reader thread per connection plus one
heartbeat thread is simpler to reason about than a second event loop; all are daemons.

Invariants:

* ``on_failure(reason, clean)`` is called at most once, from a coordinator thread, and only
  after ``start()`` returned (before that, every failure is ``start()``'s ClusterError). It is
  not called for this node's own :meth:`ClusterCoordinator.shutdown`.
* Before ``on_failure`` runs, the other nodes have been told (node 0 sends ``Shutdown`` to
  every node; a node r > 0 sends its own ``Failure`` to node 0), so the callback may exit.
* During start-up a node that drops its connection is forgotten and may join again; after
  start-up every loss is fatal for the whole cluster.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import msgspec

from meshserve.cluster.auth import HANDSHAKE_ERRORS, HANDSHAKE_TIMEOUT_S, AuthError, ClusterSecret
from meshserve.cluster.fingerprint import Fingerprint
from meshserve.cluster.frames import PeerClosed, ProtocolError, pack_frame, recv_frame

__all__ = [
    "Accepted",
    "ClusterCoordinator",
    "ClusterError",
    "Failure",
    "Heartbeat",
    "Join",
    "Message",
    "NodeInfo",
    "Ready",
    "Refused",
    "Shutdown",
]

logger = logging.getLogger("meshserve")

#: A node sends a heartbeat this often (both directions).
HEARTBEAT_INTERVAL_S = 0.5
#: A peer from which nothing arrived for this long is dead (default of
#: --cluster-silence-timeout). Long enough for a machine stalled by swapping or a long GC
#: pause; deaths that close connections are detected at once, whatever this value.
SILENCE_TIMEOUT_S = 15.0
#: How long node 0 holds a non-decisive failure report, waiting for a decisive one that names
#: the cause (a rank death reported by another node arrives within milliseconds).
CONSEQUENCE_GRACE_S = 1.0
#: Pause between two attempts of a node r > 0 to connect to node 0.
CONNECT_RETRY_S = 0.5
#: How long a stopping node waits for its final message to be read before closing.
LINGER_S = 1.0
#: Log "still waiting" this often during start-up.
PROGRESS_LOG_S = 10.0
#: Largest frame accepted; a fingerprint is a few KB. Guards against garbage lengths.
MAX_FRAME_BYTES = 1 << 20


class ClusterError(RuntimeError):
    """The cluster cannot start (refused, timed out, shut down); the message says why."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    node_rank: int
    address: str  # as node 0 sees it (the peer address of the connection)
    hostname: str

    def label(self) -> str:
        return f"node {self.node_rank} ({self.address}, {self.hostname})"


class Join(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """node r > 0 -> node 0, first frame on a connection."""

    node_rank: int
    fingerprint: Fingerprint
    hostname: str
    pid: int


class Accepted(msgspec.Struct, tag=True, frozen=True):
    """node 0 -> joining node: admitted; ``waiting_for`` lists ranks still missing."""

    waiting_for: list[int]


class Refused(msgspec.Struct, tag=True, frozen=True):
    """node 0 -> joining node: not admitted; the connection closes after it."""

    reason: str


class Ready(msgspec.Struct, tag=True, frozen=True):
    """node 0 -> every node: all nodes joined; the cluster is whole."""

    nodes: list[NodeInfo]


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Both directions, every HEARTBEAT_INTERVAL_S."""


class Failure(msgspec.Struct, tag=True, frozen=True):
    """node r > 0 -> node 0: this node failed or is leaving; node 0 stops the cluster.
    ``decisive``: a cause (a process killed), not possibly a consequence (module doc)."""

    reason: str
    decisive: bool = True


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """node 0 -> every node: stop now. ``clean`` is True only for a requested stop (SIGTERM
    on node 0); a dead or leaving node makes it False."""

    reason: str
    clean: bool


Message = Join | Accepted | Refused | Ready | Heartbeat | Failure | Shutdown

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)
_PURPOSE = b"coordinator"


class _Link:
    """One TCP connection. Any thread may send (serialized); only its reader thread receives."""

    def __init__(self, sock: socket.socket, remote: str) -> None:
        self.sock = sock
        self.remote = remote  # peer IP address
        self.info: NodeInfo | None = None  # set once node 0 admitted the peer
        self._send_lock = threading.Lock()
        self._can_send = True

    def send(self, msg: Message, *, last: bool = False) -> bool:
        """Send one frame; ``last`` half-closes the connection after it (FIN follows the
        data, so the peer reads the message before it sees the end). False if it failed."""
        payload = _ENCODER.encode(msg)
        with self._send_lock:
            if not self._can_send:
                return False
            try:
                self.sock.sendall(pack_frame(payload))
                if last:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._can_send = False
                return False
            self._can_send = not last
            return True

    def half_close(self) -> None:
        """No more sends: the peer reads what was sent, then sees the end of the stream."""
        with self._send_lock:
            if self._can_send:
                self._can_send = False
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)

    def recv(self, deadline: float | None = None) -> Message:
        """Raises PeerClosed, ProtocolError, or TimeoutError after the socket's timeout (the
        silence window) or at ``deadline``."""
        try:
            return _DECODER.decode(recv_frame(self.sock, MAX_FRAME_BYTES, deadline))
        except msgspec.DecodeError as err:
            raise ProtocolError(str(err)) from err

    def drain_and_close(self, timeout: float) -> None:
        """After a final message: wait (bounded) for the peer to close, then close."""
        try:
            self.sock.settimeout(timeout)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        with self._send_lock:
            self._can_send = False
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------------
# The coordinator
# --------------------------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    WHOLE = "whole"
    FAILED = "failed"
    STOPPED = "stopped"  # clean stop


class ClusterCoordinator:
    """One per node, in the launcher's main process.

    ``address``: for node 0, where to listen (the chosen cluster address and port P+1, never
    all interfaces); for node r > 0, node 0's address to connect to (the resolved
    --dist-init-addr host and P+1). ``startup_timeout`` bounds :meth:`start`. ``secret``
    authenticates every connection; ``silence_timeout`` is --cluster-silence-timeout;
    ``heartbeat_interval`` is tunable for tests only.
    """

    def __init__(
        self,
        *,
        node_rank: int,
        nnodes: int,
        address: tuple[str, int],
        fingerprint: Fingerprint,
        secret: ClusterSecret,
        startup_timeout: float,
        on_failure: Callable[[str, bool], None],
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        silence_timeout: float = SILENCE_TIMEOUT_S,
    ) -> None:
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"node rank {node_rank} out of range for {nnodes} node(s)")
        if not 0 < heartbeat_interval < silence_timeout:
            raise ValueError("need 0 < heartbeat_interval < silence_timeout")
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.address = address
        self.fingerprint = fingerprint
        self._secret = secret
        self.startup_timeout = startup_timeout
        self._on_failure = on_failure
        self._heartbeat_interval = heartbeat_interval
        self._silence_timeout = silence_timeout

        self._cond = threading.Condition()  # guards every attribute below
        self._state = _State.NEW
        self._reason: str | None = None  # why the cluster failed or stopped
        self._links: dict[int, _Link] = {}  # node 0: joined nodes by rank; node r: {0: node 0}
        self._waiting_for: list[int] = []  # node r > 0: ranks node 0 still waits for
        self._nodes: list[NodeInfo] = []  # every node, once whole
        self._listener: socket.socket | None = None
        self._local_address = address[0] if node_rank == 0 else "?"  # node r: set on connect
        self._stop = threading.Event()  # set when the cluster stops: ends heartbeats/accepts
        self._threads: list[threading.Thread] = []
        self._held: str | None = None  # node 0: a non-decisive failure waiting for its grace

    # ---- public API --------------------------------------------------------------------------

    @property
    def is_whole(self) -> bool:
        """True from the end of start() until the first failure or shutdown (for /health)."""
        with self._cond:
            return self._state is _State.WHOLE

    @property
    def failure_reason(self) -> str | None:
        """Why the cluster is no longer whole (None while starting or whole)."""
        with self._cond:
            return self._reason

    @property
    def nodes(self) -> list[NodeInfo]:
        """Every node of the cluster (empty until whole)."""
        with self._cond:
            return list(self._nodes)

    def start(self) -> None:
        """Block until every node has joined; raise ClusterError on refusal or timeout."""
        with self._cond:
            if self._state is not _State.NEW:
                raise RuntimeError("ClusterCoordinator.start() called twice")
            self._state = _State.STARTING
        deadline = time.monotonic() + self.startup_timeout
        if self.node_rank == 0:
            self._start_leader(deadline)
        else:
            self._start_follower(deadline)
        self._spawn("heartbeat", self._heartbeat_loop)
        self._wait_whole(deadline)

    def report_failure(self, reason: str, *, decisive: bool = True) -> None:
        """A local failure (e.g. a scheduler rank died): stop the whole cluster. Node 0
        decides which report names the failure (module doc) and tells every node;
        ``on_failure`` is then called on every node, this one too, with that reason."""
        reason = f"{self._me()}: {reason}"
        if self.node_rank == 0:
            self._consider(reason, decisive)
            return
        with self._cond:
            link = self._links.get(0) if self._state is _State.WHOLE else None
        if link is None or not link.send(Failure(reason=reason, decisive=decisive)):
            self._fail(reason, clean=False, notify=True, callback=True)
        # else node 0 answers with Shutdown (or its loss is detected): both end this node.

    def shutdown(self, clean: bool, reason: str) -> None:
        """This node stops on purpose (e.g. SIGTERM). On node 0 every node is told to stop
        (their ``on_failure`` gets ``clean``); on node r > 0 node 0 is told this node is
        leaving, which fails the cluster (a cluster without one of its nodes cannot serve);
        during start-up it just leaves. Idempotent; callable in any state; does not call
        this node's ``on_failure``."""
        # A node r > 0 leaving during start-up just drops its connection: node 0 forgets it
        # and it may join again (e.g. restarted with a corrected flag).
        notify = self.node_rank == 0 or self.is_whole
        with self._cond:  # a held failure report is about to name the failure: let it
            if not clean and self._held is not None:
                self._cond.wait_for(lambda: self._state is not _State.WHOLE, 2 * CONSEQUENCE_GRACE_S)
        if self.node_rank != 0:
            reason = f"{self._me()} is shutting down: {reason}"
        self._fail(reason, clean=clean, notify=notify, callback=False)
        deadline = time.monotonic() + LINGER_S
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # ---- start-up ----------------------------------------------------------------------------

    def _start_leader(self, deadline: float) -> None:
        if self.nnodes == 1:
            with self._cond:
                self._state = _State.WHOLE
                self._nodes = [NodeInfo(node_rank=0, address=self.address[0],
                                        hostname=socket.gethostname())]
            return
        host, port = self.address
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(max(16, self.nnodes))
        except OSError as err:
            with self._cond:
                self._state = _State.FAILED
            raise ClusterError(
                f"node 0 cannot listen on {_hostport(host, port)} for the cluster coordinator: "
                f"{err} (another meshserve or doctor using this base port? a port the plan "
                f"derives from --dist-init-addr)") from err
        listener.settimeout(0.2)  # accept() wakes up to notice a stop
        self._listener = listener
        logger.info("cluster: node 0 listening on %s; waiting for %d node(s) to join",
                    _hostport(host, port), self.nnodes - 1)
        self._spawn("accept", self._accept_loop)

    def _start_follower(self, deadline: float) -> None:
        host, port = self.address
        where = _hostport(host, port)
        attempts, last_log = 0, 0.0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            try:
                sock = socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining)))
                break
            except OSError as err:
                now = time.monotonic()
                if now >= deadline:
                    with self._cond:
                        self._state = _State.FAILED
                    raise ClusterError(
                        f"node {self.node_rank} could not reach node 0's coordinator at {where} "
                        f"within {_seconds(self.startup_timeout)} ({attempts} attempts, last: "
                        f"{err}); is node 0 started with the same --dist-init-addr, and is "
                        f"port {port} open between the nodes? (meshserve doctor checks both)"
                    ) from err
                if now - last_log >= PROGRESS_LOG_S:
                    logger.info("cluster: waiting for node 0 at %s (%s)", where, err)
                    last_log = now
                time.sleep(min(CONNECT_RETRY_S, deadline - now))
        try:
            self._secret.connect(sock, _PURPOSE)
        except HANDSHAKE_ERRORS as err:
            sock.close()
            with self._cond:
                self._state = _State.FAILED
            why = str(err) if isinstance(err, AuthError) else (
                f"the handshake failed ({str(err) or type(err).__name__})")
            raise ClusterError(f"node {self.node_rank} could not join node 0 at {where}: {why}") from err
        sock.settimeout(self._silence_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(sock, remote=host)
        with self._cond:
            self._links[0] = link
            self._local_address = sock.getsockname()[0]
        link.send(Join(node_rank=self.node_rank, fingerprint=self.fingerprint,
                       hostname=socket.gethostname(), pid=os.getpid()))
        logger.info("cluster: node %d connected to node 0 at %s; joining", self.node_rank, where)
        self._spawn("reader-0", self._follower_reader, link)

    def _wait_whole(self, deadline: float) -> None:
        next_log = time.monotonic() + PROGRESS_LOG_S
        with self._cond:
            while self._state is _State.STARTING:
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_log:
                    logger.info("cluster: still waiting for %s (%.0f s left)",
                                _nodes_text(self._missing()), deadline - now)
                    next_log = now + PROGRESS_LOG_S
                self._cond.wait(min(deadline, next_log) - now)
            state, reason = self._state, self._reason
        if state is _State.WHOLE:
            logger.info("cluster: whole: %s", ", ".join(n.label() for n in self.nodes))
            return
        if state is _State.STARTING:  # the deadline passed
            reason = self._timeout_reason()
            # Node 0 tells the joined nodes why; a node r > 0 just leaves (node 0 has its own
            # deadline and knows better which node is missing).
            self._fail(reason, clean=False, notify=self.node_rank == 0, callback=False)
        raise ClusterError(reason or "the cluster stopped during start-up")

    def _timeout_reason(self) -> str:
        with self._cond:
            missing = self._missing()
            joined = ", ".join(link.info.label() for link in self._links.values()
                               if link.info is not None)
        where = _hostport(*self.address)
        if self.node_rank == 0:
            verb = "has" if len(missing) == 1 else "have"
            return (f"start-up timeout: after {_seconds(self.startup_timeout)}, "
                    f"{_nodes_text(missing)} {verb} not joined node 0 at {where} (joined: "
                    f"{joined or 'none'}); check that each was started with its --node-rank "
                    f"and the same --dist-init-addr, and can reach {where} (meshserve doctor)")
        return (f"start-up timeout: after {_seconds(self.startup_timeout)} node 0 at {where} had "
                f"not reported the cluster whole (it was waiting for {_nodes_text(missing)})")

    def _missing(self) -> list[int]:
        """Ranks not joined yet, as far as this node knows (caller holds the lock)."""
        if self.node_rank == 0:
            return [r for r in range(1, self.nnodes) if r not in self._links]
        return list(self._waiting_for)

    # ---- node 0 ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # listener closed
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(f"peer-{peer[0]}", self._leader_reader, _Link(sock, remote=peer[0]))
        self._listener.close()

    def _leader_reader(self, link: _Link) -> None:
        # A stranger is dropped here, before it can send a Join: nothing it sends reaches the
        # cluster's state, and it learns nothing (a Denied at most).
        deadline = time.monotonic() + 2 * HANDSHAKE_TIMEOUT_S  # the handshake, then the Join
        try:
            self._secret.accept(link.sock, _PURPOSE)
            first = link.recv(deadline)
        except HANDSHAKE_ERRORS as err:  # OSError includes timeouts
            logger.warning("cluster: dropped a connection from %s: %s", link.remote,
                           str(err) or type(err).__name__)
            link.close()
            return
        if not isinstance(first, Join):
            logger.warning("cluster: dropped a connection from %s: first message was %s, "
                           "not Join", link.remote, type(first).__name__)
            link.close()
            return
        if not self._admit(link, first):
            link.drain_and_close(LINGER_S)
            return
        link.sock.settimeout(self._silence_timeout)
        assert link.info is not None
        label = link.info.label()
        while True:
            try:
                msg = link.recv()
            except TimeoutError:
                lost = (f"{label} stopped responding (silent for "
                        f"{_seconds(self._silence_timeout)}, --cluster-silence-timeout)")
                break
            except (PeerClosed, OSError):
                lost = f"{label} closed its connection (its process exited or was killed)"
                break
            except ProtocolError as err:
                lost = f"{label} sent an invalid message ({err})"
                break
            if isinstance(msg, Failure):
                self._consider(msg.reason, msg.decisive)
            elif not isinstance(msg, Heartbeat):
                logger.warning("cluster: ignoring unexpected %s from %s", type(msg).__name__, label)
        self._peer_lost(link, lost)

    def _admit(self, link: _Link, join: Join) -> bool:
        """Decide on a Join (node 0). Returns whether the node was admitted; a refusal during
        start-up also fails the start-up, because the cluster as configured cannot form."""
        rank = join.node_rank
        info = NodeInfo(node_rank=rank, address=link.remote, hostname=join.hostname)
        fatal: str | None = None
        ready: Ready | None = None
        with self._cond:
            state = self._state
            holder = self._links.get(rank)
            if state is not _State.STARTING:
                refusal = (f"the cluster is already running (node rank {rank} is "
                           f"{holder.info.label() if holder and holder.info else 'taken'})"
                           if state is _State.WHOLE else f"the cluster is stopping: {self._reason}")
            elif diff := self.fingerprint.diff(join.fingerprint, self_name="node 0",
                                               other_name=f"node {rank}"):
                refusal = f"{info.label()} does not match node 0:\n  " + "\n  ".join(diff)
                fatal = refusal
            elif not 1 <= rank < self.nnodes:
                refusal = (f"node rank {rank} is not valid for a joining node: use --node-rank "
                           f"1..{self.nnodes - 1} (--nnodes {self.nnodes}; node 0 is "
                           f"{self.address[0]})")
                fatal = f"{info.label()} was refused: {refusal}"
            elif holder is not None:
                assert holder.info is not None
                refusal = (f"node rank {rank} is already taken by {holder.info.address} "
                           f"({holder.info.hostname}); every node needs its own --node-rank")
                fatal = (f"two nodes claim node rank {rank}: {holder.info.address} "
                         f"({holder.info.hostname}) and {info.address} ({info.hostname}); every "
                         f"node needs its own --node-rank")
            else:
                refusal = None
                link.info = info
                self._links[rank] = link
                missing = [r for r in range(1, self.nnodes) if r not in self._links]
                link.send(Accepted(waiting_for=missing))
                logger.info("cluster: %s joined; %s", info.label(), _waiting_text(missing))
                if not missing:
                    joined = (self._links[r].info for r in sorted(self._links))
                    self._nodes = [NodeInfo(node_rank=0, address=self.address[0],
                                            hostname=socket.gethostname()),
                                   *(i for i in joined if i is not None)]
                    ready = Ready(nodes=list(self._nodes))
                    self._state = _State.WHOLE
                    self._cond.notify_all()
            if ready is not None:
                for peer in self._links.values():
                    peer.send(ready)
        if refusal is not None:
            logger.warning("cluster: refused %s: %s", info.label(), refusal)
            link.send(Refused(reason=refusal), last=True)
        if fatal is not None:
            self._fail(fatal, clean=False, notify=True, callback=False)
        return refusal is None

    def _peer_lost(self, link: _Link, reason: str) -> None:
        with self._cond:
            state = self._state
        if state is _State.WHOLE:
            # The lost link is still listed while every node is told: a silent node may be
            # only stalled, and then reads why the cluster stopped when it resumes.
            self._fail(reason, clean=False, notify=True, callback=True)
        with self._cond:
            assert link.info is not None
            if self._links.get(link.info.node_rank) is link:
                del self._links[link.info.node_rank]
        link.close()
        if state is _State.STARTING:
            logger.warning("cluster: %s during start-up; waiting for it to join again", reason)

    # ---- node r > 0 --------------------------------------------------------------------------

    def _follower_reader(self, link: _Link) -> None:
        where = _hostport(*self.address)
        while True:
            try:
                msg = link.recv()
            except TimeoutError:
                lost = (f"lost node 0 ({where}): it stopped responding (silent for "
                        f"{_seconds(self._silence_timeout)}, --cluster-silence-timeout)")
                break
            except (PeerClosed, OSError):
                lost = f"lost node 0 ({where}): connection closed (node 0 exited or was killed)"
                break
            except ProtocolError as err:
                lost = f"lost node 0 ({where}): invalid message ({err})"
                break
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, Accepted):
                with self._cond:
                    self._waiting_for = list(msg.waiting_for)
                logger.info("cluster: node 0 accepted node %d; %s", self.node_rank,
                            _waiting_text(msg.waiting_for))
            elif isinstance(msg, Ready):
                with self._cond:
                    if self._state is _State.STARTING:
                        self._state = _State.WHOLE
                        self._nodes = list(msg.nodes)
                        self._waiting_for = []
                        self._cond.notify_all()
            elif isinstance(msg, Refused):
                link.close()
                self._fail(f"node 0 ({where}) refused node {self.node_rank}: {msg.reason}",
                           clean=False, notify=False, callback=True)
                return
            elif isinstance(msg, Shutdown):
                link.close()
                self._fail(msg.reason, clean=msg.clean, notify=False, callback=True)
                return
            else:
                logger.warning("cluster: ignoring unexpected %s from node 0", type(msg).__name__)
        link.close()
        self._fail(lost, clean=False, notify=False, callback=True)

    def _consider(self, reason: str, decisive: bool) -> None:
        """Node 0: a failure report. Decisive: stop the cluster now. Otherwise hold it for
        CONSEQUENCE_GRACE_S; a decisive report meanwhile wins, else this first one does."""
        if decisive:
            self._fail(reason, clean=False, notify=True, callback=True)
            return
        with self._cond:
            if self._held is not None or self._state is not _State.WHOLE:
                return
            self._held = reason
        timer = threading.Timer(CONSEQUENCE_GRACE_S, self._fail, args=(reason,),
                                kwargs={"clean": False, "notify": True, "callback": True})
        timer.daemon = True
        timer.start()

    # ---- shared ------------------------------------------------------------------------------

    def _fail(self, reason: str, *, clean: bool, notify: bool, callback: bool) -> None:
        """Stop the cluster (first call wins). ``notify``: node 0 tells every node (Shutdown),
        node r > 0 tells node 0 (Failure); either way every connection is half-closed, so
        peers see the end of the stream and the reader threads finish. The callback runs
        only if the cluster had been whole, after the other nodes were told."""
        with self._cond:
            if self._state in (_State.FAILED, _State.STOPPED):
                return
            was_whole = self._state is _State.WHOLE
            self._state = _State.STOPPED if clean else _State.FAILED
            self._reason = reason
            links = list(self._links.values())
            self._cond.notify_all()
        self._stop.set()
        log = logger.info if clean else logger.error
        log("cluster: %s: %s", "stopping" if clean else "FAILED", reason)
        for link in links:
            if not notify:
                link.half_close()
            elif self.node_rank == 0:
                link.send(Shutdown(reason=reason, clean=clean), last=True)
            else:
                link.send(Failure(reason=reason), last=True)
        if callback and was_whole:
            self._spawn("on-failure", self._on_failure, reason, clean)

    def _heartbeat_loop(self) -> None:
        beat = Heartbeat()
        while not self._stop.wait(self._heartbeat_interval):
            with self._cond:
                links = list(self._links.values())
            for link in links:
                link.send(beat)  # a failed send shows up at the reader (closed or silent)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"meshserve-cluster-{name}")
        self._threads.append(thread)
        thread.start()

    def _me(self) -> str:
        with self._cond:
            return f"node {self.node_rank} ({self._local_address})"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nodes_text(ranks: list[int]) -> str:
    """'node 2' / 'nodes 2, 3' / 'no other node'."""
    if not ranks:
        return "no other node"
    if len(ranks) == 1:
        return f"node {ranks[0]}"
    return "nodes " + ", ".join(map(str, ranks))


def _waiting_text(missing: list[int]) -> str:
    return f"waiting for {_nodes_text(missing)}" if missing else "every node has joined"


def _seconds(value: float) -> str:
    return f"{round(value, 1):g} s"
