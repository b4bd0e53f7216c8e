"""What every `smq` command shares: connection and output flags, argument types,
the output writer and its formatting helpers. No grpc here: `smq --help` stays fast.

Each command group has a module here (topic, messages, consumer, info) with its
parser (`add_commands`) and its runs (`run(client, args, out) -> exit code`); main.py
parses, connects and maps errors to exit codes; serve.py runs the server.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import connection
from ..domain import ON_FULL_CHOICES
from ..settings import add_flags, parse_duration

DEFAULT = "default"  # an option's value that removes its override
DEFAULT_TIMEOUT = 10.0


class UsageError(Exception):
    """Bad usage found after parsing; exit code 2."""


class Output:
    """Writes results for people (text) or programs (--json: one object per line)."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stdout

    def emit(
        self, record: dict[str, Any], text: str | Callable[[], str], flush: bool = False
    ) -> None:
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
    return "\n".join(
        f"{key.ljust(width)}  {'-' if value is None else value}" for key, value in pairs
    )


def timestamp(unix_seconds: int) -> str:
    return datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows of cells in aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


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
    whole = int(seconds)
    parts: list[str] = []
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= factor or parts:
            parts.append(f"{whole // factor}{unit}")
            whole %= factor
    return " ".join(parts)


# -- argument types -------------------------------------------------------------------------


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


# -- the parser pieces ---------------------------------------------------------------------


def common_flags() -> argparse.ArgumentParser:
    """Connection and output flags, shared by every command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    add_flags(group, connection.SETTINGS)
    group.add_argument(
        "--timeout",
        type=seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a call after this long [default {DEFAULT_TIMEOUT:g}]",
    )
    group.add_argument(
        "--server-hostname",
        metavar="NAME",
        default=None,
        help="mTLS: the name to verify in the server's certificate, when --host is not "
        "one of its names (e.g. an IP address)",
    )
    parent.add_argument(
        "--json", action="store_true", help="print one JSON object per line, for programs"
    )
    parent.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="on an error, also print gRPC's own text (the details)",
    )
    return parent


def add_command(
    subparsers: Any,
    parent: argparse.ArgumentParser,
    name: str,
    help_text: str,
    run: Callable[..., int],
    epilog: str,
    doing: str,
) -> argparse.ArgumentParser:
    """A (sub)command with the common flags; `run` is what it does. `doing` completes
    "could not ..." in its error messages, formatted with its arguments ("read
    messages of {topic!r}"): a command names its own action, whichever call failed."""
    sub = subparsers.add_parser(
        name,
        parents=[parent],
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(run=run, doing=doing)
    return sub
