"""Certificate files for mutual TLS: read once, checked, with errors that name the file.

The server (its certificate, key and the CA of its clients), the client and `smq forward`
(a client certificate, key and the CA of the server) read theirs here, at start-up or
when a client is made. `load` raises CertificateError with one line that names the
setting and the file, instead of what gRPC's C core would print later.
"""

from __future__ import annotations

import dataclasses
import ssl

from .errors import CertificateError


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """The PEM contents: a certificate, its private key, and the CA to verify the peer."""

    cert: bytes
    key: bytes
    ca: bytes


def load(
    cert: tuple[str, str], key: tuple[str, str], ca: tuple[str, str], server_side: bool = False
) -> TLSFiles:
    """Read and check (what, path) for each file: readable, the certificate and key a
    matching PEM pair (the key unencrypted), the CA a PEM certificate."""
    contents = {what: _read(what, path) for what, path in (cert, key, ca)}
    _check_certificate(cert, contents[cert[0]])
    _check_certificate(ca, contents[ca[0]])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert[1], key[1], password=lambda: "")
    except (ssl.SSLError, ValueError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                f"{key[0]} {key[1]!r} is not the key of {cert[0]} {cert[1]!r} "
                "(their public keys differ): give the key made with that certificate"
            ) from None
        raise CertificateError(
            f"{key[0]} {key[1]!r} is not a PEM private key, or it is encrypted "
            f"(it must be an unencrypted key for {cert[0]} {cert[1]!r})"
        ) from None
    return TLSFiles(contents[cert[0]], contents[key[0]], contents[ca[0]])


def _check_certificate(file: tuple[str, str], content: bytes) -> None:
    """Raise CertificateError unless `content` holds a PEM certificate."""
    try:
        text = content.decode("ascii")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        raise CertificateError(f"{file[0]} {file[1]!r} is not a PEM certificate") from None


def _read(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise CertificateError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None
