"""The client's gRPC edge: the channel it talks over, and what a failed call becomes.

- `client_target` checks a client's options and names its target; `channel_setup`
  gathers a plaintext or mutual-TLS channel's options and credentials, which
  `open_channel` (and the async client, with grpc.aio) opens.
- `ERROR_FOR_STATUS` maps every status code to its own `smq.errors` class (one-to-one,
  tested); `error_for` builds the error a `Client` method raises: that class, combined
  with the `pysmq` class of the operation where pysmq raises that one, and a message
  that says what failed and what to try. `smq.client` re-exports `ERROR_FOR_STATUS`.
- When no connection could be made (`connect_failed`), gRPC's text says little that a
  person can act on: the caller probes the address (`smq.client.probe.diagnose`, which
  blocks) and passes the Diagnosis to `error_for`, whose message and class it decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import grpc

from .. import tls
from ..connection import channel_options
from ..domain import tcp_address
from ..errors import (
    CLASS_FOR_STATUS,
    TRANSPORT_ERRORS,
    AccessDenied,
    SMQError,
    error_class,
    reason_in,
    with_operation,
)
from . import probe
from .probe import Diagnosis
from .types import ClientTLSConfig

#: Every gRPC status an SMQ call can end with, and the error class it raises (one-to-one).
ERROR_FOR_STATUS: Mapping[grpc.StatusCode, type[SMQError]] = MappingProxyType(
    {code: CLASS_FOR_STATUS[code.name] for code in grpc.StatusCode if code.name in CLASS_FOR_STATUS}
)

# Iterators reconnect after these: the server went away, or a page read timed out.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def refused_stream(exc: grpc.RpcError) -> bool:
    """Whether the server refused the call's HTTP/2 stream (REFUSED_STREAM: more calls
    at once on the connection than its `grpc.max_concurrent_streams`). Such a call was
    never processed, so any call, a produce too, may be sent again. gRPC reports it as
    UNAVAILABLE and names the HTTP/2 error code only in the details."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "RST_STREAM with error code 7" in (
        exc.details() or ""
    )


_HINTS: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.PERMISSION_DENIED: (
        "write through the server's Unix socket, or start it with --allow-remote-writes=true"
    ),
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


def connect_failed(exc: grpc.RpcError) -> bool:
    """Whether the call failed because no connection could be made (worth a probe)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and probe.connect_failed(exc.details() or "")


def error_for(
    exc: grpc.RpcError,
    op: Op,
    *,
    target: str,
    tls: bool,
    timeout: float | None,
    diagnosis: Diagnosis | None = None,
) -> SMQError:
    """The SMQError for a failed call to `target`: the status class (or the finer class
    of the reason the server sent), combined with the operation's pysmq class where pysmq
    raises that one. `timeout` is the call's budget (for the message of DEADLINE_EXCEEDED).
    `diagnosis`: why no connection could be made, if the caller probed (its class and
    line replace the status's; gRPC's text stays in `.details`)."""
    code = exc.code()
    details = exc.details() or ""
    if diagnosis is not None:
        status_class: type[SMQError] = diagnosis.error_class
    else:
        status_class = error_class(
            code.name, reason_in(getattr(exc, "trailing_metadata", lambda: None)())
        )
    raised = status_class
    if op.error_class is not None and (
        op.wrap_all or not issubclass(status_class, TRANSPORT_ERRORS)
    ):
        # mypy (2.4) takes a class for an instance when checking that it is Hashable.
        raised = with_operation(status_class, op.error_class)  # type: ignore[arg-type]
    if diagnosis is not None:
        message = diagnosis.problem
    elif code == grpc.StatusCode.UNAVAILABLE and connect_failed(exc):
        # Not probed (or the probe found the server answering by now): no raw text here.
        message = (
            f"cannot reach the SMQ server at {target}; check that it is running and reachable there"
        )
        if tls:
            message += ", and that the certificates match (client, server name, CA)"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = (
            f"the SMQ server at {target} is unavailable ({details}); "
            "check that it is running and reachable there"
        )
        if tls:
            message += ", and that the certificates match (client, server name, CA)"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f" within {timeout:g} s" if timeout is not None else ""
        message = (
            f"no answer from {target}{waited} ({details}); "
            "pass a larger timeout= or check the server"
        )
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        message = (
            f"the server at {target} does not support this call "
            f"({details}); is it an older or the original SMQ?"
        )
    else:
        message = details or code.name
        if code in _HINTS and not issubclass(status_class, AccessDenied):
            message += f"; {_HINTS[code]}"  # an ACL's denial says all there is to say
    return raised.from_status(
        f"could not {op.action}: {message}",
        code=code,
        details=details,
        original_error=exc,
        topic=op.topic,
        action=op.action,
        problem=message,
        cause=diagnosis.cause if diagnosis is not None else "",
    )


@dataclasses.dataclass(frozen=True)
class ChannelSetup:
    """What a channel to the server is opened with, by grpc or grpc.aio alike."""

    target: str
    options: list[tuple[str, int | str]]
    credentials: grpc.ChannelCredentials | None  # None: plaintext


def client_target(
    host: str,
    port: int,
    tls_config: ClientTLSConfig | None,
    *,
    unix_socket: str | None,
    retries: int,
    channel_given: bool,
) -> str:
    """The target a client's options name (for messages and channels); checks that the
    options go together (ValueError if not)."""
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, not {retries}")
    if tls_config is not None and unix_socket:
        raise ValueError(
            "tls_config cannot be used with unix_socket: the server's "
            "socket is plaintext, for callers on the same device"
        )
    if channel_given:
        return "(given channel)"
    if unix_socket:
        return f"unix:{unix_socket}"
    return tcp_address(host, port)


def channel_setup(
    target: str,
    tls_files: ClientTLSConfig | None,
    *,
    server_hostname: str | None,
    max_send_mb: int,
    max_receive_mb: int,
) -> ChannelSetup:
    """The options and credentials of a channel to `target` (plaintext without
    `tls_files`). Raises CertificateError (an SMQAuthenticationError) if a TLS file
    cannot be read or is not valid."""
    options = channel_options(_size_option(max_send_mb), _size_option(max_receive_mb))
    if tls_files is None:
        return ChannelSetup(target, options, None)
    files = tls.load(
        ("client certificate (cert_file)", tls_files.cert_file),
        ("client key (key_file)", tls_files.key_file),
        ("CA certificate (ca_file)", tls_files.ca_file),
    )
    if server_hostname:
        options.append(("grpc.ssl_target_name_override", server_hostname))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
    )
    return ChannelSetup(target, options, credentials)


def open_channel(setup: ChannelSetup) -> grpc.Channel:
    """A (blocking) grpc channel as `setup` says."""
    if setup.credentials is None:
        return grpc.insecure_channel(setup.target, options=setup.options)
    return grpc.secure_channel(setup.target, setup.credentials, options=setup.options)


def _size_option(megabytes: int) -> int:
    """A channel size limit in bytes; -1 (unlimited) beyond what gRPC's int option holds."""
    size = megabytes * 1024 * 1024
    return -1 if megabytes < 0 or size >= 2**31 else size
