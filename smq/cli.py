"""The `smq` command: the only reader of argv. With only flags it serves, like the
original SMQ (`smq --port 9000`); `smq serve ...` is the same thing spelled out.
A first word naming a command (`smq produce ...`, see COMMANDS) talks to a server.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or configuration.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from . import __version__
from .config import SETTINGS, SETTINGS_BY_FIELD, Config, load
from .errors import (NotFound, PermissionDenied, SMQAuthenticationError, SMQConnectionError,
                     SMQError, SMQTimeoutError, StartupError)

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from .client import Client, TopicInfo

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C stopped an operation (not a --follow)

COMMANDS = ("topic", "produce", "consume", "offsets", "trim", "ping")
CLIENT_FIELDS = ("host", "port", "unix_socket", "enable_mtls", "client_cert", "client_key",
                 "ca_cert", "env_file")
READ_CHUNK = 1024**2  # stdin is read in chunks of what is available, at most this

COMMANDS_TEXT = """\
commands (smq COMMAND --help shows each one's options and examples):
  serve [FLAG ...]                   run the server (the default: smq with only flags)
  topic create|list|describe|delete  manage topics
  produce TOPIC [MESSAGE | -]        append a message, or one per line of stdin
  consume TOPIC [--from earliest|latest|N] [--follow] [--limit N]
                                     print messages (offset, payload)
  offsets TOPIC                      earliest and latest offset
  trim TOPIC OFFSET                  delete the messages up to OFFSET
  ping                               check that the server answers"""

SERVE_USAGE = "%(prog)s [serve] [FLAG ...]\n       %(prog)s COMMAND ... [--host HOST] [--port PORT] [--json]"

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


def add_setting_flags(parser: argparse.ArgumentParser | Any, group: str) -> None:
    """One flag per setting of `group`; defaults stay None so only typed flags override."""
    for setting in SETTINGS:
        if setting.group != group:
            continue
        default = setting.default
        shown = ("true" if default else "false") if setting.is_bool else (default if default != "" else "none")
        extra = {"nargs": "?", "const": "true", "metavar": "BOOL"} if setting.is_bool else {"metavar": "VALUE"}
        parser.add_argument(setting.flag, dest=setting.field, default=None,
                            help=f"{setting.help} [env {setting.env}; default {shown}]", **extra)


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
    parser = _ServeParser(prog="smq", usage=SERVE_USAGE, description=SERVE_DESCRIPTION,
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

class UsageError(Exception):
    """Bad usage found after parsing; exit code 2."""


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
    if isinstance(exc, NotFound):  # only topics can be missing for these commands
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


class Output:
    """Writes results for people (text) or programs (--json: one object per line)."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def emit(self, record: dict[str, Any], text: str | Callable[[], str], flush: bool = False) -> None:
        line = json.dumps(record) if self.as_json else (text() if callable(text) else text)
        self.stream.write(line + "\n")
        if flush:
            self.stream.flush()


def escape(payload: bytes) -> str:
    r"""Payload text for a terminal: UTF-8 as is; \\, \n, \t, \r, other control
    characters and bytes that are not UTF-8 escaped (\xNN, \uNNNN)."""
    out = []
    for char in payload.decode("utf-8", errors="surrogateescape"):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not char.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def payload_fields(payload: bytes) -> dict[str, str]:
    """JSON for a payload: its text when it is UTF-8, else base64."""
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_base64": base64.b64encode(payload).decode("ascii")}


def fields_text(pairs: Iterable[tuple[str, Any]]) -> str:
    pairs = list(pairs)
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}  {'-' if value is None else value}" for key, value in pairs)


def topic_record(info: TopicInfo) -> dict[str, Any]:
    return {"topic": info.name, "earliest": info.earliest_offset, "latest": info.latest_offset,
            "next": info.next_offset, "messages": info.message_count, "bytes": info.stored_bytes,
            "created_at": info.created_at}


def timestamp(unix_seconds: int) -> str:
    return datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- each command: run(client, args, out) -> exit code -----------------------------------

def cmd_ping(client: Client, args: argparse.Namespace, out: Output) -> int:
    seconds = client.ping()
    out.emit({"target": client.target, "ok": True, "seconds": round(seconds, 6)},
             f"{client.target} answered in {seconds * 1000:.1f} ms")
    return EXIT_OK


def cmd_topic_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    existed = args.name in {t.name for t in client.list_topics()}
    client.create_topic(args.name)  # idempotent: both paths end with the topic existing
    out.emit({"topic": args.name, "created": not existed},
             f"topic {args.name!r} already exists" if existed else f"created topic {args.name!r}")
    return EXIT_OK


def cmd_topic_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    topics = client.list_topics()
    if out.as_json:
        for info in topics:
            out.emit(topic_record(info), "")
        return EXIT_OK
    if not topics:
        print("no topics (create one with: smq topic create NAME)")
        return EXIT_OK
    rows = [("TOPIC", "MESSAGES", "EARLIEST", "LATEST", "BYTES")]
    rows += [(t.name, str(t.message_count), str(t.earliest_offset or "-"),
              str(t.latest_offset or "-"), str(t.stored_bytes)) for t in topics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return EXIT_OK


def cmd_topic_describe(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.name)
    out.emit(topic_record(info), lambda: fields_text([
        ("topic", info.name), ("messages", info.message_count),
        ("earliest", info.earliest_offset), ("latest", info.latest_offset),
        ("next", info.next_offset), ("bytes", info.stored_bytes),
        ("created", timestamp(info.created_at))]))
    return EXIT_OK


def cmd_topic_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_topic(args.name)
    out.emit({"topic": args.name, "deleted": True}, f"deleted topic {args.name!r}")
    return EXIT_OK


def cmd_offsets(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.topic)
    record = {"topic": info.name, "earliest": info.earliest_offset,
              "latest": info.latest_offset, "next": info.next_offset}
    text = fields_text([("earliest", info.earliest_offset), ("latest", info.latest_offset)])
    if info.earliest_offset is None:
        text += f"\n(empty: the next message gets offset {info.next_offset})"
    out.emit(record, text)
    return EXIT_OK


def cmd_trim(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_until_offset(args.topic, args.offset)
    info = client.describe_topic(args.topic)
    now = (f"the earliest is now {info.earliest_offset}" if info.earliest_offset is not None
           else "the topic is now empty")
    out.emit({"topic": args.topic, "until": args.offset, "earliest": info.earliest_offset,
              "latest": info.latest_offset}, f"deleted messages up to offset {args.offset}; {now}")
    return EXIT_OK


def cmd_produce(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.message is not None and args.message != "-":
        if args.whole:
            raise UsageError("--whole reads stdin: give - or no MESSAGE")
        offset = client.produce(args.topic, os.fsencode(args.message))
        report_produced(out, args.topic, [range(offset, offset + 1)])
        return EXIT_OK
    stdin = sys.stdin.buffer
    if sys.stdin.isatty():
        print("smq: reading messages from the terminal, "
              f"{'all as one message' if args.whole else 'one per line'}; end with Ctrl-D",
              file=sys.stderr)
    if args.whole:
        offset = client.produce(args.topic, stdin.read())
        report_produced(out, args.topic, [range(offset, offset + 1)])
        return EXIT_OK
    ranges: list[range] = []
    try:
        for lines in read_lines(stdin):
            ranges += client.produce_many(args.topic, lines, batch_size=args.batch_size)
    except SMQError as exc:
        appended = sum(len(r) for r in ranges)
        if appended:  # earlier chunks were committed: say so, with the error
            exc.args = (f"{exc}\n({plural(appended, 'message')} of the input were "
                        f"appended before this failure, up to offset {ranges[-1][-1]})",)
        raise
    report_produced(out, args.topic, ranges)
    return EXIT_OK


def read_lines(stream: BinaryIO) -> Iterator[list[bytes]]:
    """The complete lines of stream, in lists of what was available at once, so that a
    slow pipe's lines are sent as they come and a file's go in large batches. The line
    end (\\n or \\r\\n) is removed; an unterminated last line counts as a line."""
    rest = b""
    while True:
        chunk = stream.read1(READ_CHUNK) if hasattr(stream, "read1") else stream.read(READ_CHUNK)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if lines:
            yield [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if rest:
        yield [rest[:-1] if rest.endswith(b"\r") else rest]


def report_produced(out: Output, topic: str, ranges: list[range]) -> None:
    ranges = [r for r in ranges if len(r)]
    count = sum(len(r) for r in ranges)
    spans: list[list[int]] = []  # merge batches that follow each other
    for r in ranges:
        if spans and spans[-1][1] + 1 == r.start:
            spans[-1][1] = r[-1]
        else:
            spans.append([r.start, r[-1]])
    if not spans:
        where = ""
    elif len(spans) == 1 and spans[0][0] == spans[0][1]:
        where = f", offset {spans[0][0]}"
    elif len(spans) <= 3:
        where = ", offsets " + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    else:
        where = f", offsets {spans[0][0]} to {spans[-1][1]} (among other producers' messages)"
    out.emit({"topic": topic, "count": count, "first_offset": spans[0][0] if spans else None,
              "last_offset": spans[-1][1] if spans else None},
             f"appended {plural(count, 'message')} to {topic!r}{where}")


def cmd_consume(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.topic)  # fails fast: no such topic, server down
    if args.start == "earliest":
        start = 0
    elif args.start == "latest":
        start = info.latest_offset if info.latest_offset is not None else info.next_offset
    else:
        start = int(args.start)
    if args.follow:
        messages = client.subscribe(args.topic, start)
    else:
        messages = client.iter_messages(args.topic, start, follow=False)
    if args.limit is not None:
        messages = itertools.islice(messages, args.limit)
    for payload, offset in messages:
        out.emit({"topic": args.topic, "offset": offset, **payload_fields(payload)},
                 lambda: f"{offset}\t{escape(payload)}", flush=args.follow)
    return EXIT_OK


# -- parsers ----------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text}")
    return value


def offset_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an offset of 0 or more, not {text}")
    return value


def start_offset(text: str) -> str:
    if text in ("earliest", "latest") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected earliest, latest or an offset, not {text!r}")


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text}")
    return value


def common_flags() -> argparse.ArgumentParser:
    """Connection and output flags, shared by every command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    add_setting_flags(group, "client")
    port = SETTINGS_BY_FIELD["port"]
    group.add_argument("--port", dest="port", default=None, metavar="PORT",
                       help=f"server port [env {port.env}; default {port.default}]")
    group.add_argument("--unix-socket", dest="unix_socket", default=None, metavar="PATH",
                       help="connect through the server's Unix socket instead of TCP; writes "
                            "are always allowed there [env SMQ_UNIX_SOCKET]")
    group.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                       help="give up on a call after this long [default 10]")
    group.add_argument("--env-file", dest="env_file", default=None, metavar="PATH",
                       help="file of KEY=value settings read below the environment [default .env]")
    parent.add_argument("--json", action="store_true",
                        help="print one JSON object per line, for programs")
    return parent


EXAMPLES = {
    "topic": """\
examples:
  smq topic create sensors
  smq topic list
  smq topic describe sensors
  smq topic delete sensors""",
    "ping": """\
examples:
  smq ping
  smq ping --host 192.168.1.20 --port 9000
  smq ping --unix-socket /run/smq/smq.sock""",
    "create": """\
examples:
  smq topic create sensors      (creating an existing topic is fine)""",
    "list": """\
examples:
  smq topic list
  smq topic list --json | jq -r .topic""",
    "describe": """\
examples:
  smq topic describe sensors""",
    "delete": """\
examples:
  smq topic delete sensors      (a re-created topic continues its offsets)
  smq topic delete sensors --unix-socket /run/smq/smq.sock
                                (when the server refuses remote writes)""",
    "produce": """\
examples:
  smq produce sensors '{"t": 21.5}'          one message
  printf 'a\\nb\\nc\\n' | smq produce sensors    three messages, one per line
  tail -f app.log | smq produce logs         every line as it comes
  smq produce images --whole < photo.jpg     the whole input as one message""",
    "consume": """\
examples:
  smq consume sensors                         every stored message, then exit
  smq consume sensors --from latest           the latest message
  smq consume sensors --from 100 --limit 10   offsets 100 to 109 (or what is left)
  smq consume sensors --from latest --follow  the latest, then each new one (Ctrl-C ends)
  smq consume sensors --json | jq .payload

output: OFFSET<TAB>PAYLOAD per message, non-printable bytes escaped (\\n, \\xNN);
with --json: {"topic", "offset", "payload"} ("payload_base64" if it is not UTF-8).""",
    "offsets": """\
examples:
  smq offsets sensors
  smq offsets sensors --json""",
    "trim": """\
examples:
  smq trim sensors 1000          delete offsets up to 1000; offsets are never reused""",
}


def command_parser() -> argparse.ArgumentParser:
    parent = common_flags()
    parser = argparse.ArgumentParser(
        prog="smq", usage=SERVE_USAGE, description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(subparsers: Any, name: str, help_text: str, run: Callable[..., int],
            example: str | None = None) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, parents=[parent], help=help_text, description=help_text,
                                    epilog=EXAMPLES[example or name],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    add(commands, "ping", "check that the server answers, and how fast", cmd_ping)

    topic = commands.add_parser("topic", help="create, list, describe or delete topics",
                                description="create, list, describe or delete topics",
                                epilog=EXAMPLES["topic"],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = topic.add_subparsers(dest="action", metavar="ACTION", required=True)
    add(actions, "create", "create a topic (idempotent)", cmd_topic_create).add_argument(
        "name", metavar="NAME", help="1 to 249 characters of A-Z a-z 0-9 . _ -")
    add(actions, "list", "list the topics with their offsets and sizes", cmd_topic_list)
    add(actions, "describe", "show a topic's offsets, size and creation time",
        cmd_topic_describe).add_argument("name", metavar="NAME")
    add(actions, "delete", "delete a topic and all its messages (a remote write)",
        cmd_topic_delete).add_argument("name", metavar="NAME")

    produce = add(commands, "produce", "append messages to a topic", cmd_produce)
    produce.add_argument("topic", metavar="TOPIC")
    produce.add_argument("message", metavar="MESSAGE", nargs="?",
                         help="the message; - or none: read stdin, one message per line")
    produce.add_argument("--whole", action="store_true",
                         help="send all of stdin as one message (binary safe)")
    produce.add_argument("--batch-size", type=positive_int, default=1000, metavar="N",
                         help="messages per request when reading lines [default 1000]")

    consume = add(commands, "consume", "print messages of a topic", cmd_consume)
    consume.add_argument("topic", metavar="TOPIC")
    consume.add_argument("--from", dest="start", type=start_offset, default="earliest",
                         metavar="earliest|latest|N", help="where to start [default earliest]")
    consume.add_argument("-f", "--follow", action="store_true",
                         help="keep printing new messages as they come (Ctrl-C ends); "
                              "reconnects by itself when the server restarts")
    consume.add_argument("-n", "--limit", type=offset_int, default=None, metavar="N",
                         help="stop after N messages")

    offsets = add(commands, "offsets", "show the earliest and latest offset of a topic", cmd_offsets)
    offsets.add_argument("topic", metavar="TOPIC")

    trim = add(commands, "trim", "delete the messages of a topic up to an offset", cmd_trim)
    trim.add_argument("topic", metavar="TOPIC")
    trim.add_argument("offset", metavar="OFFSET", type=offset_int,
                      help="delete every message with an offset up to this one")
    return parser
