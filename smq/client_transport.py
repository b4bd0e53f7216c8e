"""The client's gRPC edge: the channel it talks over, and what a failed call becomes.

- `open_channel` opens a plaintext or mutual-TLS channel with the client's options.
- `ERROR_FOR_STATUS` maps every status code to its own `smq.errors` class (one-to-one,
  tested); `error_for` builds the error a `Client` method raises: that class, combined
  with the `pysmq` class of the operation where pysmq raises that one, and a message
  that says what failed and what to try. `smq.client` re-exports `ERROR_FOR_STATUS`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc

from .client_types import ClientTLSConfig
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded,
                     InternalError, InvalidArgument, NotFound, OffsetOutOfRange,
                     PermissionDenied, ResourceExhausted, SMQAuthenticationError, SMQError,
                     TopicEmpty, TRANSPORT_ERRORS, Unauthenticated, Unavailable, Unimplemented,
                     UnknownError, with_operation)

#: Every gRPC status an SMQ call can end with, and the error class it raises (one-to-one).
ERROR_FOR_STATUS: Mapping[grpc.StatusCode, type[SMQError]] = MappingProxyType({
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: TopicEmpty,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OffsetOutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
})

# Iterators reconnect after these: the server went away, or a page read timed out.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_HINTS: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.PERMISSION_DENIED:
        "write through the server's Unix socket, or start it with --allow-remote-writes=true",
    grpc.StatusCode.UNAUTHENTICATED: "check the client certificate and key",
    grpc.StatusCode.INTERNAL: "the server log has the details",
}


@dataclasses.dataclass(frozen=True)
class Op:
    """What a call does, for error messages and classes: `action` completes
    "could not ...", `error_class` is the pysmq class for errors of this operation."""
    action: str
    error_class: type[SMQError] | None
    topic: str | None = None
    wrap_all: bool = False  # pysmq's consume_earliest/latest wrap even connection errors


def tcp_address(host: str, port: int) -> str:
    """host:port for gRPC, with an IPv6 literal in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def error_for(exc: grpc.RpcError, op: Op, *, target: str, tls: bool,
              timeout: float | None) -> SMQError:
    """The SMQError for a failed call to `target`: the status class, combined with the
    operation's pysmq class where pysmq raises that one. `timeout` is the call's budget
    (for the message of DEADLINE_EXCEEDED)."""
    code = exc.code()
    details = exc.details() or ""
    status_class = ERROR_FOR_STATUS.get(code, UnknownError)
    error_class = status_class
    if op.error_class is not None and (op.wrap_all or not issubclass(status_class, TRANSPORT_ERRORS)):
        error_class = with_operation(status_class, op.error_class)
    if code == grpc.StatusCode.UNAVAILABLE:
        reason = f"the SMQ server at {target} is unavailable ({details}); " \
                 "check that it is running and reachable there"
        if tls:
            reason += ", and that the certificates match (client, server name, CA)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f" within {timeout:g} s" if timeout is not None else ""
        reason = f"no answer from {target}{waited} ({details}); " \
                 "pass a larger timeout= or check the server"
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        reason = f"the server at {target} does not support this call " \
                 f"({details}); is it an older or the original SMQ?"
    else:
        reason = details or code.name
        if code in _HINTS:
            reason += f"; {_HINTS[code]}"
    return error_class.from_status(f"could not {op.action}: {reason}", code=code,
                                   details=details, original_error=exc, topic=op.topic)


def open_channel(target: str, tls: ClientTLSConfig | None, *, server_hostname: str | None,
                 max_send_mb: int, max_receive_mb: int) -> grpc.Channel:
    """A channel to `target` (plaintext without `tls`). Raises SMQAuthenticationError if
    a TLS file cannot be read."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", _size_option(max_send_mb)),
        ("grpc.max_receive_message_length", _size_option(max_receive_mb)),
        # Notice a dead connection under an idle stream (the server allows pings
        # this far apart), and come back quickly after a server restart.
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    files = {}
    for field, what in (("cert_file", "client certificate"), ("key_file", "client key"),
                        ("ca_file", "CA certificate")):
        path = getattr(tls, field)
        try:
            with open(path, "rb") as stream:
                files[field] = stream.read()
        except OSError as exc:
            raise SMQAuthenticationError(
                f"cannot read the {what} {path!r} ({field}): {exc.strerror or exc}", exc) from exc
    if server_hostname:
        options.append(("grpc.ssl_target_name_override", server_hostname))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files["ca_file"], private_key=files["key_file"],
        certificate_chain=files["cert_file"])
    return grpc.secure_channel(target, credentials, options=options)


def _size_option(megabytes: int) -> int:
    """A channel size limit in bytes; -1 (unlimited) beyond what gRPC's int option holds."""
    size = megabytes * 1024 * 1024
    return -1 if megabytes < 0 or size >= 2**31 else size
