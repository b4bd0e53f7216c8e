"""The `smq` subcommands that talk to a server: what each one does and prints.

Each command is `run(client, args, out) -> exit code`; `smq.command_options` defines
their arguments, help and examples, and `smq.cli` parses, connects and maps errors to
exit codes. Output is for people (text) or for programs (`--json`: one object a line).
grpc is not imported here: `smq --help` stays fast.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import SMQError

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from .client import Client, TopicInfo

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
