"""`smq consumer list|get|commit|delete`: durable named consumers."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..domain import NAME_RULE_TEXT
from ..errors import EXIT_OK
from .common import Output, add_command, fields_text, offset_int, table, timestamp

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from ..client import Client, ConsumerInfo

EXAMPLES = {
    'consumer': (
        'examples:\n'
        "  smq consume sensors --consumer uploader        print what 'uploader' has not seen, commit it\n"  # noqa: E501 (help text)
        '  smq consumer list\n'
        '  smq consumer get uploader sensors\n'
        '  smq consumer commit uploader sensors 41        the next read starts at 42\n'
        '  smq consumer delete uploader'
    ),
    'consumer list': (
        'examples:\n'
        '  smq consumer list\n'
        '  smq consumer list --topic sensors\n'
        '  smq consumer list uploader --json'
    ),
    'consumer get': (
        'examples:\n'
        '  smq consumer get uploader sensors\n'
        '  smq consumer get uploader sensors --json | jq .committed_offset'
    ),
    'consumer commit': (
        'examples:\n'
        '  smq consumer commit uploader sensors 41        processed up to 41: resume at 42\n'
        '  smq consumer commit uploader sensors 0         start over from the earliest'
    ),
    'consumer delete': (
        'examples:\n'
        '  smq consumer delete uploader                   forget it on every topic\n'
        '  smq consumer delete uploader --topic sensors'
    ),
}


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    consumer = commands.add_parser(
        "consumer",
        help="list, inspect, commit or delete durable named consumers",
        description="durable named consumers: a committed offset per consumer and topic, "
        "kept by the server",
        epilog=EXAMPLES["consumer"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = consumer.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add(
        name: str, help_text: str, run: Callable[..., int], doing: str
    ) -> argparse.ArgumentParser:
        return add_command(
            actions, parent, name, help_text, run, EXAMPLES[f"consumer {name}"], doing
        )

    listing = add(
        "list",
        "list consumers with their committed offsets and lag",
        cmd_consumer_list,
        "list consumers",
    )
    listing.add_argument("name", metavar="NAME", nargs="?", help="only this consumer")
    listing.add_argument("--topic", metavar="TOPIC", help="only consumers of this topic")
    get = add(
        "get",
        "show a consumer's committed offset on a topic",
        cmd_consumer_get,
        "get the committed offset of consumer {name!r} on {topic!r}",
    )
    get.add_argument("name", metavar="NAME")
    get.add_argument("topic", metavar="TOPIC")
    commit = add(
        "commit",
        "commit an offset for a consumer (it resumes after it)",
        cmd_consumer_commit,
        "commit offset {offset} of {topic!r} for consumer {name!r}",
    )
    commit.add_argument("name", metavar="NAME", help=NAME_RULE_TEXT)
    commit.add_argument("topic", metavar="TOPIC")
    commit.add_argument(
        "offset",
        metavar="OFFSET",
        type=offset_int,
        help="the last offset processed; 0: start from the earliest",
    )
    delete = add(
        "delete",
        "forget a consumer's committed offsets",
        cmd_consumer_delete,
        "delete consumer {name!r}",
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--topic", metavar="TOPIC", help="only on this topic [default: all]")


def consumer_record(info: ConsumerInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def cmd_consumer_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    consumers = client.list_consumers(args.topic, consumer=args.name)
    if out.as_json:
        for info in consumers:
            out.emit(consumer_record(info), "")
        return EXIT_OK
    if not consumers:
        where = "".join(
            f" {what} {value!r}"
            for what, value in (("named", args.name), ("on topic", args.topic))
            if value
        )
        print(
            f"no consumers{where} (a consumer appears once it commits: "
            "smq consumer commit NAME TOPIC OFFSET, or smq consume TOPIC --consumer NAME)"
        )
        return EXIT_OK
    rows = [("CONSUMER", "TOPIC", "COMMITTED", "LAG", "UPDATED")]
    rows += [
        (c.consumer, c.topic, str(c.committed_offset), str(c.lag), timestamp(c.updated_at))
        for c in consumers
    ]
    print(table(rows))
    return EXIT_OK


def cmd_consumer_commit(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.commit_offset(args.name, args.topic, args.offset)
    out.emit(
        {"consumer": args.name, "topic": args.topic, "committed_offset": args.offset},
        f"consumer {args.name!r} committed offset {args.offset} of {args.topic!r}; "
        f"it resumes at {args.offset + 1}",
    )
    return EXIT_OK


def cmd_consumer_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    offset = client.committed_offset(args.name, args.topic)
    out.emit(
        {"consumer": args.name, "topic": args.topic, "committed_offset": offset},
        lambda: fields_text(
            [
                ("consumer", args.name),
                ("topic", args.topic),
                ("committed", offset),
                ("resumes at", offset + 1),
            ]
        ),
    )
    return EXIT_OK


def cmd_consumer_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    client.delete_consumer(args.name, args.topic)
    where = f"on topic {args.topic!r}" if args.topic else "on every topic"
    out.emit(
        {"consumer": args.name, "topic": args.topic, "deleted": True},
        f"deleted consumer {args.name!r} {where}",
    )
    return EXIT_OK
