"""The `smq` command: the only reader of argv. With only flags it serves, like the
original SMQ (`smq --port 9000`); `smq serve ...` is the same thing spelled out.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .config import SETTINGS, Config, load
from .errors import StartupError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SERVE_EPILOG = """\
examples:
  smq                                   serve on port 8097 with ./dbtest.db
  smq --port 9000 --dbpath /data/q.db   the same, elsewhere
  SERVER_ENABLE_MTLS=true SERVER_CERT_FILE=server.crt SERVER_KEY_FILE=server.key \\
      SERVER_CA_CERT_FILE=ca.crt smq   require client certificates

Settings come from flags, then environment variables, then the .env file, then defaults.
"""


def add_setting_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, group: str) -> None:
    """One flag per setting of `group`; defaults stay None so only typed flags override."""
    for setting in SETTINGS:
        if setting.group != group:
            continue
        default = setting.default
        shown = ("true" if default else "false") if setting.is_bool else (default if default != "" else "none")
        extra = {"nargs": "?", "const": "true", "metavar": "BOOL"} if setting.is_bool else {"metavar": "VALUE"}
        parser.add_argument(setting.flag, dest=setting.field, default=None,
                            help=f"{setting.help} [env {setting.env}; default {shown}]", **extra)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smq", description="SMQ: a durable, log-based message queue server for small devices.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"smq {__version__}")
    add_setting_flags(parser, "server")
    # The original smq parsed its client flags too; scripts that pass them keep working.
    add_setting_flags(parser.add_argument_group(
        "client settings", "accepted like the original smq did; the server itself does not use them"),
        "client")
    return parser


def setup_logging(level: str) -> None:
    # Plain lines on stderr: the journal adds timestamps and the unit name.
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)


def serve(config: Config) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and exit 0."""
    from .server import Server  # grpc is only loaded by commands that need it
    from .systemd import Notifier, Supervisor

    setup_logging(config.log_level)
    notifier = Notifier()
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()  # only a flag: the main thread does the work
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server = Server(config).start()
    notifier.ready(server.status_line())
    supervisor = Supervisor(notifier, server.service.is_healthy, server.status_line).start()
    try:
        while not stop.wait(timeout=3600):
            pass
    finally:
        notifier.stopping()
        supervisor.stop()
        logging.getLogger("smq").info("shutting down (grace %.1fs)", config.shutdown_grace)
        server.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        args = args[1:]
    parsed = serve_parser().parse_args(args)
    try:
        config = load(vars(parsed))
        return serve(config)
    except StartupError as exc:
        print(f"smq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
