"""Settings of `smq forward`: one table, one immutable ForwardConfig, one `load()`.

Precedence, highest first: flags, environment variables, the `.env` file, defaults
(as for the server, see smq.config). The SMQ connection uses the names of the other
client commands (SMQ_HOST, PORT, SMQ_UNIX_SOCKET, ENABLE_MTLS, CLIENT_CERT, CLIENT_KEY,
CA_CERT); NATS uses the names of the `nats` command line tool (NATS_URL, NATS_CREDS,
NATS_USER, NATS_PASSWORD, NATS_CA, NATS_CERT, NATS_KEY, plus NATS_TOKEN); the rest is
SMQ_FORWARD_*. `load()` raises ConfigError (one line, naming the setting and value).
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from . import config
from .config import Setting, in_range, parse_bool, parse_choice, parse_duration, read_settings
from .errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")   # SMQ topic and consumer names
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")     # a node name: one subject token, no dots
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
PREFIX_TOKEN = re.compile(r"[A-Za-z0-9_$-]+")


def parse_topics(text: str) -> tuple[str, ...]:
    topics = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not topics:
        raise ValueError("expected one or more topic names, separated by commas")
    for topic in topics:
        if not NAME.fullmatch(topic):
            raise ValueError(f"topic {topic!r}: use 1 to 249 characters of A-Z a-z 0-9 . _ -")
        if "" in topic.split("."):
            raise ValueError(f"topic {topic!r} cannot be part of a NATS subject "
                             "(no leading, trailing or double dots)")
    return topics


def parse_node(text: str) -> str:
    if not TOKEN.fullmatch(text.strip()):
        raise ValueError("expected 1 to 64 characters of A-Z a-z 0-9 _ - (one subject token)")
    return text.strip()


def parse_prefix(text: str) -> str:
    prefix = text.strip()
    if not prefix or not all(PREFIX_TOKEN.fullmatch(t) for t in prefix.split(".")):
        raise ValueError("expected subject tokens of A-Z a-z 0-9 _ - $ separated by dots, "
                         "without wildcards")
    return prefix


def parse_stream(text: str) -> str:
    if not STREAM_NAME.fullmatch(text.strip()):
        raise ValueError("expected a JetStream stream name: A-Z a-z 0-9 _ -")
    return text.strip()


def parse_consumer(text: str) -> str:
    if not NAME.fullmatch(text.strip()):
        raise ValueError("use 1 to 249 characters of A-Z a-z 0-9 . _ -")
    return text.strip()


def parse_servers(text: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    if not servers:
        raise ValueError("expected one or more NATS server URLs, separated by commas")
    for server in servers:
        if not re.fullmatch(r"((nats|tls|ws|wss)://)?[^\s/,]+(:\d+)?/?", server):
            raise ValueError(f"{server!r} is not a NATS URL such as nats://host:4222")
    return servers


def parse_rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1e6:
        raise ValueError("expected messages per second from 0 (no limit) to 1000000")
    return value


def _shared(field: str, help: str, group: str) -> Setting:
    """A setting of smq's own table (same flag, variable and parser), described for forward."""
    return dataclasses.replace(config.SETTINGS_BY_FIELD[field], help=help, group=group)


SETTINGS: tuple[Setting, ...] = (
    # What and where.
    Setting("topics", "--topics", "SMQ_FORWARD_TOPICS", parse_topics,
       "SMQ topics to forward, separated by commas (required)", "forwarding"),
    Setting("node", "--node", "SMQ_FORWARD_NODE", parse_node,
       "this device's name in subjects and message ids [default: the host name up to its "
       "first dot]", "forwarding"),
    Setting("subject_prefix", "--subject-prefix", "SMQ_FORWARD_SUBJECT_PREFIX", parse_prefix,
       "subjects are PREFIX.NODE.TOPIC", "forwarding"),
    Setting("stream", "--stream", "SMQ_FORWARD_STREAM", parse_stream,
       "JetStream stream to publish to [default: SMQ_NODE]", "forwarding"),
    Setting("consumer", "--consumer", "SMQ_FORWARD_CONSUMER", parse_consumer,
       "SMQ durable consumer whose offsets say what was forwarded [default: forward-NODE]",
       "forwarding"),
    Setting("start_from", "--start-from", "SMQ_FORWARD_START_FROM",
       parse_choice(("earliest", "latest")),
       "where a topic that this consumer never committed starts: earliest, or only new "
       "messages", "forwarding"),
    Setting("window", "--window", "SMQ_FORWARD_WINDOW", in_range(int, 1, 10_000),
       "messages published and not yet acknowledged, at most", "forwarding"),
    Setting("rate_limit", "--rate-limit", "SMQ_FORWARD_RATE_LIMIT", parse_rate,
       "messages per second, at most; 0: no limit", "forwarding"),
    Setting("ack_timeout", "--ack-timeout", "SMQ_FORWARD_ACK_TIMEOUT",
       in_range(parse_duration, 0.1, 600), "wait this long for JetStream's acknowledgement "
       "of a message, then reconnect and resend", "forwarding"),
    Setting("create_stream", "--create-stream", "SMQ_FORWARD_CREATE_STREAM", parse_bool,
       "create the stream (subjects PREFIX.NODE.>) if it does not exist", "forwarding"),
    Setting("replicas", "--replicas", "SMQ_FORWARD_REPLICAS", in_range(int, 1, 5),
       "replicas of a stream that --create-stream creates", "forwarding"),
    Setting("duplicate_window", "--duplicate-window", "SMQ_FORWARD_DUPLICATE_WINDOW",
       in_range(parse_duration, 1, 7 * 86400),
       "duplicate window of a stream that --create-stream creates", "forwarding"),
    Setting("log_interval", "--log-interval", "SMQ_FORWARD_LOG_INTERVAL",
       in_range(parse_duration, 0.1, 86400), "log the backlog this often", "forwarding"),
    _shared("log_level", "debug, info, warning or error", "forwarding"),
    _shared("env_file", "file of KEY=value settings read below the environment (missing default "
            "is fine)", "forwarding"),
    # The SMQ server (as for the other client commands).
    _shared("host", "SMQ server to read from", "SMQ server"),
    _shared("port", "its port", "SMQ server"),
    _shared("unix_socket", "connect through the server's Unix socket instead of TCP", "SMQ server"),
    _shared("enable_mtls", "present a client certificate (mutual TLS)", "SMQ server"),
    _shared("client_cert", "client certificate (PEM)", "SMQ server"),
    _shared("client_key", "client private key (PEM)", "SMQ server"),
    _shared("ca_cert", "CA that signed the SMQ server's certificate", "SMQ server"),
    # NATS.
    Setting("nats_servers", "--nats-servers", "NATS_URL", parse_servers,
       "NATS servers, separated by commas (nats://host:4222, tls://host:4222)", "NATS"),
    Setting("nats_creds", "--nats-creds", "NATS_CREDS", str,
       "credentials file (JWT and NKey; needs the nkeys package)", "NATS"),
    Setting("nats_user", "--nats-user", "NATS_USER", str, "user name", "NATS"),
    Setting("nats_password", "--nats-password", "NATS_PASSWORD", str, "password", "NATS"),
    Setting("nats_token", "--nats-token", "NATS_TOKEN", str, "authentication token", "NATS"),
    Setting("nats_ca", "--nats-ca", "NATS_CA", str, "CA that signed the NATS servers' certificates "
       "(turns on TLS)", "NATS"),
    Setting("nats_cert", "--nats-cert", "NATS_CERT", str, "client certificate for NATS (PEM)", "NATS"),
    Setting("nats_key", "--nats-key", "NATS_KEY", str, "its private key (PEM)", "NATS"),
)
SETTINGS_BY_FIELD = {s.field: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Every setting of `smq forward`, parsed and validated."""
    topics: tuple[str, ...] = ()
    node: str = ""
    subject_prefix: str = "smq"
    stream: str = ""
    consumer: str = ""
    start_from: str = "earliest"
    window: int = 256
    rate_limit: float = 0.0
    ack_timeout: float = 10.0
    create_stream: bool = False
    replicas: int = 1
    duplicate_window: float = 120.0
    log_interval: float = 60.0
    log_level: str = "info"
    env_file: str = ".env"
    host: str = "localhost"
    port: int = 8097
    unix_socket: str = ""
    enable_mtls: bool = False
    client_cert: str = ""
    client_key: str = ""
    ca_cert: str = ""
    nats_servers: tuple[str, ...] = ("nats://localhost:4222",)
    nats_creds: str = ""
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_ca: str = ""
    nats_cert: str = ""
    nats_key: str = ""

    def validate(self) -> ForwardConfig:
        """Checks that span settings, and that every named file can be read."""
        if not self.topics:
            raise ConfigError(label("topics"), "", "required: the SMQ topics to forward")
        if self.enable_mtls:
            if self.unix_socket:
                raise ConfigError(label("enable_mtls"), "true", "the Unix socket is plaintext, "
                                  "for callers on the same device: use one or the other")
            for name in ("client_cert", "client_key", "ca_cert"):
                if not getattr(self, name):
                    raise ConfigError(label(name), "", "required with --enable-mtls")
        if self.nats_cert and not self.nats_key or self.nats_key and not self.nats_cert:
            raise ConfigError(label("nats_key" if self.nats_cert else "nats_cert"), "",
                              "--nats-cert and --nats-key go together")
        if self.nats_password and not self.nats_user:
            raise ConfigError(label("nats_user"), "", "required with --nats-password")
        methods = [f for f in ("nats_creds", "nats_user", "nats_token") if getattr(self, f)]
        if len(methods) > 1:
            raise ConfigError(label(methods[1]), getattr(self, methods[1]),
                              f"use one way to authenticate to NATS, not also {label(methods[0])}")
        files = ["nats_creds", "nats_ca", "nats_cert", "nats_key"]
        if self.enable_mtls:
            files += ["client_cert", "client_key", "ca_cert"]
        for name in files:
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(label(name), path, "no such file, or not readable")
        return self


def label(field: str) -> str:
    setting = SETTINGS_BY_FIELD[field]
    return f"{setting.flag} ({setting.env})"


def default_node(hostname: str | None = None) -> str:
    """The host name up to its first dot, when that is a valid subject token."""
    return (hostname or socket.gethostname()).split(".")[0]


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
         hostname: str | None = None) -> ForwardConfig:
    """Build a ForwardConfig from flags given (strings or None), an environment and its
    .env file. Raises ConfigError."""
    values = read_settings(SETTINGS, flags, environ, number_reason="expected a number")
    if "node" not in values:
        node = default_node(hostname)
        try:
            values["node"] = parse_node(node)
        except ValueError as exc:
            raise ConfigError(f"{label('node')}, from the host name", node, str(exc)) from None
    values.setdefault("stream", f"SMQ_{values['node']}")
    values.setdefault("consumer", f"forward-{values['node']}")
    return ForwardConfig(**values).validate()
