"""The server's settings: one table (flag, variable, default, help) and one immutable
ServerConfig, built once by `load()` at start-up (smq.settings has the machinery).

The names of the original SMQ are kept (`--dbpath`/`DB_PATH`, `--port`/`PORT`, ...);
what SMQ adds is prefixed `SMQ_`. docs/configuration.md and systemd/smq.env are
generated from this table (scripts/gen_docs.py; a test fails when they are stale).
"""

from __future__ import annotations

import dataclasses
import grp
from collections.abc import Mapping
from typing import Any

from ..domain import DEFAULT_PORT, ON_FULL_CHOICES
from ..errors import ConfigError
from ..settings import (
    ENV_FILE,
    LOG_LEVEL,
    Setting,
    by_field,
    defaults,
    in_range,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_host,
    parse_optional_host,
    parse_optional_port,
    parse_port,
    parse_size,
    read_settings,
)

DURABILITY_MODES = ("full", "normal")
SERVER_TLS_FILES = ("server_cert", "server_key", "server_ca_cert")


def parse_db_path(text: str) -> str:
    # SQLite would take "" as a temporary database and ":memory:" as an in-memory one:
    # a queue that loses every message at exit.
    if not text.strip() or text.strip() == ":memory:":
        raise ValueError("expected the path of the database file")
    return text


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


MIN_DB_SIZE = 256 * 1024  # the schema, a first page of messages and the reserve for deletes


def parse_disk_budget(text: str) -> int:
    size = parse_size(text)
    if 0 < size < MIN_DB_SIZE:
        raise ValueError("expected 0 (no limit) or at least 256KiB")
    return size


def parse_group(text: str) -> str:
    group_id(text)
    return text.strip()


SETTINGS: tuple[Setting, ...] = (
    Setting("dbpath", "--dbpath", "DB_PATH", parse_db_path, "./dbtest.db", "SQLite database file"),
    Setting("port", "--port", "PORT", parse_port, str(DEFAULT_PORT), "TCP port to listen on"),
    Setting(
        "bind",
        "--bind",
        "SMQ_BIND",
        parse_host,
        "0.0.0.0",
        "address to listen on (127.0.0.1 for this device only)",
    ),
    Setting(
        "unix_socket",
        "--unix-socket",
        "SMQ_UNIX_SOCKET",
        str,
        "",
        "also listen on this Unix socket path; its callers may always write",
    ),
    Setting(
        "unix_socket_group",
        "--unix-socket-group",
        "SMQ_UNIX_SOCKET_GROUP",
        parse_group,
        "",
        "group (name or number) that may use the Unix socket too (mode 0660); "
        "without it only the server's user may (0600)",
    ),
    Setting(
        "server_enable_mtls",
        "--server-enable-mtls",
        "SERVER_ENABLE_MTLS",
        parse_bool,
        "false",
        "require and verify client certificates (mutual TLS)",
    ),
    Setting(
        "server_cert", "--server-cert", "SERVER_CERT_FILE", str, "", "server certificate (PEM)"
    ),
    Setting("server_key", "--server-key", "SERVER_KEY_FILE", str, "", "server private key (PEM)"),
    Setting(
        "server_ca_cert",
        "--server-ca-cert",
        "SERVER_CA_CERT_FILE",
        str,
        "",
        "CA that signs accepted client certificates (PEM)",
    ),
    Setting(
        "allow_remote_writes",
        "--allow-remote-writes",
        "ALLOW_REMOTE_WRITES",
        parse_bool,
        "true",
        "let TCP callers create topics, produce and delete",
    ),
    Setting(
        "acl_file",
        "--acl-file",
        "SMQ_ACL_FILE",
        str,
        "",
        "TOML file of the topics each client certificate (by subject CN) may produce to, "
        "consume from and administer; needs mTLS; SIGHUP reloads it",
    ),
    Setting(
        "quiet_open_network",
        "--quiet-open-network",
        "SMQ_QUIET_OPEN_NETWORK",
        parse_bool,
        "false",
        "no start-up warning that anyone who can reach the port may write (given when "
        "--bind is not loopback, without mTLS, with remote writes allowed)",
    ),
    Setting(
        "durability",
        "--durability",
        "SMQ_DURABILITY",
        parse_choice(DURABILITY_MODES),
        "full",
        "full: fsync before every ack (survives power loss); "
        "normal: survives a crash of SMQ, may lose the last acks on power loss",
    ),
    Setting(
        "max_message_size",
        "--max-message-size",
        "SMQ_MAX_MESSAGE_SIZE",
        in_range(parse_size, 1, 64 * 1024**2),
        "1MiB",
        "largest accepted message (e.g. 1048576, 512KiB, 4MiB)",
    ),
    Setting(
        "max_streams",
        "--max-streams",
        "SMQ_MAX_STREAMS",
        in_range(int, 1, 10_000),
        "64",
        "concurrent streams (StreamConsume, Subscribe, StreamProduce, reflection); more get "
        "RESOURCE_EXHAUSTED",
    ),
    Setting(
        "workers",
        "--workers",
        "SMQ_WORKERS",
        in_range(int, 1, 1_000),
        "8",
        "threads for unary calls (streams get their own, up to --max-streams)",
    ),
    Setting(
        "memory_budget",
        "--memory-budget",
        "SMQ_MEMORY_BUDGET",
        in_range(parse_size, 16 * 1024**2, 64 * 1024**3),
        "128MiB",
        "memory for replies not yet taken by clients, requests and queued writes, all "
        "calls together (e.g. 128MiB); beyond it calls get RESOURCE_EXHAUSTED",
    ),
    Setting(
        "stall_timeout",
        "--stall-timeout",
        "SMQ_STALL_TIMEOUT",
        in_range(parse_duration, 1, 3600),
        "30s",
        "a reply held in memory that the client has not taken for this long ends its call",
    ),
    Setting(
        "heartbeat_interval",
        "--heartbeat-interval",
        "SMQ_HEARTBEAT_INTERVAL",
        in_range(parse_duration, 0.01, 3600),
        "10s",
        "idle streams get a heartbeat this often",
    ),
    Setting(
        "health_check_interval",
        "--health-check-interval",
        "SMQ_HEALTH_CHECK_INTERVAL",
        in_range(parse_duration, 0.1, 3600),
        "10s",
        "how often the liveness check runs (a write transaction and a read of the file, "
        "within half of it); gRPC health and the systemd watchdog follow it",
    ),
    Setting(
        "shutdown_grace",
        "--shutdown-grace",
        "SMQ_SHUTDOWN_GRACE",
        in_range(parse_duration, 0, 600),
        "5s",
        "time in-flight calls get to finish on shutdown",
    ),
    Setting(
        "startup_check",
        "--startup-check",
        "SMQ_STARTUP_CHECK",
        parse_choice(("quick", "off")),
        "quick",
        "quick: check the database file for damage on start (reads it all once); off",
    ),
    Setting(
        "on_corrupt",
        "--on-corrupt",
        "SMQ_ON_CORRUPT",
        parse_choice(("refuse", "move-aside")),
        "refuse",
        "a damaged database: refuse to start, or move it to <name>.corrupt-<time> and start empty",
    ),
    Setting(
        "max_db_size",
        "--max-db-size",
        "SMQ_MAX_DB_SIZE",
        parse_disk_budget,
        "0",
        "disk budget of the database file and its WAL (e.g. 512MiB); 0: no limit",
    ),
    Setting(
        "min_free_space",
        "--min-free-space",
        "SMQ_MIN_FREE_SPACE",
        parse_size,
        "32MiB",
        "free space to leave on the filesystem; writes beyond it are refused",
    ),
    Setting(
        "on_full",
        "--on-full",
        "SMQ_ON_FULL",
        parse_choice(ON_FULL_CHOICES),
        "reject",
        "at the disk budget: reject writes (RESOURCE_EXHAUSTED) or drop the topic's oldest "
        "messages; per-topic override",
    ),
    Setting(
        "retention_max_messages",
        "--retention-max-messages",
        "SMQ_RETENTION_MAX_MESSAGES",
        in_range(int, 0, 2**62),
        "0",
        "keep at most this many messages per topic; 0: no limit; per-topic override",
    ),
    Setting(
        "retention_max_bytes",
        "--retention-max-bytes",
        "SMQ_RETENTION_MAX_BYTES",
        parse_size,
        "0",
        "keep at most this many payload bytes per topic; 0: no limit; per-topic override",
    ),
    Setting(
        "retention_max_age",
        "--retention-max-age",
        "SMQ_RETENTION_MAX_AGE",
        in_range(parse_duration, 0, 100 * 365 * 86400),
        "0",
        "drop messages older than this (e.g. 7d); 0: forever; per-topic override",
    ),
    Setting(
        "max_consumers_per_topic",
        "--max-consumers-per-topic",
        "SMQ_MAX_CONSUMERS_PER_TOPIC",
        in_range(int, 1, 1_000_000),
        "1000",
        "named consumers a topic may have; a commit that would add one more gets "
        "RESOURCE_EXHAUSTED (delete unused ones with: smq consumer delete)",
    ),
    Setting(
        "metrics_port",
        "--metrics-port",
        "SMQ_METRICS_PORT",
        parse_optional_port,
        "",
        "serve Prometheus metrics (/metrics) and a health check (/healthz) over HTTP on "
        "this port; empty: off",
        empty=None,
    ),
    Setting(
        "metrics_bind",
        "--metrics-bind",
        "SMQ_METRICS_BIND",
        parse_optional_host,
        "",
        "address of the metrics port; empty: the same as --bind",
    ),
    Setting(
        "metrics_max_topics",
        "--metrics-max-topics",
        "SMQ_METRICS_MAX_TOPICS",
        in_range(int, 1, 10_000),
        "100",
        "topics with their own series in the metrics (the first ones created); the "
        'others are summed under topic="~other"',
    ),
    LOG_LEVEL,
    ENV_FILE,
)
SETTINGS_BY_FIELD = by_field(SETTINGS)
_DEFAULT = defaults(SETTINGS)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every setting of the server, parsed and validated (defaults: SETTINGS)."""

    dbpath: str = _DEFAULT["dbpath"]
    port: int = _DEFAULT["port"]
    bind: str = _DEFAULT["bind"]
    unix_socket: str = _DEFAULT["unix_socket"]
    unix_socket_group: str = _DEFAULT["unix_socket_group"]
    server_enable_mtls: bool = _DEFAULT["server_enable_mtls"]
    server_cert: str = _DEFAULT["server_cert"]
    server_key: str = _DEFAULT["server_key"]
    server_ca_cert: str = _DEFAULT["server_ca_cert"]
    allow_remote_writes: bool = _DEFAULT["allow_remote_writes"]
    acl_file: str = _DEFAULT["acl_file"]
    quiet_open_network: bool = _DEFAULT["quiet_open_network"]
    durability: str = _DEFAULT["durability"]
    max_message_size: int = _DEFAULT["max_message_size"]
    max_streams: int = _DEFAULT["max_streams"]
    workers: int = _DEFAULT["workers"]
    memory_budget: int = _DEFAULT["memory_budget"]
    stall_timeout: float = _DEFAULT["stall_timeout"]
    heartbeat_interval: float = _DEFAULT["heartbeat_interval"]
    health_check_interval: float = _DEFAULT["health_check_interval"]
    shutdown_grace: float = _DEFAULT["shutdown_grace"]
    startup_check: str = _DEFAULT["startup_check"]
    on_corrupt: str = _DEFAULT["on_corrupt"]
    max_db_size: int = _DEFAULT["max_db_size"]
    min_free_space: int = _DEFAULT["min_free_space"]
    on_full: str = _DEFAULT["on_full"]
    retention_max_messages: int = _DEFAULT["retention_max_messages"]
    retention_max_bytes: int = _DEFAULT["retention_max_bytes"]
    retention_max_age: float = _DEFAULT["retention_max_age"]
    max_consumers_per_topic: int = _DEFAULT["max_consumers_per_topic"]
    metrics_port: int | None = _DEFAULT["metrics_port"]
    metrics_bind: str = _DEFAULT["metrics_bind"]
    metrics_max_topics: int = _DEFAULT["metrics_max_topics"]
    log_level: str = _DEFAULT["log_level"]
    env_file: str = _DEFAULT["env_file"]

    def validate(self) -> ServerConfig:
        """Checks that span settings; raises ConfigError."""
        if self.unix_socket_group and not self.unix_socket:
            raise ConfigError(
                _label("unix_socket_group"),
                self.unix_socket_group,
                f"given without {_label('unix_socket')}",
            )
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


def _label(field: str) -> str:
    return SETTINGS_BY_FIELD[field].label


def load(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build a ServerConfig from flags given (strings or None), an environment and its
    .env file. `flags` maps field names to the raw text the user typed; None means not
    given."""
    return ServerConfig(**read_settings(SETTINGS, flags, environ)).validate()
