"""The `meshserve` command: `meshserve serve ARGS` (= python -m meshserve.launch_server),
`meshserve bench ARGS` (= python -m meshserve.bench_serving), `meshserve router ARGS`
(= python -m meshserve.launch_router) and `meshserve doctor ARGS` (the multi-node preflight,
= python -m meshserve.doctor)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _serve(argv: Sequence[str]) -> int:
    from meshserve.launch_server import run

    run(argv)


def _bench(argv: Sequence[str]) -> int:
    from meshserve.bench.serving import main

    return main(argv)


def _router(argv: Sequence[str]) -> int:
    from meshserve.launch_router import main

    return main(argv)


def _doctor(argv: Sequence[str]) -> int:
    from meshserve.doctor import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (_serve, "serve a model over HTTP (the flags of python -m meshserve.launch_server)"),
    "bench": (_bench, "benchmark a running server (the flags of python -m meshserve.bench_serving)"),
    "router": (_router, "route requests over several servers (the flags of python -m meshserve.launch_router)"),
    "doctor": (_doctor, "multi-node preflight: rendezvous, interface, devices, all-reduce, model files"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<7}{help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: meshserve COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
