"""How a program reaches an SMQ server: one table of connection settings (the names the
original SMQ's clients used: PORT, ENABLE_MTLS, CLIENT_CERT, CLIENT_KEY, CA_CERT) and one
immutable ConnectionConfig. The `smq` commands and `smq forward` read these at start-up;
no grpc here (the certificate files are read with ssl, smq.tls).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import tls
from .domain import DEFAULT_HOST, DEFAULT_PORT, tcp_address
from .settings import (
    ENV_FILE,
    Setting,
    by_field,
    defaults,
    parse_bool,
    parse_host,
    parse_port,
    read_settings,
)
from .tls import TLSFiles  # the name: the class has a property `tls`

CLIENT_TLS_FILES = ("client_cert", "client_key", "ca_cert")

SETTINGS: tuple[Setting, ...] = (
    Setting("host", "--host", "SMQ_HOST", parse_host, DEFAULT_HOST, "server to talk to"),
    Setting("port", "--port", "PORT", parse_port, str(DEFAULT_PORT), "its port"),
    Setting(
        "unix_socket",
        "--unix-socket",
        "SMQ_UNIX_SOCKET",
        str,
        "",
        "connect through the server's Unix socket instead of TCP; writes are always allowed there",
    ),
    Setting(
        "enable_mtls",
        "--enable-mtls",
        "ENABLE_MTLS",
        parse_bool,
        "false",
        "present a client certificate (mutual TLS)",
    ),
    Setting("client_cert", "--client-cert", "CLIENT_CERT", str, "", "client certificate (PEM)"),
    Setting("client_key", "--client-key", "CLIENT_KEY", str, "", "client private key (PEM)"),
    Setting("ca_cert", "--ca-cert", "CA_CERT", str, "", "CA that signed the server certificate"),
    ENV_FILE,
)
SETTINGS_BY_FIELD = by_field(SETTINGS)
_DEFAULT = defaults(SETTINGS)


@dataclasses.dataclass(frozen=True)
class ConnectionConfig:
    """Where the server is and how to authenticate, parsed and validated."""

    host: str = _DEFAULT["host"]
    port: int = _DEFAULT["port"]
    unix_socket: str = _DEFAULT["unix_socket"]
    enable_mtls: bool = _DEFAULT["enable_mtls"]
    client_cert: str = _DEFAULT["client_cert"]
    client_key: str = _DEFAULT["client_key"]
    ca_cert: str = _DEFAULT["ca_cert"]
    env_file: str = _DEFAULT["env_file"]

    @property
    def address(self) -> str:
        """Where gRPC connects: the Unix socket, or host:port."""
        return f"unix:{self.unix_socket}" if self.unix_socket else tcp_address(self.host, self.port)

    @property
    def tls(self) -> bool:
        """mTLS is used (never over the Unix socket, which is plaintext)."""
        return self.enable_mtls and not self.unix_socket

    def missing_tls_files(self) -> list[str]:
        """The certificate settings mTLS needs and lacks (flags), if it is on."""
        if not self.enable_mtls:
            return []
        return [
            SETTINGS_BY_FIELD[name].flag for name in CLIENT_TLS_FILES if not getattr(self, name)
        ]

    def tls_files(self) -> TLSFiles:
        """The client certificate, key and CA, read and checked. Raises CertificateError
        naming the flag and its variable."""
        cert, key, ca = (
            (SETTINGS_BY_FIELD[name].label, getattr(self, name)) for name in CLIENT_TLS_FILES
        )
        return tls.load(cert, key, ca)


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    table: tuple[Setting, ...] = SETTINGS,
) -> ConnectionConfig:
    """Build a ConnectionConfig from flags given (strings or None), an environment and
    its .env file. Raises ConfigError."""
    return ConnectionConfig(
        **{
            field: value
            for field, value in read_settings(table, flags, environ).items()
            if field in SETTINGS_BY_FIELD
        }
    )


def described(group: str, **help_texts: str) -> tuple[Setting, ...]:
    """The connection settings for another program's --help (smq forward): in `group`,
    with the help texts given by field."""
    return tuple(
        dataclasses.replace(s, group=group, help=help_texts.get(s.field, s.help))
        for s in SETTINGS
        if s.field != "env_file"
    )


def channel_options(max_send: int, max_receive: int) -> list[tuple[str, int | str]]:
    """gRPC channel options of SMQ's clients (smq.client, smq forward): message size
    limits in bytes (-1: none), then pings that notice a dead connection under an idle
    stream (as far apart as the server allows), and a quick return after a restart."""
    return [
        ("grpc.max_send_message_length", max_send),
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
