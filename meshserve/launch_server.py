"""`python -m meshserve.launch_server ARGS`: serve one model over HTTP (SGLang's command line).

Start-up order: parse and validate the arguments, resolve the model, bind the HTTP port (a busy
port fails at once, not after the model loaded), load the tokenizer, start the scheduler
processes, wait for them, serve. The tokenizer loads first so that the TokenizerManager's
sockets are bound soon after the schedulers start: a scheduler that fails at once still gets its
SchedulerFailed reason delivered. Any start-up failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from meshserve.config.server_args import ServerArgs

log = logging.getLogger("meshserve")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)  # exits 2 with "error: ..." lines on bad arguments
    configure_logging(args.http.log_level)

    from meshserve.cluster.launcher import launch_schedulers
    from meshserve.config.model_config import ModelConfig
    from meshserve.server.http_server import bind_http_socket, serve
    from meshserve.server.tokenizer_manager import load_tokenizer

    try:
        model_config = ModelConfig.from_server_args(args)
        sock = bind_http_socket(args.http.host, args.http.port)
    except (ValueError, OSError) as err:  # ModelConfigError is a ValueError
        log.error("cannot start: %s", err)
        return 1
    with sock:
        try:
            tokenizer = load_tokenizer(model_config.tokenizer_path, trust_remote_code=args.model.trust_remote_code)
        except (OSError, ValueError) as err:
            log.error("cannot load the tokenizer from %s: %s", model_config.tokenizer_path, err)
            return 1
        try:
            processes = launch_schedulers(args, model_config)
        except Exception as err:  # noqa: BLE001 - one line for the user, the traceback at debug level
            log.error("cannot start the scheduler processes: %s: %s", type(err).__name__, err,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return 1
        try:
            return asyncio.run(serve(args, model_config, tokenizer, processes, sock))
        except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
            return 130
        finally:
            processes.shutdown()

if __name__ == "__main__":
    sys.exit(main())
