"""`smq produce`, `smq consume`, `smq offsets`, `smq trim`: the messages of a topic."""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from ..domain import plural
from ..errors import EXIT_OK, SMQError
from .common import (
    Output,
    UsageError,
    add_command,
    escape,
    fields_text,
    offset_int,
    payload_fields,
    positive_int,
    start_offset,
)

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from ..client import Client

READ_CHUNK = 1024**2  # stdin is read in chunks of what is available, at most this

EXAMPLES = {
    'produce': (
        'examples:\n'
        '  smq produce sensors \'{"t": 21.5}\'          one message\n'
        "  printf 'a\\nb\\nc\\n' | smq produce sensors    three messages, one per line\n"
        '  tail -f app.log | smq produce logs         every line as it comes\n'
        '  smq produce images --whole < photo.jpg     the whole input as one message'
    ),
    'consume': (
        'examples:\n'
        '  smq consume sensors                         every stored message, then exit\n'
        '  smq consume sensors --from latest           the latest message\n'
        '  smq consume sensors --from 100 --limit 10   offsets 100 to 109 (or what is left)\n'
        '  smq consume sensors --from latest --follow  the latest, then each new one (Ctrl-C ends)\n'  # noqa: E501 (help text)
        '  smq consume sensors --json | jq .payload\n'
        "  smq consume sensors --consumer uploader     what 'uploader' has not seen yet; commits it\n"  # noqa: E501 (help text)
        '  smq consume sensors --consumer uploader -f  the same, then follow (a durable consumer)\n'
        '\n'
        'output: OFFSET<TAB>PAYLOAD per message, non-printable bytes escaped (\\n, \\xNN);\n'
        'with --json: {"topic", "offset", "payload"} ("payload_base64" if it is not UTF-8).'
    ),
    'offsets': ('examples:\n  smq offsets sensors\n  smq offsets sensors --json'),
    'trim': (
        'examples:\n'
        '  smq trim sensors 1000          delete offsets up to 1000; offsets are never reused'
    ),
}


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    produce = add_command(
        commands,
        parent,
        "produce",
        "append messages to a topic",
        cmd_produce,
        EXAMPLES["produce"],
        "produce to {topic!r}",
    )
    produce.add_argument("topic", metavar="TOPIC")
    produce.add_argument(
        "message",
        metavar="MESSAGE",
        nargs="?",
        help="the message; - or none: read stdin, one message per line",
    )
    produce.add_argument(
        "--whole", action="store_true", help="send all of stdin as one message (binary safe)"
    )
    produce.add_argument(
        "--batch-size",
        type=positive_int,
        default=1000,
        metavar="N",
        help="messages per request when reading lines [default 1000]",
    )

    consume = add_command(
        commands,
        parent,
        "consume",
        "print messages of a topic",
        cmd_consume,
        EXAMPLES["consume"],
        "read messages of {topic!r}",
    )
    consume.add_argument("topic", metavar="TOPIC")
    consume.add_argument(
        "--from",
        dest="start",
        type=start_offset,
        default=None,
        metavar="earliest|latest|N",
        help="where to start [default earliest]",
    )
    consume.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new messages as they come (Ctrl-C ends); "
        "reconnects by itself when the server restarts",
    )
    consume.add_argument(
        "-n", "--limit", type=offset_int, default=None, metavar="N", help="stop after N messages"
    )
    consume.add_argument(
        "--consumer",
        metavar="NAME",
        default=None,
        help="read as this durable consumer: start after its committed offset "
        "(at --from if it has none) and commit what is printed",
    )

    offsets = add_command(
        commands,
        parent,
        "offsets",
        "show the earliest and latest offset of a topic",
        cmd_offsets,
        EXAMPLES["offsets"],
        "get the offsets of {topic!r}",
    )
    offsets.add_argument("topic", metavar="TOPIC")

    trim = add_command(
        commands,
        parent,
        "trim",
        "delete the messages of a topic up to an offset",
        cmd_trim,
        EXAMPLES["trim"],
        "delete the messages of {topic!r} up to offset {offset}",
    )
    trim.add_argument("topic", metavar="TOPIC")
    trim.add_argument(
        "offset",
        metavar="OFFSET",
        type=offset_int,
        help="delete every message with an offset up to this one",
    )


def cmd_produce(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.message is not None and args.message != "-":
        if args.whole:
            raise UsageError("--whole reads stdin: give - or no MESSAGE")
        offset = client.produce(args.topic, os.fsencode(args.message))
        report_produced(out, args.topic, [range(offset, offset + 1)])
        return EXIT_OK
    stdin = sys.stdin.buffer
    if sys.stdin.isatty():
        print(
            "smq: reading messages from the terminal, "
            f"{'all as one message' if args.whole else 'one per line'}; end with Ctrl-D",
            file=sys.stderr,
        )
    if args.whole:
        offset = client.produce(args.topic, stdin.read())
        report_produced(out, args.topic, [range(offset, offset + 1)])
        return EXIT_OK
    report_produced(
        out, args.topic, produce_lines(client, args.topic, read_lines(stdin), args.batch_size)
    )
    return EXIT_OK


def produce_lines(
    client: Client, topic: str, chunks: Iterator[list[bytes]], batch_size: int
) -> list[range]:
    """Send every line through a Producer (batches, several requests in flight); the
    offsets, merged into ranges. Stops reading at the first failed batch and raises its
    error, saying how many lines were appended before it (and after it, if any)."""
    from ..client import Producer

    ranges: list[range] = []
    waiting: collections.deque[Any] = collections.deque()  # SentMessages in input order
    error: SMQError | None = None
    appended_after = 0

    def settle(block: bool) -> None:
        nonlocal error, appended_after
        while waiting and (block or waiting[0].done()):
            sent = waiting.popleft()
            failure = sent.exception()
            if failure is not None:
                if error is None:
                    error = failure if isinstance(failure, SMQError) else SMQError(str(failure))
            elif error is not None:
                appended_after += 1
            elif ranges and ranges[-1].stop == sent.result():
                ranges[-1] = range(ranges[-1].start, sent.result() + 1)
            else:
                ranges.append(range(sent.result(), sent.result() + 1))

    try:
        with Producer(client, batch_size=batch_size) as producer:
            for lines in chunks:
                waiting.extend(producer.send(topic, line) for line in lines)
                settle(block=False)
                if error is not None:
                    break
    except KeyboardInterrupt:  # say how far the input went in, so that it can be resumed
        settle(block=True)
        appended = sum(len(r) for r in ranges)
        where = f", up to offset {ranges[-1][-1]}" if ranges else ""
        print(
            f"smq: interrupted: {plural(appended, 'message')} of the input were appended{where}",
            file=sys.stderr,
        )
        raise
    settle(block=True)
    if error is None:
        return ranges
    appended = sum(len(r) for r in ranges)
    if appended or appended_after:  # other lines were committed: say so, with the error
        where = f", up to offset {ranges[-1][-1]}" if ranges else ""
        after = (
            f"; {plural(appended_after, 'message')} sent after it were appended too"
            if appended_after
            else ""
        )
        error.add_note(
            f"({plural(appended, 'message')} of the input were appended before this "
            f"failure{where}{after})"
        )
    raise error


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
    out.emit(
        {
            "topic": topic,
            "count": count,
            "first_offset": spans[0][0] if spans else None,
            "last_offset": spans[-1][1] if spans else None,
        },
        f"appended {plural(count, 'message')} to {topic!r}{where}",
    )


def cmd_consume(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.topic)  # fails fast: no such topic
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
                out.emit(
                    {"topic": args.topic, "offset": offset, **payload_fields(payload)},
                    lambda: f"{offset}\t{escape(payload)}",  # noqa: B023 (called at once)
                    flush=args.follow or args.consumer is not None,
                )
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
    pressed: list[int] = []

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


def cmd_offsets(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.topic)
    record = {
        "topic": info.name,
        "earliest": info.earliest_offset,
        "latest": info.latest_offset,
        "next": info.next_offset,
    }
    text = fields_text([("earliest", info.earliest_offset), ("latest", info.latest_offset)])
    if info.earliest_offset is None:
        text += f"\n(empty: the next message gets offset {info.next_offset})"
    out.emit(record, text)
    return EXIT_OK


def cmd_trim(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_until_offset(args.topic, args.offset)
    info = client.describe_topic(args.topic)
    now = (
        f"the earliest is now {info.earliest_offset}"
        if info.earliest_offset is not None
        else "the topic is now empty"
    )
    out.emit(
        {
            "topic": args.topic,
            "until": args.offset,
            "earliest": info.earliest_offset,
            "latest": info.latest_offset,
        },
        f"deleted messages up to offset {args.offset}; {now}",
    )
    return EXIT_OK
