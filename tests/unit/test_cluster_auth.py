"""The cluster secret: where it comes from, and the handshake over real sockets."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from meshserve.cluster.auth import SECRET_ENV, AuthError, ClusterSecret, SecretError
from meshserve.cluster.launcher import RankExit

GOOD = "0123456789abcdef-good"


def test_resolve_order_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, GOOD + "-env")
    secret_file = tmp_path / "secret"
    secret_file.write_text(GOOD + "-file\n")
    secret_file.chmod(0o600)
    assert ClusterSecret.resolve(flag=GOOD, file=str(secret_file), node_rank=1).value == (GOOD + "-file").encode()
    assert ClusterSecret.resolve(flag=GOOD, file=None, node_rank=1).value == GOOD.encode()
    assert ClusterSecret.resolve(flag=None, file=None, node_rank=1).source == SECRET_ENV
    secret_file.chmod(0o644)
    with pytest.raises(SecretError, match="accessible to other users"):
        ClusterSecret.resolve(flag=None, file=str(secret_file), node_rank=0)
    with pytest.raises(SecretError, match="shorter than 16"):
        ClusterSecret.resolve(flag="short", file=None, node_rank=0)
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(SecretError, match="node 2 needs the cluster secret"):
        ClusterSecret.resolve(flag=None, file=None, node_rank=2)
    generated = ClusterSecret.resolve(flag=None, file=None, node_rank=0)
    assert generated.generated and f"{SECRET_ENV}={generated.value.decode()}" in generated.start_line()
    assert generated.value.decode() not in repr(generated)


def _handshake(server: ClusterSecret, client: ClusterSecret, purpose: bytes = b"p",
               client_purpose: bytes | None = None) -> tuple[BaseException | None, BaseException | None]:
    a, b = socket.socketpair()
    errors: dict[str, BaseException | None] = {"server": None, "client": None}

    def serve() -> None:
        try:
            server.accept(a, purpose)
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            errors["server"] = err

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client.connect(b, client_purpose or purpose)
    except Exception as err:  # noqa: BLE001
        errors["client"] = err
    thread.join(10)
    a.close(), b.close()
    return errors["server"], errors["client"]


def test_handshake_admits_only_the_same_secret_and_purpose() -> None:
    good, other = ClusterSecret(GOOD.encode(), "a"), ClusterSecret(b"another-secret-of-16", "b")
    assert _handshake(good, good) == (None, None)
    server_err, client_err = _handshake(good, other)
    assert isinstance(server_err, AuthError) and isinstance(client_err, AuthError)
    assert "refused this node's cluster secret" in str(client_err)
    # A proof for one port does not open another.
    server_err, _ = _handshake(good, good, purpose=b"coordinator", client_purpose=b"rendezvous")
    assert isinstance(server_err, AuthError)


def test_rank_exit_names_the_signal() -> None:
    killed = RankExit(node_rank=1, rank=3, pid=42, exitcode=-9)
    assert killed.decisive and killed.describe() == "scheduler rank 3 on node 1 (pid 42) was killed by SIGKILL"
    exited = RankExit(node_rank=0, rank=0, pid=7, exitcode=1)
    assert not exited.decisive and exited.describe().endswith("exited with code 1")
