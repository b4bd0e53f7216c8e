"""Why the client cannot connect: the server's address probed with the standard library.

When gRPC fails to connect, its text names the last address it tried and what broke
there at the lowest level ("Socket closed", an IPv6 "Connection refused" while the server
listens on IPv4, or nothing). `diagnose` asks the questions a person would, in order,
with `socket` and `ssl` and the client's own files:

1. Does the host name resolve? Does anything accept a TCP connection there?
2. Plaintext client: does the server expect TLS instead?
3. TLS client: does the server speak TLS; does the given CA trust its certificate, made
   for the name connected to; does the server accept the client certificate (a TLS 1.3
   server refuses it after the handshake, by closing the connection)?

The answer is a Diagnosis: one line for people, the error class, and whether the cause
lasts (trying again cannot help: a certificate problem) or may pass (a server that is
restarting). No grpc here; blocking, bounded by `timeout` (an async caller runs it in a
thread).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time

from ..errors import SMQAuthenticationError, SMQError, Unavailable
from .types import ClientTLSConfig

# The start of gRPC's text when no connection could be made (the call never reached a
# server): what `diagnose` is for. Other UNAVAILABLE texts come from a server.
CONNECT_FAILURE_TEXTS = (
    "failed to connect to all addresses",
    "DNS resolution failed",
    "errors resolving",
)

# What an HTTP/2 client sends first (the preface and an empty SETTINGS frame); an HTTP/2
# server answers with a SETTINGS frame (type 4, the fourth byte of its 9-byte header).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 4

# OpenSSL's verification codes (X509_V_ERR_*) that have a message of their own.
_EXPIRED, _NOT_YET_VALID = 10, 9
_NAME_MISMATCH = {62, 64}  # hostname, IP address


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What is wrong, for the error a call raises.

    `cause`: a tag programs and the CLI can act on (CAUSES); `problem`: one line for
    people, naming the address and the file at fault; `lasting`: trying again cannot help."""

    cause: str
    problem: str
    error_class: type[SMQError]
    lasting: bool


CAUSES = {
    # cause: (error class, lasting)
    "unresolved": (Unavailable, False),
    "refused": (Unavailable, False),
    "no-answer": (Unavailable, False),
    "unreachable": (Unavailable, False),
    "tls-expected": (SMQAuthenticationError, True),
    "not-tls": (SMQAuthenticationError, True),
    "server-cert-untrusted": (SMQAuthenticationError, True),
    "server-cert-expired": (SMQAuthenticationError, True),
    "hostname-mismatch": (SMQAuthenticationError, True),
    "client-cert-refused": (SMQAuthenticationError, True),
}


def connect_failed(details: str) -> bool:
    """Whether gRPC's text says no connection could be made (rather than a server's answer)."""
    return any(text in details for text in CONNECT_FAILURE_TEXTS)


def diagnose(
    target: str,
    tls_config: ClientTLSConfig | None,
    *,
    server_hostname: str | None = None,
    timeout: float = 2.0,
) -> Diagnosis | None:
    """Why a client of `target` (host:port, [v6]:port or unix:PATH) cannot connect, or
    None if the probe finds nothing wrong (the server answers it: the failure passed)."""
    deadline = time.monotonic() + max(timeout, 0.05)
    if target.startswith("unix:"):
        return _unix(target[len("unix:") :], deadline)
    host, _, port_text = target.rpartition(":")
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return _diagnosis("unresolved", f"cannot resolve the host name {host!r}")
    sock, failure = _connect(addresses, deadline)
    if sock is None:
        return _unreachable(target, failure, timeout)
    with sock:
        if tls_config is None:
            if _speaks_h2(sock, deadline):
                return None
        else:
            return _tls(sock, target, host, tls_config, server_hostname, deadline)
    # A plaintext client, and the server did not answer HTTP/2: does it speak TLS?
    sock, _ = _connect(addresses, deadline)
    if sock is None:
        return None
    with sock:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(sock, server_hostname=host or None):
                pass
        except (OSError, ValueError):
            return None
    return _diagnosis(
        "tls-expected",
        f"the SMQ server at {target} expects TLS: connect with mutual TLS "
        "(a client certificate, its key and the CA)",
    )


def _diagnosis(cause: str, problem: str) -> Diagnosis:
    error_class, lasting = CAUSES[cause]
    return Diagnosis(cause, problem, error_class, lasting)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.01)


def _connect(
    addresses: list[tuple], deadline: float
) -> tuple[socket.socket | None, OSError | None]:
    """A TCP connection to the first address that takes one, else the last failure."""
    failure: OSError | None = None
    for family, kind, proto, _, address in dict.fromkeys(addresses):  # each address once
        sock = socket.socket(family, kind, proto)
        sock.settimeout(_remaining(deadline))
        try:
            sock.connect(address)
            return sock, None
        except OSError as exc:
            sock.close()
            # A refusal says more than another address's timeout or "unreachable".
            if not isinstance(failure, ConnectionRefusedError):
                failure = exc
    return None, failure


def _unreachable(target: str, failure: OSError | None, timeout: float) -> Diagnosis:
    where = f"cannot reach the SMQ server at {target}"
    if isinstance(failure, ConnectionRefusedError):
        return _diagnosis("refused", f"{where}: connection refused (is it running, on this port?)")
    if isinstance(failure, TimeoutError | socket.timeout):
        return _diagnosis("no-answer", f"{where}: no answer within {timeout:g} s (host down?)")
    reason = (failure.strerror if failure is not None else None) or "no address to connect to"
    return _diagnosis("unreachable", f"{where}: {reason.lower()}")


def _speaks_h2(sock: socket.socket, deadline: float) -> bool:
    """Whether the server answers the HTTP/2 preface with SETTINGS (plaintext gRPC)."""
    try:
        sock.settimeout(_remaining(deadline))
        sock.sendall(_H2_PREFACE)
        header = sock.recv(9)
    except OSError:
        return False
    return len(header) >= 4 and header[3] == _H2_SETTINGS


def _tls(
    sock: socket.socket,
    target: str,
    host: str,
    files: ClientTLSConfig,
    server_hostname: str | None,
    deadline: float,
) -> Diagnosis | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cafile=files.ca_file)
        context.load_cert_chain(files.cert_file, files.key_file)
    except (OSError, ssl.SSLError, ValueError):
        return None  # the files are checked, with messages of their own, by smq.tls
    name = server_hostname or host
    sock.settimeout(_remaining(deadline))
    try:
        tls_sock = context.wrap_socket(sock, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        return _untrusted(exc, target, name, files.ca_file, server_hostname)
    except ssl.SSLError as exc:
        if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return _not_tls(target)
        if "ALERT" in (exc.reason or ""):  # TLS 1.2: the server refuses during the handshake
            return _client_refused(target, files, exc.reason)
        return None
    except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError):
        # Closed at the first bytes of TLS: a plaintext HTTP/2 server does that.
        return _not_tls(target)
    except OSError:
        return None
    with tls_sock:
        try:
            tls_sock.settimeout(_remaining(deadline))
            tls_sock.sendall(_H2_PREFACE)
            answer = tls_sock.recv(9)
        except ssl.SSLError as exc:
            return _client_refused(target, files, exc.reason)
        except OSError:
            answer = b""
    if answer:
        return None  # the server accepted the certificate and answers
    # TLS 1.3: the client's handshake ends before the server has checked its certificate;
    # a server that refuses it closes the connection.
    return _client_refused(target, files, None)


def _untrusted(
    exc: ssl.SSLCertVerificationError,
    target: str,
    name: str,
    ca_file: str,
    server_hostname: str | None,
) -> Diagnosis:
    code = exc.verify_code
    if code in _NAME_MISMATCH:
        how = (
            f"server_hostname={server_hostname!r} does not match it either"
            if server_hostname
            else "connect by a name it has, or give that name with server_hostname="
        )
        return _diagnosis(
            "hostname-mismatch",
            f"the certificate of the SMQ server at {target} is not made for {name!r}: {how}",
        )
    if code in (_EXPIRED, _NOT_YET_VALID):
        when = "has expired" if code == _EXPIRED else "is not valid yet"
        return _diagnosis(
            "server-cert-expired", f"the certificate of the SMQ server at {target} {when}"
        )
    return _diagnosis(
        "server-cert-untrusted",
        f"the certificate of the SMQ server at {target} is not signed by the CA "
        f"in {ca_file!r} ({exc.verify_message})",
    )


def _not_tls(target: str) -> Diagnosis:
    return _diagnosis(
        "not-tls",
        f"the SMQ server at {target} does not speak TLS: connect without mutual TLS",
    )


def _client_refused(target: str, files: ClientTLSConfig, alert: str | None) -> Diagnosis:
    refused = f"the SMQ server at {target} refused the client certificate {files.cert_file!r}"
    expiry = _not_after(files.cert_file)
    if expiry is not None and expiry < time.time():
        return _diagnosis(
            "client-cert-refused",
            f"{refused}: it expired on {time.strftime('%Y-%m-%d', time.gmtime(expiry))}",
        )
    said = ""
    if alert:
        said = " (" + alert.lower().replace("_", " ").removeprefix("sslv3 ") + ")"
    return _diagnosis(
        "client-cert-refused",
        f"{refused}{said}: check that it is signed by the CA the server trusts "
        "(its --server-ca-cert)",
    )


def _not_after(cert_file: str) -> float | None:
    """When the certificate expires (seconds since the epoch), if the ssl module says."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's
    try:
        return float(ssl.cert_time_to_seconds(decode(cert_file)["notAfter"]))  # type: ignore[misc]
    except Exception:  # not CPython, or not a certificate it can read: no date then
        return None


def _unix(path: str, deadline: float) -> Diagnosis | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_remaining(deadline))
    where = f"cannot reach the SMQ server at unix:{path}"
    try:
        sock.connect(path)
    except FileNotFoundError:
        return _diagnosis("refused", f"{where}: no such socket (is it running, with that path?)")
    except ConnectionRefusedError:
        return _diagnosis("refused", f"{where}: connection refused (is it running?)")
    except OSError as exc:
        return _diagnosis("unreachable", f"{where}: {(exc.strerror or str(exc)).lower()}")
    finally:
        sock.close()
    return None
