"""`smq ping` and `smq info`: whether the server answers, and what it says of itself."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_OK
from .common import Output, add_command, fields_text, size_text, uptime_text

if TYPE_CHECKING:  # grpc is only loaded by commands that need it
    from ..client import Client

EXAMPLES = {
    'ping': (
        'examples:\n'
        '  smq ping\n'
        '  smq ping --host 192.168.1.20 --port 9000\n'
        '  smq ping --unix-socket /run/smq/smq.sock'
    ),
    'info': ('examples:\n  smq info\n  smq info --json | jq .stored_bytes'),
}


def add_commands(commands: Any, parent: argparse.ArgumentParser) -> None:
    add_command(
        commands,
        parent,
        "ping",
        "check that the server answers, and how fast",
        cmd_ping,
        EXAMPLES["ping"],
        "ping the server",
    )
    add_command(
        commands,
        parent,
        "info",
        "show the server's version, settings and counters",
        cmd_info,
        EXAMPLES["info"],
        "get the server's info",
    )


def cmd_ping(client: Client, args: argparse.Namespace, out: Output) -> int:
    seconds = client.ping()
    out.emit(
        {"target": client.target, "ok": True, "seconds": round(seconds, 6)},
        f"{client.target} answered in {seconds * 1000:.1f} ms",
    )
    return EXIT_OK


def cmd_info(client: Client, args: argparse.Namespace, out: Output) -> int:
    info = client.server_info()
    out.emit(
        {"target": client.target, **dataclasses.asdict(info)},
        lambda: fields_text(
            [
                ("server", client.target),
                ("version", info.version),
                ("durability", info.durability),
                ("max message size", size_text(info.max_message_size)),
                ("uptime", uptime_text(info.uptime)),
                ("topics", info.topics),
                ("stored messages", info.stored_messages),
                ("stored bytes", info.stored_bytes),
                ("commits", info.commits),
                ("committed writes", info.committed_writes),
                ("committed messages", info.committed_messages),
            ]
        ),
    )
    return EXIT_OK
