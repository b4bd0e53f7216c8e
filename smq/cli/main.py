"""The `smq` command: the only reader of argv. With only flags it serves, like the
original SMQ (`smq --port 9000`); `smq serve ...` is the same thing spelled out (serve.py).
A first word naming a command (`smq produce ...`) talks to a server: each command
group's module (topic, messages, consumer, info) has its parser and its run; this
module parses, connects and maps errors to exit codes (smq.errors.EXIT_*).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING

from .. import connection
from ..errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AccessDenied,
    CertificateError,
    ConfigError,
    NotFound,
    PermissionDenied,
    SMQAuthenticationError,
    SMQConnectionError,
    SMQError,
    SMQTimeoutError,
    StartupError,
)
from ..server import config as server_config
from . import consumer, info, messages, topic
from .common import Output, UsageError, common_flags
from .serve import COMMANDS, COMMANDS_TEXT, USAGE, serve, serve_parser

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from ..client import Client

COMMAND_GROUPS = (info, topic, messages, consumer)

# How long a command keeps trying to connect while connections fail (nothing listening,
# a restart): a server that is down is reported at once, not after --timeout.
UNREACHABLE_AFTER = 1.0  # seconds

# What to change on this command line, by the cause the client found (smq.client.probe).
CAUSE_HINTS = {
    "tls-expected": "(this server uses mutual TLS: --enable-mtls --client-cert FILE "
    "--client-key FILE --ca-cert FILE, or ENABLE_MTLS, CLIENT_CERT, CLIENT_KEY, CA_CERT)",
    "not-tls": "(this server is plaintext: leave out --enable-mtls, or set ENABLE_MTLS=false)",
    "client-cert-refused": "(give a certificate signed by the CA the server trusts: "
    "--client-cert and --client-key, or CLIENT_CERT and CLIENT_KEY)",
    "server-cert-untrusted": "(give the CA that signed the server's certificate: "
    "--ca-cert, or CA_CERT)",
    "server-cert-expired": "(the server needs a new certificate: its --server-cert)",
    "hostname-mismatch": "(connect with --host set to a name in the server's certificate, "
    "or give one with --server-hostname NAME)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["forward"]:
        from ..forward.main import main as forward_main  # loads nats-py only for this command

        return forward_main(args[1:])
    if args[:1] and args[0] in COMMANDS:
        return run_command(args)
    if args[:1] == ["serve"]:
        args = args[1:]
    parser = serve_parser()
    parser.argv = args  # type: ignore[attr-defined]  # for the hint in error()
    parsed = parser.parse_args(args)
    try:
        config = server_config.load(vars(parsed))
        return serve(config)
    except StartupError as exc:
        print(f"smq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# -- the commands that talk to a server -------------------------------------------------


def command_parser() -> argparse.ArgumentParser:
    parent = common_flags()
    parser = argparse.ArgumentParser(
        prog="smq",
        usage=USAGE,
        description=COMMANDS_TEXT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog="smq")
    for group in COMMAND_GROUPS:
        group.add_commands(commands, parent)
    return parser


def run_command(args: list[str]) -> int:
    """Parse and run a client command; map errors to messages and exit codes."""
    parsed = command_parser().parse_args(args)  # exits 2 on bad usage
    quiet_grpc(os.environ)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    with client_warnings_on_stderr():
        return run_parsed(parsed)


def quiet_grpc(environ: MutableMapping[str, str]) -> None:
    """Keep gRPC's C core from logging to stderr (a TLS handshake failure is logged on
    every attempt) what the command's error says in one line; a user who sets
    GRPC_VERBOSITY or GRPC_TRACE gets what they set. Read when grpc is loaded: later
    settings have no effect (commands load grpc only when they connect)."""
    if "grpc" not in sys.modules:
        environ.setdefault("GRPC_VERBOSITY", "NONE")
        environ.setdefault("GRPC_TRACE", "")


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
        print(error_text(exc, parsed), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        # Ctrl-C is how a --follow ends; elsewhere it interrupted an operation.
        return EXIT_OK if getattr(parsed, "follow", False) else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`smq consume t -f | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def error_text(exc: SMQError, parsed: argparse.Namespace) -> str:
    """`smq: error: could not ACTION: PROBLEM`, with the command's own action, then the
    notes the command added, what to try next, and with --verbose gRPC's text."""
    message = str(exc)
    doing = getattr(parsed, "doing", "")
    if exc.problem and doing:
        message = f"could not {doing.format(**vars(parsed))}: {exc.problem}"
    notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))
    details = f"\n(gRPC: {exc.details})" if parsed.verbose and exc.details else ""
    return f"smq: error: {message}{notes}{hint(exc, parsed)}{details}"


def hint(exc: SMQError, parsed: argparse.Namespace) -> str:
    """What to try next, in terms of this command line."""
    if exc.cause in CAUSE_HINTS:
        return "\n" + CAUSE_HINTS[exc.cause]
    if isinstance(exc, NotFound) and parsed.command == "consumer":  # a consumer, or a topic
        return "\n(list consumers with: smq consumer list; topics with: smq topic list)"
    if isinstance(exc, NotFound):  # the other commands name only topics
        return "\n(list topics with: smq topic list; create one with: smq topic create NAME)"
    if isinstance(exc, PermissionDenied) and not isinstance(exc, AccessDenied):
        # remote writes disabled; an ACL's denial names identity, right and topic itself
        return "\n(on the server's device, use its socket: smq ... --unix-socket PATH)"
    if isinstance(exc, SMQTimeoutError):
        return "\n(wait longer with --timeout SECONDS)"
    if isinstance(exc, SMQConnectionError):
        mtls = "" if exc.cause else "; mTLS: --enable-mtls and the certificate flags"
        return (
            "\n(connect elsewhere with --host/--port or --unix-socket, or set "
            f"SMQ_HOST, PORT, SMQ_UNIX_SOCKET{mtls})"
        )
    return ""


def connect(parsed: argparse.Namespace) -> Client:
    """A Client for the connection flags, environment and .env file (flags win).

    A socket given by flag wins; a host or port given by flag beats a socket that only
    comes from the environment or the .env file."""
    try:
        config = connection.load({s.field: getattr(parsed, s.field) for s in connection.SETTINGS})
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    from ..client import Client, ClientTLSConfig

    use_socket = parsed.unix_socket is not None or (
        parsed.host is None and parsed.port is None and bool(config.unix_socket)
    )
    if use_socket:
        return reachable(Client(unix_socket=config.unix_socket, timeout=parsed.timeout))
    tls = None
    if config.enable_mtls:
        missing = config.missing_tls_files()
        if missing:
            variables = ", ".join(
                connection.SETTINGS_BY_FIELD[name].env for name in connection.CLIENT_TLS_FILES
            )
            raise UsageError(
                f"--enable-mtls needs {', '.join(missing)} (or their environment "
                f"variables {variables})"
            )
        try:
            config.tls_files()  # a bad file is named by its flag here, not by the client
        except CertificateError as exc:
            raise UsageError(str(exc)) from None
        tls = ClientTLSConfig(config.client_cert, config.client_key, config.ca_cert)
    try:
        client = Client(
            config.host,
            config.port,
            tls,
            timeout=parsed.timeout,
            server_hostname=parsed.server_hostname,
        )
    except SMQAuthenticationError as exc:
        raise UsageError(str(exc)) from None
    return reachable(client)


def reachable(client: Client) -> Client:
    """`client`, once its server answers: a server that is down, or refuses the
    certificates, fails the command within about UNREACHABLE_AFTER seconds (one that
    takes the connection and answers slowly still has --timeout)."""
    try:
        client.connect(unreachable_for=UNREACHABLE_AFTER)
    except BaseException:
        client.close()
        raise
    return client
