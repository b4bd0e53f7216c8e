"""`smq topic create|list|describe|delete|policy`: topics and their policy."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..domain import NAME_RULE_TEXT, TopicPolicy
from ..errors import EXIT_OK, InvalidArgument, NotFound, Unimplemented
from ..settings import parse_bool, parse_size
from .common import (
    DEFAULT,
    Output,
    add_command,
    count,
    duration_text,
    fields_text,
    on_full,
    or_default,
    size_text,
    table,
    timestamp,
    whole_seconds,
)

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from ..client import Client, TopicInfo

EXAMPLES = {
    'topic': (
        'examples:\n'
        '  smq topic create sensors\n'
        '  smq topic list\n'
        '  smq topic describe sensors\n'
        '  smq topic delete sensors\n'
        '  smq topic policy sensors --max-age 7d'
    ),
    'create': ('examples:\n  smq topic create sensors      (creating an existing topic is fine)'),
    'list': ('examples:\n  smq topic list\n  smq topic list --json | jq -r .topic'),
    'describe': ('examples:\n  smq topic describe sensors'),
    'delete': (
        'examples:\n'
        '  smq topic delete sensors      (a re-created topic continues its offsets)\n'
        '  smq topic delete sensors --unix-socket /run/smq/smq.sock\n'
        '                                (when the server refuses remote writes)'
    ),
    'policy': (
        'examples:\n'
        '  smq topic policy sensors                      the overrides, and what applies\n'
        '  smq topic policy sensors --max-age 7d --max-bytes 512MiB\n'
        '  smq topic policy sensors --on-full drop-oldest (keeps --max-age, --max-bytes)\n'
        "  smq topic policy sensors --max-age default    the server's --retention-max-age\n"
        "  smq topic policy sensors --reset              the server's defaults for all\n"
        '  smq topic policy sensors --json\n'
        '\n'
        'Limits: 0 is no limit. Options not given keep their current override; the server\n'
        'applies the policy from its next commit on. A remote write, like topic delete.'
    ),
}


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    topic = commands.add_parser(
        "topic",
        help="create, list, describe or delete topics; their policy",
        description="create, list, describe or delete topics, and show "
        "or set their retention and disk-full policy",
        epilog=EXAMPLES["topic"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = topic.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add(
        name: str, help_text: str, run: Callable[..., int], doing: str
    ) -> argparse.ArgumentParser:
        return add_command(actions, parent, name, help_text, run, EXAMPLES[name], doing)

    add(
        "create", "create a topic (idempotent)", cmd_topic_create, "create topic {name!r}"
    ).add_argument("name", metavar="NAME", help=NAME_RULE_TEXT)
    add("list", "list the topics with their offsets and sizes", cmd_topic_list, "list topics")
    add(
        "describe",
        "show a topic's offsets, size and creation time",
        cmd_topic_describe,
        "describe topic {name!r}",
    ).add_argument("name", metavar="NAME")
    add(
        "delete",
        "delete a topic and all its messages (a remote write)",
        cmd_topic_delete,
        "delete topic {name!r}",
    ).add_argument("name", metavar="NAME")
    policy = add(
        "policy",
        "show or set a topic's retention and disk-full policy",
        cmd_topic_policy,
        "show or set the policy of topic {name!r}",
    )
    policy.add_argument("name", metavar="NAME")
    overrides = policy.add_argument_group(
        "overrides",
        "set one or more; the others keep their override. Each also takes\n"
        f"'{DEFAULT}': remove the override (back to the server's default).",
    )
    overrides.add_argument(
        "--max-messages",
        type=or_default(count),
        metavar="N",
        help="keep at most N messages (the oldest go first); 0: no limit",
    )
    overrides.add_argument(
        "--max-bytes",
        type=or_default(parse_size),
        metavar="SIZE",
        help="keep at most this many payload bytes (e.g. 512KiB, 1GiB); 0: no limit",
    )
    overrides.add_argument(
        "--max-age",
        type=or_default(whole_seconds),
        metavar="DURATION",
        help="keep messages this long (e.g. 90s, 12h, 7d); 0: forever",
    )
    overrides.add_argument(
        "--on-full",
        type=or_default(on_full),
        metavar="reject|drop-oldest",
        help="at the server's disk budget: refuse new messages, or drop this topic's oldest",
    )
    overrides.add_argument(
        "--keep-uncommitted",
        type=or_default(parse_bool),
        metavar="true|false",
        help="retention keeps what a named consumer has not committed",
    )
    policy.add_argument(
        "--reset",
        action="store_true",
        help="remove every override first (alone: back to the server's defaults)",
    )


def topic_record(info: TopicInfo) -> dict[str, Any]:
    return {
        "topic": info.name,
        "earliest": info.earliest_offset,
        "latest": info.latest_offset,
        "next": info.next_offset,
        "messages": info.message_count,
        "bytes": info.stored_bytes,
        "created_at": info.created_at,
    }


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
    rows += [
        (
            t.name,
            str(t.message_count),
            str(t.earliest_offset or "-"),
            str(t.latest_offset or "-"),
            str(t.stored_bytes),
        )
        for t in topics
    ]
    print(table(rows))
    return EXIT_OK


def cmd_topic_describe(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.describe_topic(args.name)
    out.emit(
        topic_record(info),
        lambda: fields_text(
            [
                ("topic", info.name),
                ("messages", info.message_count),
                ("earliest", info.earliest_offset),
                ("latest", info.latest_offset),
                ("next", info.next_offset),
                ("bytes", info.stored_bytes),
                ("created", timestamp(info.created_at)),
            ]
        ),
    )
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


def cmd_topic_policy(client: Client, args: argparse.Namespace, out: Output) -> int:
    changes = {
        field: getattr(args, field) for field in POLICY_OPTIONS if getattr(args, field) is not None
    }
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
    report_policy(
        out, args.name, overrides, effective, f"{done} the policy of topic {args.name!r}\n"
    )
    return EXIT_OK


def report_policy(
    out: Output, topic: str, overrides: TopicPolicy, effective: TopicPolicy, heading: str
) -> None:
    def text() -> str:
        rows = [("SETTING", "OVERRIDE", "EFFECTIVE")]
        for field, (option, show) in POLICY_OPTIONS.items():
            override = getattr(overrides, field)
            rows.append(
                (
                    option,
                    "-" if override is None else show(override),
                    show(getattr(effective, field)),
                )
            )
        return f"{heading}{table(rows)}\n(-: the server's default)"

    out.emit(
        {
            "topic": topic,
            "overrides": dataclasses.asdict(overrides),
            "effective": dataclasses.asdict(effective),
        },
        text,
    )
