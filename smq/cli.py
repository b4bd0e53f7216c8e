"""The `smq` command: the only reader of argv. With only flags it serves, like the
original SMQ (`smq --port 9000`); `smq serve ...` is the same thing spelled out.
A first word naming a command (`smq produce ...`, see COMMANDS) talks to a server:
its arguments are in `smq.command_options`, what it does in `smq.commands`.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .command_options import (CLIENT_FIELDS, COMMANDS, COMMANDS_TEXT, USAGE, add_setting_flags,
                              command_parser)
from .commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Output, UsageError
from .config import SETTINGS_BY_FIELD, Config, load
from .errors import (NotFound, PermissionDenied, SMQAuthenticationError, SMQConnectionError,
                     SMQError, SMQTimeoutError, StartupError)

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from .client import Client

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
            message = (f"unknown command {argv[0]!r} (commands: serve, {', '.join(COMMANDS)}; "
                       "the server takes only flags)")
        elif misplaced:
            message += (f"\n(commands come first, then their flags: "
                        f"smq {misplaced[0]} ... --port PORT)")
        super().error(message)


def serve_parser() -> argparse.ArgumentParser:
    parser = _ServeParser(prog="smq", usage=USAGE, description=SERVE_DESCRIPTION,
                          epilog=SERVE_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
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
    interval = notifier.check_interval(config.health_check_interval)
    server = Server(dataclasses.replace(config, health_check_interval=interval))
    supervisor = Supervisor(notifier, server.status_line)
    server.liveness.add_listener(supervisor)
    server.start()
    notifier.ready(server.status_line())
    try:
        while not stop.wait(timeout=3600):
            pass
    finally:
        supervisor.stop()
        notifier.stopping()
        logging.getLogger("smq").info("shutting down (grace %.1fs)", config.shutdown_grace)
        server.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["forward"]:
        from .forward import main as forward_main  # loads nats-py only for this command
        return forward_main(args[1:])
    if args[:1] and args[0] in COMMANDS:
        return run_command(args)
    if args[:1] == ["serve"]:
        args = args[1:]
    parser = serve_parser()
    parser.argv = args  # type: ignore[attr-defined]  # for the hint in error()
    parsed = parser.parse_args(args)
    try:
        config = load(vars(parsed))
        return serve(config)
    except StartupError as exc:
        print(f"smq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# -- the commands that talk to a server -------------------------------------------------

def run_command(args: list[str]) -> int:
    """Parse and run a client command; map errors to messages and exit codes."""
    parsed = command_parser().parse_args(args)  # exits 2 on bad usage
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    with client_warnings_on_stderr():
        return run_parsed(parsed)


@contextlib.contextmanager
def client_warnings_on_stderr() -> Iterator[None]:
    """Show the client's warnings (reconnects) as `smq: ...` lines while a command runs."""
    class Stderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:  # whatever sys.stderr is when the record comes
                sys.stderr.write(self.format(record) + "\n")
            except Exception:
                self.handleError(record)

    handler = Stderr()
    handler.setFormatter(logging.Formatter("smq: %(message)s"))
    logger = logging.getLogger("smq.client")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def run_parsed(parsed: argparse.Namespace) -> int:
    # Ctrl-C must end a command even when started from a script or a background job,
    # whose shell hands its children SIGINT already ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with connect(parsed) as client:
            return parsed.run(client, parsed, Output(parsed.json))
    except UsageError as exc:
        print(f"smq {parsed.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SMQError as exc:
        print(f"smq: error: {exc}{hint(exc, parsed)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        # Ctrl-C is how a --follow ends; elsewhere it interrupted an operation.
        return EXIT_OK if getattr(parsed, "follow", False) else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`smq consume t -f | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def hint(exc: SMQError, parsed: argparse.Namespace) -> str:
    """What to try next, in terms of this command line."""
    if isinstance(exc, NotFound) and parsed.command == "consumer":  # a consumer, or a topic
        return "\n(list consumers with: smq consumer list; topics with: smq topic list)"
    if isinstance(exc, NotFound):  # the other commands name only topics
        return "\n(list topics with: smq topic list; create one with: smq topic create NAME)"
    if isinstance(exc, PermissionDenied):
        return "\n(on the server's device, use its socket: smq ... --unix-socket PATH)"
    if isinstance(exc, SMQTimeoutError):
        return "\n(wait longer with --timeout SECONDS)"
    if isinstance(exc, SMQConnectionError):
        return ("\n(connect elsewhere with --host/--port or --unix-socket, or set "
                "SMQ_HOST, PORT, SMQ_UNIX_SOCKET; mTLS: --enable-mtls and the certificate flags)")
    return ""


def connect(parsed: argparse.Namespace) -> Client:
    """A Client for the connection flags, environment and .env file (flags win).

    A socket given by flag wins; a host or port given by flag beats a socket that only
    comes from the environment or the .env file."""
    try:
        config = load({field: getattr(parsed, field) for field in CLIENT_FIELDS})
    except StartupError as exc:
        raise UsageError(str(exc)) from None
    from .client import Client, ClientTLSConfig

    use_socket = parsed.unix_socket is not None or (
        parsed.host is None and parsed.port is None and bool(config.unix_socket))
    if use_socket:
        return Client(unix_socket=config.unix_socket, timeout=parsed.timeout)
    tls = None
    if config.enable_mtls:
        missing = [SETTINGS_BY_FIELD[f].flag for f in ("client_cert", "client_key", "ca_cert")
                   if not getattr(config, f)]
        if missing:
            raise UsageError(f"--enable-mtls needs {', '.join(missing)} (or their environment "
                             "variables CLIENT_CERT, CLIENT_KEY, CA_CERT)")
        tls = ClientTLSConfig(config.client_cert, config.client_key, config.ca_cert)
    try:
        return Client(config.host, config.port, tls, timeout=parsed.timeout)
    except SMQAuthenticationError as exc:
        raise UsageError(str(exc)) from None
