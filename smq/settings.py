"""The settings machinery every SMQ program uses: a table of Settings, read once.

Precedence, highest first: command-line flags, environment variables, the `.env` file,
the table's defaults. Only flags the user actually typed override anything (argparse
defaults stay None). Each program keeps its own table (smq.server.config,
smq.connection, smq.forward.config) and builds its immutable config from
`read_settings`; every value is parsed and checked there, so a program never starts on
a bad one: ConfigError names the setting, where it came from, and the value.

Called at start-up, from the main thread only. Core code never reads os.environ.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigError

TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})
LOG_LEVELS = ("debug", "info", "warning", "error")
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
ENV_FILE_DEFAULT = ".env"
MAX_SECRET_BYTES = 64 * 1024


# -- parsers: text -> value, or ValueError saying what was expected ------------------------


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("expected true or false")


def parse_size(text: str) -> int:
    """'4MiB', '512k', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError("expected a size such as 1048576, 512KiB or 4MiB")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def parse_duration(text: str) -> float:
    """'10', '10s', '250ms', '1m', '12h', '7d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in DURATION_UNITS:
        raise ValueError("expected a duration such as 10s, 250ms, 1m, 12h or 7d")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number from 0 to 65535 (0 picks a free port)")
    return port


def parse_optional_port(text: str) -> int | None:
    """A port, or None (off) for "" or "off"."""
    if text.strip().lower() in ("", "off"):
        return None
    return parse_port(text)


def parse_optional_host(text: str) -> str:
    """A host, or "" (the program's default address)."""
    return parse_host(text) if text.strip() else ""


def parse_host(text: str) -> str:
    host = text.strip()
    if not host:
        raise ValueError("expected a host name or IP address")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise ValueError("expected a host name or IP address") from None
    return host


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return word

    return parse


def in_range(parse: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse_bounded(text: str) -> Any:
        value = parse(text)
        if not low <= value <= high:
            raise ValueError(f"expected a value from {_number(low)} to {_number(high)}")
        return value

    return parse_bounded


def _number(value: float) -> str:
    """67108864, not 6.71089e+07; 0.5 as it is."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def read_secret_file(path: str) -> str:
    """A secret (a password, a token) kept in a file, as systemd's LoadCredential= passes
    it: the file's text without its trailing newline. ValueError saying why it cannot be
    used; the message never holds any of the file's text."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError("is larger than 64 KiB: expected the secret alone, on one line")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    if not text:
        raise ValueError("is empty")
    if "\n" in text or "\r" in text:
        raise ValueError("holds more than one line: expected the secret alone")
    return text


# -- the table -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its config field, flag, environment variable, parser, default (as a
    user writes it: "1MiB", "10s"; "" for none, which is `empty`), help, and the --help
    section it is shown in."""

    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    default: str
    help: str
    group: str = ""
    empty: Any = ""

    @property
    def label(self) -> str:
        """How messages name it: '--port (PORT)'."""
        return f"{self.flag} ({self.env})"

    @property
    def is_bool(self) -> bool:
        return self.parse is parse_bool

    def default_value(self) -> Any:
        return self.parse(self.default) if self.default != "" else self.empty


def defaults(table: Iterable[Setting]) -> dict[str, Any]:
    """The parsed default of each setting, by field: for the config dataclasses."""
    return {setting.field: setting.default_value() for setting in table}


def by_field(table: Iterable[Setting]) -> dict[str, Setting]:
    return {setting.field: setting for setting in table}


def add_flags(parser: argparse.ArgumentParser | Any, table: Iterable[Setting]) -> None:
    """One flag per setting, its help ending in its variable and default. Defaults stay
    None, so that only the flags a user types override the environment."""
    for setting in table:
        shown = setting.default if setting.default != "" else "none"
        extra: dict[str, Any] = (
            {"nargs": "?", "const": "true", "metavar": "BOOL"}
            if setting.is_bool
            else {"metavar": "VALUE"}
        )
        parser.add_argument(
            setting.flag,
            dest=setting.field,
            default=None,
            help=f"{setting.help} [env {setting.env}; default {shown}]",
            **extra,
        )


def read_settings(
    table: Iterable[Setting],
    flags: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
    number_reason: str = "expected a whole number",
) -> dict[str, Any]:
    """The parsed value of each setting given by a flag, the environment or the .env
    file (in that order), by field name; settings given nowhere are left out.
    Raises ConfigError, saying `number_reason` for text that is not a number."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = dict(os.environ if environ is None else environ)
    env_file = flags.get("env_file") or environ.get("SMQ_ENV_FILE")
    file_values = _read_env_file(env_file or ENV_FILE_DEFAULT, required=bool(env_file))
    values: dict[str, Any] = {}
    for setting in table:
        raw, source = _pick(setting, flags, environ, file_values)
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(str(raw))
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith(("invalid literal", "could not convert")):
                reason = number_reason
            raise ConfigError(
                f"{setting.flag} ({setting.env}, from {source})", str(raw), reason
            ) from None
    return values


def _pick(
    setting: Setting,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, str | None],
) -> tuple[Any, str]:
    if setting.field in flags:
        return flags[setting.field], "command line"
    if setting.env in environ:
        return environ[setting.env], "environment"
    if file_values.get(setting.env) is not None:
        return file_values[setting.env], ".env file"
    return None, "default"


def _read_env_file(path: str, required: bool) -> dict[str, str | None]:
    if not os.path.exists(path):
        if required:
            raise ConfigError("--env-file (SMQ_ENV_FILE)", path, "no such file")
        return {}
    import dotenv  # here: the client library (smq.client) goes without python-dotenv

    try:
        with open(path, encoding="utf-8") as stream:
            return dict(dotenv.dotenv_values(stream=stream))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--env-file (SMQ_ENV_FILE)", path, f"cannot be read: {exc}") from None


ENV_FILE = Setting(
    "env_file",
    "--env-file",
    "SMQ_ENV_FILE",
    str,
    ENV_FILE_DEFAULT,
    "file of KEY=value settings read below the environment (missing default is fine)",
)
LOG_LEVEL = Setting(
    "log_level",
    "--log-level",
    "SMQ_LOG_LEVEL",
    parse_choice(LOG_LEVELS),
    "info",
    "debug, info, warning or error",
)
