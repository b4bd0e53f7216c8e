"""`smq` with only flags, or `smq serve`: run the server until SIGTERM or SIGINT; SIGHUP
reloads the access-control file (--acl-file)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import select
import signal
from typing import Any

from .. import __version__, connection
from ..errors import EXIT_OK
from ..logs import setup_logging
from ..server import config as server_config
from ..settings import add_flags

USAGE = (
    "%(prog)s [serve] [FLAG ...]\n       %(prog)s COMMAND ... [--host HOST] [--port PORT] [--json]"
)


COMMANDS = ("topic", "produce", "consume", "offsets", "trim", "consumer", "info", "ping")


COMMANDS_TEXT = """\
commands (smq COMMAND --help shows each one's options and examples):
  serve [FLAG ...]                   run the server (the default: smq with only flags)
  topic create|list|describe|delete  manage topics
  topic policy NAME [--max-age D ...]
                                     show or set a topic's retention and disk-full policy
  produce TOPIC [MESSAGE | -]        append a message, or one per line of stdin
  consume TOPIC [--from earliest|latest|N] [--follow] [--limit N] [--consumer NAME]
                                     print messages (offset, payload)
  offsets TOPIC                      earliest and latest offset
  trim TOPIC OFFSET                  delete the messages up to OFFSET
  consumer list|get|commit|delete    durable named consumers and their committed offsets
  info                               the server's version, settings and counters
  forward --topics T1,T2 --nats-servers URL
                                     forward topics to NATS JetStream (smq forward --help)
  ping                               check that the server answers"""


SERVE_DESCRIPTION = f"""\
SMQ: a durable, log-based message queue server for small devices.

With only flags (or as `smq serve`), smq runs the server with the flags below.
The other commands talk to a running server over gRPC (TCP, or its Unix socket).

{COMMANDS_TEXT}"""


SERVE_EPILOG = """\
examples:
  smq                                   serve on port 8097 with ./dbtest.db
  smq --port 9000 --dbpath /data/q.db   the same, elsewhere
  SERVER_ENABLE_MTLS=true SERVER_CERT_FILE=server.crt SERVER_KEY_FILE=server.key \\
      SERVER_CA_CERT_FILE=ca.crt smq   require client certificates
  smq topic create sensors              then, as a client:
  echo '{"t": 21.5}' | smq produce sensors
  smq consume sensors --from latest --follow

Settings come from flags, then environment variables, then the .env file, then defaults.
"""


class _ServeParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        argv = getattr(self, "argv", [])
        misplaced = [word for word in argv if word in COMMANDS]
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            message = (
                f"unknown command {argv[0]!r} (commands: serve, {', '.join(COMMANDS)}; "
                "the server takes only flags)"
            )
        elif misplaced:
            message += (
                f"\n(commands come first, then their flags: smq {misplaced[0]} ... --port PORT)"
            )
        super().error(message)


def serve_parser() -> argparse.ArgumentParser:
    parser = _ServeParser(
        prog="smq",
        usage=USAGE,
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smq {__version__}")
    add_flags(parser, server_config.SETTINGS)
    # The original smq parsed its client flags too; scripts that pass them keep working.
    add_flags(
        parser.add_argument_group(
            "client settings",
            "accepted like the original smq did; the server itself does not use them",
        ),
        [s for s in connection.SETTINGS if s.field not in server_config.SETTINGS_BY_FIELD],
    )
    return parser


def serve(config: server_config.ServerConfig) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and exit 0. SIGHUP reloads the
    ACL file."""
    from ..server import Server  # grpc is only loaded by commands that need it
    from ..systemd import Notifier, Supervisor

    setup_logging(config.log_level)
    notifier = Notifier()
    # The handlers only set flags: Python runs a handler in the main thread between any
    # two bytecodes, also while that thread holds a lock, so a handler that takes one
    # (Event.set does) can deadlock it (a SIGTERM hung the server so, seen by py-spy).
    requested = {"stop": False, "reload": False}

    def request_stop(signum: int, frame: object) -> None:
        requested["stop"] = True
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    def request_reload(signum: int, frame: object) -> None:
        requested["reload"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    interval = notifier.check_interval(config.health_check_interval)
    server = Server(dataclasses.replace(config, health_check_interval=interval))
    supervisor = Supervisor(notifier, server.status_line)
    server.liveness.add_listener(supervisor)
    server.start()
    notifier.ready(server.status_line())
    # Whichever thread the kernel gives a signal to, its C handler writes to this pipe,
    # which wakes the wait below at once (the Python handler has run by then).
    wake_read, wake_write = os.pipe()
    for end in (wake_read, wake_write):
        os.set_blocking(end, False)
    signal.set_wakeup_fd(wake_write)
    try:
        while not requested["stop"]:
            select.select([wake_read], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 512)
            if requested["reload"] and not requested["stop"]:
                requested["reload"] = False
                server.reload_access()
    finally:
        signal.set_wakeup_fd(-1)
        for end in (wake_read, wake_write):
            os.close(end)
        supervisor.stop()
        notifier.stopping()
        logging.getLogger("smq").info("shutting down (grace %.1fs)", config.shutdown_grace)
        server.stop()
    return EXIT_OK
