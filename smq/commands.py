"""The `smq` subcommands that talk to a server: what each one does and prints.

Each command is `run(client, args, out) -> exit code`; `smq.command_options` defines
their arguments, help and examples, and `smq.cli` parses, connects and maps errors to
exit codes. Output is for people (text) or for programs (`--json`: one object a line).
grpc is not imported here: `smq --help` stays fast.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from .client_types import TopicPolicy  # no grpc there
from .errors import InvalidArgument, NotFound, SMQError, Unimplemented

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from .client import Client
    from .client_types import ConsumerInfo, TopicInfo

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C stopped an operation (not a --follow)
READ_CHUNK = 1024**2  # stdin is read in chunks of what is available, at most this


class UsageError(Exception):
    """Bad usage found after parsing; exit code 2."""


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


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells in aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def size_text(size: int) -> str:
    """Bytes the way --max-bytes takes them: 524288 -> 512KiB."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def duration_text(seconds: float) -> str:
    """Seconds the way --max-age takes them: 604800 -> 7d, 90 -> 90s."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def uptime_text(seconds: float) -> str:
    """3725.2 -> 1h 2m 5s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole, parts = int(seconds), []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= factor or parts:
            parts.append(f"{whole // factor}{unit}")
            whole %= factor
    return " ".join(parts)


# -- each command: run(client, args, out) -> exit code -----------------------------------

def cmd_ping(client: Client, args: argparse.Namespace, out: Output) -> int:
    seconds = client.ping()
    out.emit({"target": client.target, "ok": True, "seconds": round(seconds, 6)},
             f"{client.target} answered in {seconds * 1000:.1f} ms")
    return EXIT_OK


def cmd_topic_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    # A server from before CreateTopic said whether it created the topic answers only
    # this question, and only before the create: so it is asked first (one topic, never
    # a list of them).
    existed = topic_exists(client, args.name)
    created = client.create_topic(args.name)  # idempotent: either way the topic exists now
    if created is None and existed is not None:
        created = not existed
    if created is None:
        text = f"topic {args.name!r} exists (this server does not say whether it was created now)"
    else:
        text = f"created topic {args.name!r}" if created else f"topic {args.name!r} already exists"
    out.emit({"topic": args.name, "created": created}, text)
    return EXIT_OK


def topic_exists(client: Client, name: str) -> bool | None:
    """Whether the topic exists; None from a server without DescribeTopic (the original
    SMQ). A bad name is left for the create to refuse."""
    try:
        client.describe_topic(name)
    except (NotFound, InvalidArgument):
        return False
    except Unimplemented:
        return None
    return True


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
    print(table(rows))
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


# Each policy field: its option (without --) and how the table shows a value.
POLICY_OPTIONS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "max_messages": ("max-messages", lambda n: str(n) if n else "no limit"),
    "max_bytes": ("max-bytes", lambda n: size_text(n) if n else "no limit"),
    "max_age": ("max-age", lambda n: duration_text(n) if n else "forever"),
    "on_full": ("on-full", str),
    "keep_uncommitted": ("keep-uncommitted", lambda b: "true" if b else "false"),
}
DEFAULT = "default"  # an option's value that removes its override


def cmd_topic_policy(client: Client, args: argparse.Namespace, out: Output) -> int:
    changes = {field: getattr(args, field) for field in POLICY_OPTIONS
               if getattr(args, field) is not None}
    if not changes and not args.reset:
        overrides, effective = client.get_topic_policy(args.name)
        report_policy(out, args.name, overrides, effective, "")
        return EXIT_OK
    # SetTopicPolicy replaces every override: keep the ones not named here (unless --reset).
    fields = {} if args.reset else dataclasses.asdict(client.get_topic_policy(args.name)[0])
    fields.update({field: None if value == DEFAULT else value for field, value in changes.items()})
    overrides = TopicPolicy(**fields)
    effective = client.set_topic_policy(args.name, **fields)
    done = "reset" if args.reset and not changes else "set"
    report_policy(out, args.name, overrides, effective, f"{done} the policy of topic {args.name!r}\n")
    return EXIT_OK


def report_policy(out: Output, topic: str, overrides: TopicPolicy, effective: TopicPolicy,
                  heading: str) -> None:
    def text() -> str:
        rows = [("SETTING", "OVERRIDE", "EFFECTIVE")]
        for field, (option, show) in POLICY_OPTIONS.items():
            override = getattr(overrides, field)
            rows.append((option, "-" if override is None else show(override),
                         show(getattr(effective, field))))
        return f"{heading}{table(rows)}\n(-: the server's default)"
    out.emit({"topic": topic, "overrides": dataclasses.asdict(overrides),
              "effective": dataclasses.asdict(effective)}, text)


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
    if args.start in (None, "earliest"):
        start = 0
    elif args.start == "latest":
        start = info.latest_offset if info.latest_offset is not None else info.next_offset
    else:
        start = int(args.start)
    # With --consumer, the client starts after the committed offset (at `start` if there
    # is none) and commits each page once it is printed: at least once, never skipped.
    if args.follow:
        messages = client.subscribe(args.topic, start, consumer=args.consumer)
    else:
        messages = client.iter_messages(args.topic, start, follow=False, consumer=args.consumer)
    if args.limit is not None:
        messages = itertools.islice(messages, args.limit)
    printed = None
    # A consumer commits what it printed: Ctrl-C must not fall between a line and its count.
    counted = ctrl_c_deferred if args.consumer is not None else contextlib.nullcontext
    try:
        for payload, offset in messages:
            with counted():
                out.emit({"topic": args.topic, "offset": offset, **payload_fields(payload)},
                         lambda: f"{offset}\t{escape(payload)}",
                         flush=args.follow or args.consumer is not None)
                printed = offset
    except KeyboardInterrupt:
        commit_printed(client, args, printed)
        raise
    commit_printed(client, args, printed)
    return EXIT_OK


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C during the block is raised as KeyboardInterrupt when the block ends; a
    second one at once (the block is stuck, say writing to a pipe nobody reads)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread
        return
    pressed = []

    def press(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, press)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def commit_printed(client: Client, args: argparse.Namespace, printed: int | None) -> None:
    """--consumer: commit what was printed where the iterator has not (--limit, Ctrl-C)."""
    if args.consumer is not None and printed is not None:
        client.commit_offset(args.consumer, args.topic, printed)


# -- durable named consumers --------------------------------------------------------------

def consumer_record(info: ConsumerInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def cmd_consumer_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    consumers = client.list_consumers(args.topic, consumer=args.name)
    if out.as_json:
        for info in consumers:
            out.emit(consumer_record(info), "")
        return EXIT_OK
    if not consumers:
        where = "".join(f" {what} {value!r}" for what, value in
                        (("named", args.name), ("on topic", args.topic)) if value)
        print(f"no consumers{where} (a consumer appears once it commits: "
              "smq consumer commit NAME TOPIC OFFSET, or smq consume TOPIC --consumer NAME)")
        return EXIT_OK
    rows = [("CONSUMER", "TOPIC", "COMMITTED", "LAG", "UPDATED")]
    rows += [(c.consumer, c.topic, str(c.committed_offset), str(c.lag), timestamp(c.updated_at))
             for c in consumers]
    print(table(rows))
    return EXIT_OK


def cmd_consumer_commit(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.commit_offset(args.name, args.topic, args.offset)
    out.emit({"consumer": args.name, "topic": args.topic, "committed_offset": args.offset},
             f"consumer {args.name!r} committed offset {args.offset} of {args.topic!r}; "
             f"it resumes at {args.offset + 1}")
    return EXIT_OK


def cmd_consumer_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    offset = client.committed_offset(args.name, args.topic)
    out.emit({"consumer": args.name, "topic": args.topic, "committed_offset": offset},
             lambda: fields_text([("consumer", args.name), ("topic", args.topic),
                                  ("committed", offset), ("resumes at", offset + 1)]))
    return EXIT_OK


def cmd_consumer_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_consumer(args.name, args.topic)
    where = f"on topic {args.topic!r}" if args.topic else "on every topic"
    out.emit({"consumer": args.name, "topic": args.topic, "deleted": True},
             f"deleted consumer {args.name!r} {where}")
    return EXIT_OK


# -- the server ---------------------------------------------------------------------------

def cmd_info(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.server_info()
    out.emit({"target": client.target, **dataclasses.asdict(info)}, lambda: fields_text([
        ("server", client.target), ("version", info.version), ("durability", info.durability),
        ("max message size", size_text(info.max_message_size)),
        ("uptime", uptime_text(info.uptime)), ("topics", info.topics),
        ("stored messages", info.stored_messages), ("stored bytes", info.stored_bytes),
        ("commits", info.commits), ("committed writes", info.committed_writes),
        ("committed messages", info.committed_messages)]))
    return EXIT_OK
