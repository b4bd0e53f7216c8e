"""The arguments, help and examples of the `smq` subcommands that talk to a server.

`command_parser()` builds the parser; each subcommand sets `run`, its function in
`smq.commands`. Defaults of settings stay None, so that only flags the user typed
override the environment and the .env file (see `smq.config`).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .commands import (cmd_consume, cmd_offsets, cmd_ping, cmd_produce, cmd_topic_create,
                       cmd_topic_delete, cmd_topic_describe, cmd_topic_list, cmd_trim)
from .config import SETTINGS, SETTINGS_BY_FIELD

COMMANDS = ("topic", "produce", "consume", "offsets", "trim", "ping")
# The settings a client command reads (flags, environment, .env) to connect.
CLIENT_FIELDS = ("host", "port", "unix_socket", "enable_mtls", "client_cert", "client_key",
                 "ca_cert", "env_file")
USAGE = "%(prog)s [serve] [FLAG ...]\n       %(prog)s COMMAND ... [--host HOST] [--port PORT] [--json]"

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
    parser = argparse.ArgumentParser(prog="smq", usage=USAGE, description=COMMANDS_TEXT,
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
