"""The arguments, help and examples of the `smq` subcommands that talk to a server.

`command_parser()` builds the parser; each subcommand sets `run`, its function in
`smq.commands`. Defaults of settings stay None, so that only flags the user typed
override the environment and the .env file (see `smq.config`).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .client_types import ON_FULL_CHOICES
from .commands import (DEFAULT, cmd_consume, cmd_consumer_commit, cmd_consumer_delete,
                       cmd_consumer_get, cmd_consumer_list, cmd_info, cmd_offsets, cmd_ping,
                       cmd_produce, cmd_topic_create, cmd_topic_delete, cmd_topic_describe,
                       cmd_topic_list, cmd_topic_policy, cmd_trim)
from .config import SETTINGS, SETTINGS_BY_FIELD, parse_bool, parse_duration, parse_size

COMMANDS = ("topic", "produce", "consume", "offsets", "trim", "consumer", "info", "ping")
# The settings a client command reads (flags, environment, .env) to connect.
CLIENT_FIELDS = ("host", "port", "unix_socket", "enable_mtls", "client_cert", "client_key",
                 "ca_cert", "env_file")
USAGE = "%(prog)s [serve] [FLAG ...]\n       %(prog)s COMMAND ... [--host HOST] [--port PORT] [--json]"

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


def or_default(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A policy option's type: `parse`, or the word `default` (remove the override)."""
    def parse_option(text: str) -> Any:
        if text.strip().lower() == DEFAULT:
            return DEFAULT
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, or {DEFAULT}; not {text!r}") from None
    return parse_option


def count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError("expected a whole number of 0 or more (0: no limit)")
    return int(text)


def whole_seconds(text: str) -> int:
    value = parse_duration(text)
    if not value.is_integer():
        raise ValueError("expected whole seconds, such as 90s, 12h or 7d (0: forever)")
    return int(value)


def on_full(text: str) -> str:
    if text not in ON_FULL_CHOICES:
        raise ValueError(f"expected {' or '.join(ON_FULL_CHOICES)}")
    return text


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
  smq topic delete sensors
  smq topic policy sensors --max-age 7d""",
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
  smq consume sensors --consumer uploader     what 'uploader' has not seen yet; commits it
  smq consume sensors --consumer uploader -f  the same, then follow (a durable consumer)

output: OFFSET<TAB>PAYLOAD per message, non-printable bytes escaped (\\n, \\xNN);
with --json: {"topic", "offset", "payload"} ("payload_base64" if it is not UTF-8).""",
    "offsets": """\
examples:
  smq offsets sensors
  smq offsets sensors --json""",
    "trim": """\
examples:
  smq trim sensors 1000          delete offsets up to 1000; offsets are never reused""",
    "policy": """\
examples:
  smq topic policy sensors                      the overrides, and what applies
  smq topic policy sensors --max-age 7d --max-bytes 512MiB
  smq topic policy sensors --on-full drop-oldest (keeps --max-age, --max-bytes)
  smq topic policy sensors --max-age default    the server's --retention-max-age
  smq topic policy sensors --reset              the server's defaults for all
  smq topic policy sensors --json

Limits: 0 is no limit. Options not given keep their current override; the server
applies the policy from its next commit on. A remote write, like topic delete.""",
    "consumer": """\
examples:
  smq consume sensors --consumer uploader        print what 'uploader' has not seen, commit it
  smq consumer list
  smq consumer get uploader sensors
  smq consumer commit uploader sensors 41        the next read starts at 42
  smq consumer delete uploader""",
    "consumer list": """\
examples:
  smq consumer list
  smq consumer list --topic sensors
  smq consumer list uploader --json""",
    "consumer get": """\
examples:
  smq consumer get uploader sensors
  smq consumer get uploader sensors --json | jq .committed_offset""",
    "consumer commit": """\
examples:
  smq consumer commit uploader sensors 41        processed up to 41: resume at 42
  smq consumer commit uploader sensors 0         start over from the earliest""",
    "consumer delete": """\
examples:
  smq consumer delete uploader                   forget it on every topic
  smq consumer delete uploader --topic sensors""",
    "info": """\
examples:
  smq info
  smq info --json | jq .stored_bytes""",
}


def command_parser() -> argparse.ArgumentParser:
    parent = common_flags()
    parser = argparse.ArgumentParser(prog="smq", usage=USAGE, description=COMMANDS_TEXT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog="smq")

    def add(subparsers: Any, name: str, help_text: str, run: Callable[..., int],
            example: str | None = None) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, parents=[parent], help=help_text, description=help_text,
                                    epilog=EXAMPLES[example or name],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    add(commands, "ping", "check that the server answers, and how fast", cmd_ping)

    topic = commands.add_parser("topic", help="create, list, describe or delete topics; their policy",
                                description="create, list, describe or delete topics, and show "
                                            "or set their retention and disk-full policy",
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
    policy = add(actions, "policy", "show or set a topic's retention and disk-full policy",
                 cmd_topic_policy)
    policy.add_argument("name", metavar="NAME")
    overrides = policy.add_argument_group(
        "overrides", "set one or more; the others keep their override. Each also takes\n"
        f"'{DEFAULT}': remove the override (back to the server's default).")
    overrides.add_argument("--max-messages", type=or_default(count), metavar="N",
                           help="keep at most N messages (the oldest go first); 0: no limit")
    overrides.add_argument("--max-bytes", type=or_default(parse_size), metavar="SIZE",
                           help="keep at most this many payload bytes (e.g. 512KiB, 1GiB); "
                                "0: no limit")
    overrides.add_argument("--max-age", type=or_default(whole_seconds), metavar="DURATION",
                           help="keep messages this long (e.g. 90s, 12h, 7d); 0: forever")
    overrides.add_argument("--on-full", type=or_default(on_full), metavar="reject|drop-oldest",
                           help="at the server's disk budget: refuse new messages, or drop "
                                "this topic's oldest")
    overrides.add_argument("--keep-uncommitted", type=or_default(parse_bool), metavar="true|false",
                           help="retention keeps what a named consumer has not committed")
    policy.add_argument("--reset", action="store_true",
                        help="remove every override first (alone: back to the server's defaults)")

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
    consume.add_argument("--from", dest="start", type=start_offset, default=None,
                         metavar="earliest|latest|N", help="where to start [default earliest]")
    consume.add_argument("-f", "--follow", action="store_true",
                         help="keep printing new messages as they come (Ctrl-C ends); "
                              "reconnects by itself when the server restarts")
    consume.add_argument("-n", "--limit", type=offset_int, default=None, metavar="N",
                         help="stop after N messages")
    consume.add_argument("--consumer", metavar="NAME", default=None,
                         help="read as this durable consumer: start after its committed offset "
                              "(at --from if it has none) and commit what is printed")

    offsets = add(commands, "offsets", "show the earliest and latest offset of a topic", cmd_offsets)
    offsets.add_argument("topic", metavar="TOPIC")

    trim = add(commands, "trim", "delete the messages of a topic up to an offset", cmd_trim)
    trim.add_argument("topic", metavar="TOPIC")
    trim.add_argument("offset", metavar="OFFSET", type=offset_int,
                      help="delete every message with an offset up to this one")

    consumer = commands.add_parser(
        "consumer", help="list, inspect, commit or delete durable named consumers",
        description="durable named consumers: a committed offset per consumer and topic, "
                    "kept by the server", epilog=EXAMPLES["consumer"],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = consumer.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = add(actions, "list", "list consumers with their committed offsets and lag",
                  cmd_consumer_list, "consumer list")
    listing.add_argument("name", metavar="NAME", nargs="?", help="only this consumer")
    listing.add_argument("--topic", metavar="TOPIC", help="only consumers of this topic")
    get = add(actions, "get", "show a consumer's committed offset on a topic", cmd_consumer_get,
              "consumer get")
    get.add_argument("name", metavar="NAME")
    get.add_argument("topic", metavar="TOPIC")
    commit = add(actions, "commit", "commit an offset for a consumer (it resumes after it)",
                 cmd_consumer_commit, "consumer commit")
    commit.add_argument("name", metavar="NAME", help="1 to 249 characters of A-Z a-z 0-9 . _ -")
    commit.add_argument("topic", metavar="TOPIC")
    commit.add_argument("offset", metavar="OFFSET", type=offset_int,
                        help="the last offset processed; 0: start from the earliest")
    delete = add(actions, "delete", "forget a consumer's committed offsets", cmd_consumer_delete,
                 "consumer delete")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--topic", metavar="TOPIC", help="only on this topic [default: all]")

    add(commands, "info", "show the server's version, settings and counters", cmd_info)
    return parser
