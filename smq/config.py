"""Settings: one table, one immutable Config, one place that reads them.

Precedence, highest first: command-line flags, environment variables, the
`.env` file, defaults. Only flags the user actually typed override anything
(argparse defaults are None). The names of the original SMQ are kept
(`--dbpath`/`DB_PATH`, `--port`/`PORT`, ...); what SMQ adds is prefixed `SMQ_`.

Every value is parsed and checked here, so that the server never starts on a
bad one: `load()` raises ConfigError naming the setting and the value.
"""
from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dotenv

from .errors import ConfigError

TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})
LOG_LEVELS = ("debug", "info", "warning", "error")
DURABILITY_MODES = ("full", "normal")
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024,
              "m": 1024**2, "mb": 1024**2, "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0,
                  "d": 86400.0}


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


def parse_db_path(text: str) -> str:
    # SQLite would take "" as a temporary database and ":memory:" as an in-memory one:
    # a queue that loses every message at exit.
    if not text.strip() or text.strip() == ":memory:":
        raise ValueError("expected the path of the database file")
    return text


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


def group_id(text: str) -> int:
    """A group name or number -> its number; ValueError for a name the system does not know."""
    text = text.strip()
    if text.isdigit():
        gid = int(text)
        if gid >= 2**32 - 1:  # (gid_t)-1 means "leave the group alone" to chown()
            raise ValueError("expected a group number below 4294967295")
        return gid
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError("no such group on this system (give a group name or number)") from None


def parse_group(text: str) -> str:
    group_id(text)
    return text.strip()


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
            raise ValueError(f"expected a value from {low:g} to {high:g}")
        return value
    return parse_bounded


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its Config field, flag, environment variable and parser."""
    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    help: str
    group: str = "server"

    @property
    def is_bool(self) -> bool:
        return self.parse is parse_bool

    @property
    def default(self) -> Any:
        """The default of a server or client setting (smq forward's have their own)."""
        return Config.__dataclass_fields__[self.field].default


SETTINGS: tuple[Setting, ...] = (
    Setting("dbpath", "--dbpath", "DB_PATH", parse_db_path, "SQLite database file"),
    Setting("port", "--port", "PORT", parse_port, "TCP port to listen on"),
    Setting("bind", "--bind", "SMQ_BIND", parse_host,
            "address to listen on (127.0.0.1 for this device only)"),
    Setting("unix_socket", "--unix-socket", "SMQ_UNIX_SOCKET", str,
            "also listen on this Unix socket path; its callers may always write"),
    Setting("unix_socket_group", "--unix-socket-group", "SMQ_UNIX_SOCKET_GROUP", parse_group,
            "group (name or number) that may use the Unix socket too (mode 0660); "
            "without it only the server's user may (0600)"),
    Setting("server_enable_mtls", "--server-enable-mtls", "SERVER_ENABLE_MTLS", parse_bool,
            "require and verify client certificates (mutual TLS)"),
    Setting("server_cert", "--server-cert", "SERVER_CERT_FILE", str, "server certificate (PEM)"),
    Setting("server_key", "--server-key", "SERVER_KEY_FILE", str, "server private key (PEM)"),
    Setting("server_ca_cert", "--server-ca-cert", "SERVER_CA_CERT_FILE", str,
            "CA that signs accepted client certificates (PEM)"),
    Setting("allow_remote_writes", "--allow-remote-writes", "ALLOW_REMOTE_WRITES", parse_bool,
            "let TCP callers create topics, produce and delete"),
    Setting("durability", "--durability", "SMQ_DURABILITY", parse_choice(DURABILITY_MODES),
            "full: fsync before every ack (survives power loss); "
            "normal: survives a crash of SMQ, may lose the last acks on power loss"),
    Setting("max_message_size", "--max-message-size", "SMQ_MAX_MESSAGE_SIZE",
            in_range(parse_size, 1, 64 * 1024**2), "largest accepted message (e.g. 1048576, 512KiB, 4MiB)"),
    Setting("max_streams", "--max-streams", "SMQ_MAX_STREAMS", in_range(int, 1, 10_000),
            "concurrent streams (StreamConsume, StreamProduce, reflection); more get RESOURCE_EXHAUSTED"),
    Setting("workers", "--workers", "SMQ_WORKERS", in_range(int, 1, 1_000),
            "threads for unary calls (streams get their own, up to --max-streams)"),
    Setting("memory_budget", "--memory-budget", "SMQ_MEMORY_BUDGET",
            in_range(parse_size, 16 * 1024**2, 64 * 1024**3),
            "memory for replies not yet taken by clients, requests and queued writes, all "
            "calls together (e.g. 128MiB); beyond it calls get RESOURCE_EXHAUSTED"),
    Setting("stall_timeout", "--stall-timeout", "SMQ_STALL_TIMEOUT",
            in_range(parse_duration, 1, 3600),
            "a reply held in memory that the client has not taken for this long ends its call"),
    Setting("heartbeat_interval", "--heartbeat-interval", "SMQ_HEARTBEAT_INTERVAL",
            in_range(parse_duration, 0.01, 3600), "idle streams get a heartbeat this often"),
    Setting("health_check_interval", "--health-check-interval", "SMQ_HEALTH_CHECK_INTERVAL",
            in_range(parse_duration, 0.1, 3600),
            "how often the liveness check runs (a write transaction and a read of the file, "
            "within half of it); gRPC health and the systemd watchdog follow it"),
    Setting("shutdown_grace", "--shutdown-grace", "SMQ_SHUTDOWN_GRACE",
            in_range(parse_duration, 0, 600), "time in-flight calls get to finish on shutdown"),
    Setting("startup_check", "--startup-check", "SMQ_STARTUP_CHECK", parse_choice(("quick", "off")),
            "quick: check the database file for damage on start (reads it all once); off"),
    Setting("on_corrupt", "--on-corrupt", "SMQ_ON_CORRUPT", parse_choice(("refuse", "move-aside")),
            "a damaged database: refuse to start, or move it to <name>.corrupt-<time> and "
            "start empty"),
    Setting("max_db_size", "--max-db-size", "SMQ_MAX_DB_SIZE", parse_size,
            "disk budget of the database file (e.g. 512MiB); 0: no limit"),
    Setting("min_free_space", "--min-free-space", "SMQ_MIN_FREE_SPACE", parse_size,
            "free space to leave on the filesystem; writes beyond it are refused"),
    Setting("on_full", "--on-full", "SMQ_ON_FULL", parse_choice(("reject", "drop-oldest")),
            "at the disk budget: reject writes (RESOURCE_EXHAUSTED) or drop the topic's oldest "
            "messages; per-topic override"),
    Setting("retention_max_messages", "--retention-max-messages", "SMQ_RETENTION_MAX_MESSAGES",
            in_range(int, 0, 2**62), "keep at most this many messages per topic; 0: no limit; "
            "per-topic override"),
    Setting("retention_max_bytes", "--retention-max-bytes", "SMQ_RETENTION_MAX_BYTES", parse_size,
            "keep at most this many payload bytes per topic; 0: no limit; per-topic override"),
    Setting("retention_max_age", "--retention-max-age", "SMQ_RETENTION_MAX_AGE",
            in_range(parse_duration, 0, 100 * 365 * 86400),
            "drop messages older than this (e.g. 7d); 0: forever; per-topic override"),
    Setting("max_consumers_per_topic", "--max-consumers-per-topic", "SMQ_MAX_CONSUMERS_PER_TOPIC",
            in_range(int, 1, 1_000_000),
            "named consumers a topic may have; a commit that would add one more gets "
            "RESOURCE_EXHAUSTED (delete unused ones with: smq consumer delete)"),
    Setting("log_level", "--log-level", "SMQ_LOG_LEVEL", parse_choice(LOG_LEVELS),
            "debug, info, warning or error"),
    Setting("env_file", "--env-file", "SMQ_ENV_FILE", str,
            "file of KEY=value settings read below the environment (missing default is fine)"),
    # Client side (the `smq` subcommands that talk to a server).
    Setting("host", "--host", "SMQ_HOST", parse_host, "server to talk to", "client"),
    Setting("enable_mtls", "--enable-mtls", "ENABLE_MTLS", parse_bool,
            "present a client certificate (mutual TLS)", "client"),
    Setting("client_cert", "--client-cert", "CLIENT_CERT", str, "client certificate (PEM)", "client"),
    Setting("client_key", "--client-key", "CLIENT_KEY", str, "client private key (PEM)", "client"),
    Setting("ca_cert", "--ca-cert", "CA_CERT", str, "CA that signed the server certificate", "client"),
)
SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a server or client command, parsed and validated."""
    dbpath: str = "./dbtest.db"
    port: int = 8097
    bind: str = "0.0.0.0"
    unix_socket: str = ""
    unix_socket_group: str = ""
    server_enable_mtls: bool = False
    server_cert: str = ""
    server_key: str = ""
    server_ca_cert: str = ""
    allow_remote_writes: bool = True
    durability: str = "full"
    max_message_size: int = 1024**2
    max_streams: int = 64
    workers: int = 8
    memory_budget: int = 128 * 1024**2
    stall_timeout: float = 30.0
    heartbeat_interval: float = 10.0
    health_check_interval: float = 10.0
    shutdown_grace: float = 5.0
    startup_check: str = "quick"
    on_corrupt: str = "refuse"
    max_db_size: int = 0
    min_free_space: int = 32 * 1024**2
    on_full: str = "reject"
    retention_max_messages: int = 0
    retention_max_bytes: int = 0
    retention_max_age: float = 0.0
    max_consumers_per_topic: int = 1000
    log_level: str = "info"
    env_file: str = ".env"
    host: str = "localhost"
    enable_mtls: bool = False
    client_cert: str = ""
    client_key: str = ""
    ca_cert: str = ""

    def validate(self) -> "Config":
        """Checks that span settings; raises ConfigError."""
        if self.unix_socket_group and not self.unix_socket:
            raise ConfigError(_label("unix_socket_group"), self.unix_socket_group,
                              f"given without {_label('unix_socket')}")
        if self.server_enable_mtls:
            for name in SERVER_TLS_FILES:
                if not getattr(self, name):
                    raise ConfigError(_label(name), "", "required when server mTLS is enabled")
        return self

    def ignored_tls_settings(self) -> list[str]:
        """The server's certificate settings that were given but go unused, because
        mTLS is off (the original SMQ accepted them so, serving plaintext)."""
        if self.server_enable_mtls:
            return []
        return [_label(name) for name in SERVER_TLS_FILES if getattr(self, name)]


SERVER_TLS_FILES = ("server_cert", "server_key", "server_ca_cert")


def _label(field: str) -> str:
    setting = SETTINGS_BY_FIELD[field]
    return f"{setting.flag} ({setting.env})"


def load(flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from flags given (strings or None), an environment and its .env file.

    `flags` maps field names to the raw text the user typed; None means not given.
    """
    return Config(**read_settings(SETTINGS, flags, environ)).validate()


def read_settings(settings: Iterable[Setting], flags: Mapping[str, Any] | None,
                  environ: Mapping[str, str] | None,
                  number_reason: str = "expected a whole number") -> dict[str, Any]:
    """The parsed value of each setting given by a flag, the environment or the .env
    file (in that order), by field name; settings given nowhere are left out.
    Raises ConfigError, saying `number_reason` for text that is not a number."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = dict(os.environ if environ is None else environ)
    env_file = flags.get("env_file") or environ.get("SMQ_ENV_FILE")
    file_values = _read_env_file(env_file or ".env", required=bool(env_file))
    values: dict[str, Any] = {}
    for setting in settings:
        raw, source = _pick(setting, flags, environ, file_values)
        if raw is None:
            continue
        try:
            values[setting.field] = setting.parse(str(raw))
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith(("invalid literal", "could not convert")):
                reason = number_reason
            raise ConfigError(f"{setting.flag} ({setting.env}, from {source})", str(raw), reason) from None
    return values


def _pick(setting: Setting, flags: Mapping[str, Any], environ: Mapping[str, str],
          file_values: Mapping[str, str | None]) -> tuple[Any, str]:
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
    try:
        with open(path, encoding="utf-8") as stream:
            return dict(dotenv.dotenv_values(stream=stream))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--env-file (SMQ_ENV_FILE)", path, f"cannot be read: {exc}") from None


def __getattr__(name: str) -> Any:
    """pysmq kept its client settings in `pysmq.config`; so does SMQ, lazily (they live in
    smq.client, which loads grpc): `from smq.config import ClientTLSConfig` works."""
    if name in ("ClientTLSConfig", "ClientConfig", "SMQ_SPECIAL_OFFSET_HEARTBEAT"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
