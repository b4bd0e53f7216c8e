"""Test certificates, made in the test: two unrelated CAs, a server certificate for
localhost/127.0.0.1, a client certificate from each CA and an expired one from the
first (PEM files in a directory; the keys mode 0600); `client_for(certs, cn)` issues more
clients from the first CA, one per identity (subject CN) for the access-control tests.

The layout follows the original SMQ's mTLS recipe (docs/operations.md, "mTLS"), with the
subjectAltName grpc requires.
"""
from __future__ import annotations

import dataclasses
import hashlib
import datetime
import ipaddress
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class CertSet:
    """Paths of every PEM file; `read(name)` gives its bytes."""
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path
    expired_client_cert: Path
    expired_client_key: Path

    def read(self, field: str) -> bytes:
        return getattr(self, field).read_bytes()

    def server_flags(self) -> list[str]:
        """The server's mTLS flags with these files."""
        return ["--server-enable-mtls", "--server-cert", str(self.server_cert),
                "--server-key", str(self.server_key), "--server-ca-cert", str(self.ca_cert)]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key, expired: bool = False
             ) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end))


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _make_leaf(common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
               usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None = None,
               expired: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    builder = (_builder(common_name, ca_cert.subject, key.public_key(), expired)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """Mode 0600, as a key should be (a key others can read makes SMQ warn at start)."""
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_certs(directory: Path) -> CertSet:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca("SMQ test CA")
    other_ca = _make_ca("Unrelated CA")
    server = _make_leaf("localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH,
                        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _make_leaf("smq-client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_client = _make_leaf("smq-client", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    expired_client = _make_leaf("smq-client", ca, ExtendedKeyUsageOID.CLIENT_AUTH, expired=True)
    return CertSet(
        dir=directory,
        ca_cert=_write_cert(directory / "ca.crt", ca[0]),
        ca_key=_write_key(directory / "ca.key", ca[1]),
        server_cert=_write_cert(directory / "server.crt", server[0]),
        server_key=_write_key(directory / "server.key", server[1]),
        client_cert=_write_cert(directory / "client.crt", client[0]),
        client_key=_write_key(directory / "client.key", client[1]),
        other_ca_cert=_write_cert(directory / "other-ca.crt", other_ca[0]),
        other_client_cert=_write_cert(directory / "other-client.crt", other_client[0]),
        other_client_key=_write_key(directory / "other-client.key", other_client[1]),
        expired_client_cert=_write_cert(directory / "expired-client.crt", expired_client[0]),
        expired_client_key=_write_key(directory / "expired-client.key", expired_client[1]),
    )


def client_for(certs: CertSet, common_name: str | None, *cns: str) -> tuple[Path, Path]:
    """A client certificate of `certs`' CA with this subject CN (None: a subject without
    one; more `cns`: a subject with several CNs, in this order; a NUL may be in any), and
    its key: (cert path, key path), made once per name."""
    stem = "client-" + "-".join((n or "no-cn").encode().hex() for n in (common_name, *cns))
    if len(stem) > 120:  # a file name has at most 255 bytes
        stem = "client-" + hashlib.sha256(stem.encode()).hexdigest()
    cert_path, key_path = certs.dir / f"{stem}.crt", certs.dir / f"{stem}.key"
    if not cert_path.exists():
        ca_cert = x509.load_pem_x509_certificate(certs.read("ca_cert"))
        ca_key = serialization.load_pem_private_key(certs.read("ca_key"), password=None)
        key = _key()
        with warnings.catch_warnings():  # a CN over 64 characters, on purpose
            warnings.simplefilter("ignore", UserWarning)
            subject = x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, n, _validate=False)
                 for n in (common_name, *cns) if n]
                or [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SMQ tests")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
    return cert_path, key_path
