"""Settings of `smq forward`: one table, one immutable ForwardConfig, one `load()`.

Precedence, highest first: flags, environment variables, the `.env` file, defaults
(smq.settings). The SMQ connection is smq.connection's, as for the other client
commands (SMQ_HOST, PORT, SMQ_UNIX_SOCKET, ENABLE_MTLS, CLIENT_CERT, CLIENT_KEY,
CA_CERT); NATS uses the names of the `nats` command line tool (NATS_URL, NATS_CREDS,
NATS_USER, NATS_PASSWORD, NATS_CA, NATS_CERT, NATS_KEY, plus NATS_TOKEN, and
NATS_PASSWORD_FILE and NATS_TOKEN_FILE, read once by `load()`); the rest is
SMQ_FORWARD_*, including the metrics port (SMQ_FORWARD_METRICS_PORT, off by default, and
SMQ_FORWARD_METRICS_BIND, loopback by default: the forwarder listens on nothing else).
`load()` raises ConfigError (one line, naming the setting and value; never a secret's
value).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from .. import connection
from ..domain import NAME_RULE, NAME_RULE_TEXT
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
    parse_optional_port,
    read_secret_file,
    read_settings,
)

DEFAULT_METRICS_BIND = "127.0.0.1"
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a node name: one subject token, no dots
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
PREFIX_TOKEN = re.compile(r"[A-Za-z0-9_$-]+")


def parse_topics(text: str) -> tuple[str, ...]:
    topics = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not topics:
        raise ValueError("expected one or more topic names, separated by commas")
    for topic in topics:
        if not NAME_RULE.fullmatch(topic):
            raise ValueError(f"topic {topic!r}: use {NAME_RULE_TEXT}")
        if "" in topic.split("."):
            raise ValueError(
                f"topic {topic!r} cannot be part of a NATS subject "
                "(no leading, trailing or double dots)"
            )
    return topics


def parse_node(text: str) -> str:
    if not TOKEN.fullmatch(text.strip()):
        raise ValueError("expected 1 to 64 characters of A-Z a-z 0-9 _ - (one subject token)")
    return text.strip()


def parse_prefix(text: str) -> str:
    prefix = text.strip()
    if not prefix or not all(PREFIX_TOKEN.fullmatch(t) for t in prefix.split(".")):
        raise ValueError(
            "expected subject tokens of A-Z a-z 0-9 _ - $ separated by dots, without wildcards"
        )
    return prefix


def parse_stream(text: str) -> str:
    if not STREAM_NAME.fullmatch(text.strip()):
        raise ValueError("expected a JetStream stream name: A-Z a-z 0-9 _ -")
    return text.strip()


def parse_consumer(text: str) -> str:
    if not NAME_RULE.fullmatch(text.strip()):
        raise ValueError(f"use {NAME_RULE_TEXT}")
    return text.strip()


def parse_servers(text: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    if not servers:
        raise ValueError("expected one or more NATS server URLs, separated by commas")
    for server in servers:
        if not re.fullmatch(r"((nats|tls|ws|wss)://)?[^\s/,]+(:\d+)?/?", server):
            raise ValueError(f"{server!r} is not a NATS URL such as nats://host:4222")
    return servers


def parse_metrics_bind(text: str) -> str:
    """A host or address; empty: the default (loopback)."""
    return parse_host(text) if text.strip() else DEFAULT_METRICS_BIND


def parse_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1e6:
        raise ValueError("expected messages per second from 0 (no limit) to 1000000")
    return value


SETTINGS: tuple[Setting, ...] = (
    # What and where.
    Setting(
        "topics",
        "--topics",
        "SMQ_FORWARD_TOPICS",
        parse_topics,
        "",
        "SMQ topics to forward, separated by commas (required)",
        "forwarding",
        empty=(),
    ),
    Setting(
        "node",
        "--node",
        "SMQ_FORWARD_NODE",
        parse_node,
        "",
        "this device's name in subjects and message ids [default: the host name up to its "
        "first dot]",
        "forwarding",
    ),
    Setting(
        "subject_prefix",
        "--subject-prefix",
        "SMQ_FORWARD_SUBJECT_PREFIX",
        parse_prefix,
        "smq",
        "subjects are PREFIX.NODE.TOPIC",
        "forwarding",
    ),
    Setting(
        "stream",
        "--stream",
        "SMQ_FORWARD_STREAM",
        parse_stream,
        "",
        "JetStream stream to publish to [default: SMQ_NODE]",
        "forwarding",
    ),
    Setting(
        "consumer",
        "--consumer",
        "SMQ_FORWARD_CONSUMER",
        parse_consumer,
        "",
        "SMQ durable consumer whose offsets say what was forwarded [default: forward-NODE]",
        "forwarding",
    ),
    Setting(
        "start_from",
        "--start-from",
        "SMQ_FORWARD_START_FROM",
        parse_choice(("earliest", "latest")),
        "earliest",
        "where a topic that this consumer never committed starts: earliest, or only new messages",
        "forwarding",
    ),
    Setting(
        "window",
        "--window",
        "SMQ_FORWARD_WINDOW",
        in_range(int, 1, 10_000),
        "256",
        "messages published and not yet acknowledged, at most",
        "forwarding",
    ),
    Setting(
        "rate_limit",
        "--rate-limit",
        "SMQ_FORWARD_RATE_LIMIT",
        parse_rate,
        "0",
        "messages per second, at most; 0: no limit",
        "forwarding",
    ),
    Setting(
        "ack_timeout",
        "--ack-timeout",
        "SMQ_FORWARD_ACK_TIMEOUT",
        in_range(parse_duration, 0.1, 600),
        "10s",
        "wait this long for JetStream's acknowledgement of a message, then reconnect and resend",
        "forwarding",
    ),
    Setting(
        "create_stream",
        "--create-stream",
        "SMQ_FORWARD_CREATE_STREAM",
        parse_bool,
        "false",
        "create the stream (subjects PREFIX.NODE.>) if it does not exist",
        "forwarding",
    ),
    Setting(
        "replicas",
        "--replicas",
        "SMQ_FORWARD_REPLICAS",
        in_range(int, 1, 5),
        "1",
        "replicas of a stream that --create-stream creates",
        "forwarding",
    ),
    Setting(
        "duplicate_window",
        "--duplicate-window",
        "SMQ_FORWARD_DUPLICATE_WINDOW",
        in_range(parse_duration, 1, 7 * 86400),
        "2m",
        "duplicate window of a stream that --create-stream creates",
        "forwarding",
    ),
    Setting(
        "log_interval",
        "--log-interval",
        "SMQ_FORWARD_LOG_INTERVAL",
        in_range(parse_duration, 0.1, 86400),
        "1m",
        "log the backlog this often",
        "forwarding",
    ),
    dataclasses.replace(LOG_LEVEL, group="forwarding"),
    dataclasses.replace(ENV_FILE, group="forwarding"),
    # The SMQ server (as for the other client commands).
    *connection.described(
        "SMQ server",
        host="SMQ server to read from",
        ca_cert="CA that signed the SMQ server's certificate",
    ),
    # NATS.
    Setting(
        "nats_servers",
        "--nats-servers",
        "NATS_URL",
        parse_servers,
        "nats://localhost:4222",
        "NATS servers, separated by commas (nats://host:4222, tls://host:4222)",
        "NATS",
    ),
    Setting(
        "nats_creds",
        "--nats-creds",
        "NATS_CREDS",
        str,
        "",
        "credentials file (JWT and NKey; needs the nkeys package)",
        "NATS",
    ),
    Setting("nats_user", "--nats-user", "NATS_USER", str, "", "user name", "NATS"),
    Setting(
        "nats_password",
        "--nats-password",
        "NATS_PASSWORD",
        str,
        "",
        "password (as a flag, every user sees it in the process list)",
        "NATS",
    ),
    Setting(
        "nats_password_file",
        "--nats-password-file",
        "NATS_PASSWORD_FILE",
        str,
        "",
        "file holding the password instead (read at start, the trailing newline "
        "dropped), e.g. one that systemd's LoadCredential= passes",
        "NATS",
    ),
    Setting(
        "nats_token",
        "--nats-token",
        "NATS_TOKEN",
        str,
        "",
        "authentication token (as a flag, every user sees it in the process list)",
        "NATS",
    ),
    Setting(
        "nats_token_file",
        "--nats-token-file",
        "NATS_TOKEN_FILE",
        str,
        "",
        "file holding the token instead (read as --nats-password-file)",
        "NATS",
    ),
    Setting(
        "nats_ca",
        "--nats-ca",
        "NATS_CA",
        str,
        "",
        "CA that signed the NATS servers' certificates (turns on TLS)",
        "NATS",
    ),
    Setting(
        "nats_cert",
        "--nats-cert",
        "NATS_CERT",
        str,
        "",
        "client certificate for NATS (PEM)",
        "NATS",
    ),
    Setting("nats_key", "--nats-key", "NATS_KEY", str, "", "its private key (PEM)", "NATS"),
    # Metrics.
    Setting(
        "metrics_port",
        "--metrics-port",
        "SMQ_FORWARD_METRICS_PORT",
        parse_optional_port,
        "",
        "serve Prometheus metrics (/metrics) and a health check (/healthz) over HTTP on "
        "this port; empty: off",
        "metrics",
        empty=None,
    ),
    Setting(
        "metrics_bind",
        "--metrics-bind",
        "SMQ_FORWARD_METRICS_BIND",
        parse_metrics_bind,
        DEFAULT_METRICS_BIND,
        "address of the metrics port: 127.0.0.1 keeps it on this device, 0.0.0.0 or :: "
        "opens it to the network; empty: 127.0.0.1",
        "metrics",
    ),
)
SETTINGS_BY_FIELD = by_field(SETTINGS)
_DEFAULT = defaults(SETTINGS)


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Every setting of `smq forward`, parsed and validated."""

    topics: tuple[str, ...] = _DEFAULT["topics"]
    node: str = _DEFAULT["node"]
    subject_prefix: str = _DEFAULT["subject_prefix"]
    stream: str = _DEFAULT["stream"]
    consumer: str = _DEFAULT["consumer"]
    start_from: str = _DEFAULT["start_from"]
    window: int = _DEFAULT["window"]
    rate_limit: float = _DEFAULT["rate_limit"]
    ack_timeout: float = _DEFAULT["ack_timeout"]
    create_stream: bool = _DEFAULT["create_stream"]
    replicas: int = _DEFAULT["replicas"]
    duplicate_window: float = _DEFAULT["duplicate_window"]
    log_interval: float = _DEFAULT["log_interval"]
    log_level: str = _DEFAULT["log_level"]
    env_file: str = _DEFAULT["env_file"]
    host: str = _DEFAULT["host"]
    port: int = _DEFAULT["port"]
    unix_socket: str = _DEFAULT["unix_socket"]
    enable_mtls: bool = _DEFAULT["enable_mtls"]
    client_cert: str = _DEFAULT["client_cert"]
    client_key: str = _DEFAULT["client_key"]
    ca_cert: str = _DEFAULT["ca_cert"]
    nats_servers: tuple[str, ...] = _DEFAULT["nats_servers"]
    nats_creds: str = _DEFAULT["nats_creds"]
    nats_user: str = _DEFAULT["nats_user"]
    nats_password: str = _DEFAULT["nats_password"]
    nats_password_file: str = _DEFAULT["nats_password_file"]
    nats_token: str = _DEFAULT["nats_token"]
    nats_token_file: str = _DEFAULT["nats_token_file"]
    nats_ca: str = _DEFAULT["nats_ca"]
    nats_cert: str = _DEFAULT["nats_cert"]
    nats_key: str = _DEFAULT["nats_key"]
    metrics_port: int | None = _DEFAULT["metrics_port"]
    metrics_bind: str = _DEFAULT["metrics_bind"]

    def validate(self) -> ForwardConfig:
        """Checks that span settings, and that every named file can be read."""
        if not self.topics:
            raise ConfigError(label("topics"), "", "required: the SMQ topics to forward")
        if self.enable_mtls:
            if self.unix_socket:
                raise ConfigError(
                    label("enable_mtls"),
                    "true",
                    "the Unix socket is plaintext, "
                    "for callers on the same device: use one or the other",
                )
            for name in ("client_cert", "client_key", "ca_cert"):
                if not getattr(self, name):
                    raise ConfigError(label(name), "", "required with --enable-mtls")
        if (self.nats_cert and not self.nats_key) or (self.nats_key and not self.nats_cert):
            raise ConfigError(
                label("nats_key" if self.nats_cert else "nats_cert"),
                "",
                "--nats-cert and --nats-key go together",
            )
        if self.nats_password and not self.nats_user:
            given = "nats_password_file" if self.nats_password_file else "nats_password"
            raise ConfigError(label("nats_user"), "", f"required with {flag(given)}")
        methods = [f for f in ("nats_creds", "nats_user", "nats_token") if getattr(self, f)]
        if len(methods) > 1:
            second = methods[1]
            shown = getattr(self, second)
            if second == "nats_token":  # a secret: named by its file, or not shown
                second = "nats_token_file" if self.nats_token_file else second
                shown = self.nats_token_file or "(hidden)"
            raise ConfigError(
                label(second),
                shown,
                f"use one way to authenticate to NATS, not also {label(methods[0])}",
            )
        files = ["nats_creds", "nats_ca", "nats_cert", "nats_key"]
        if self.enable_mtls:
            files += ["client_cert", "client_key", "ca_cert"]
        for name in files:
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(label(name), path, "no such file, or not readable")
        return self

    def connection(self) -> connection.ConnectionConfig:
        """Where the SMQ server is, and how to authenticate."""
        return connection.ConnectionConfig(
            **{field: getattr(self, field) for field in connection.SETTINGS_BY_FIELD}
        )


def label(field: str) -> str:
    return SETTINGS_BY_FIELD[field].label


def flag(field: str) -> str:
    return SETTINGS_BY_FIELD[field].flag


# A secret that may come from a file instead: (the secret's field, its file's field).
SECRET_FILES = (("nats_password", "nats_password_file"), ("nats_token", "nats_token_file"))


def _read_secret_files(values: dict[str, Any]) -> None:
    """Put the contents of each secret's file given into `values`; ConfigError if the
    file cannot be used or the secret is given both ways."""
    for secret, file in SECRET_FILES:
        path = values.get(file)
        if not path:
            continue
        if values.get(secret):
            raise ConfigError(label(file), path, f"give {flag(secret)} or {flag(file)}, not both")
        try:
            values[secret] = read_secret_file(path)
        except ValueError as exc:
            raise ConfigError(label(file), path, str(exc)) from None


def default_node(hostname: str | None = None) -> str:
    """The host name up to its first dot, when that is a valid subject token."""
    return (hostname or socket.gethostname()).split(".")[0]


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
) -> ForwardConfig:
    """Build a ForwardConfig from flags given (strings or None), an environment and its
    .env file. Raises ConfigError."""
    values = read_settings(SETTINGS, flags, environ, number_reason="expected a number")
    _read_secret_files(values)
    if "node" not in values:
        node = default_node(hostname)
        try:
            values["node"] = parse_node(node)
        except ValueError as exc:
            raise ConfigError(f"{label('node')}, from the host name", node, str(exc)) from None
    values.setdefault("stream", f"SMQ_{values['node']}")
    values.setdefault("consumer", f"forward-{values['node']}")
    return ForwardConfig(**values).validate()
