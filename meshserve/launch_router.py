"""`python -m meshserve.launch_router`: the router in front of several servers (docs/router.md).
Imports no torch (a router machine needs none)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from meshserve.router.app import HEADER_TIMEOUT_S, create_router_app
from meshserve.router.args import parse_router_args
from meshserve.server.http_limits import MAX_HEADER_BYTES, bounded_protocol


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_router_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: twice per routed request plus each probe. The router's
    # own lines say what matters (failures, workers leaving and coming back).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logging.getLogger("meshserve.router")
    if args.pd_disaggregation:
        log.info("PD mode: prefill %s, decode %s; policies %s/%s",
                 ", ".join(f"{p.url} (bootstrap port {p.bootstrap_port})" for p in args.prefill),
                 ", ".join(args.decode), args.prefill_policy_name, args.decode_policy_name)
    else:
        log.info("workers %s; policy %s", ", ".join(args.worker_urls) or "(none yet: /add_worker)", args.policy)
    app = create_router_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                http=bounded_protocol(HEADER_TIMEOUT_S), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
