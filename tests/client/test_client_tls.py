"""Mutual TLS: the openssl recipe of docs/operations.md, a server that requires client
certificates, the client and the command line presenting theirs."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import smq
from support.servers import ENV_NAMES, ServerProcess
from smq import cli
from smq.client import Client, ClientTLSConfig

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The command line reads the environment and ./.env: neither may leak in."""
    for name in list(os.environ):
        if name in ENV_NAMES or name.startswith("SMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def make_cert(directory: Path, name: str, ca: str, san: str) -> None:
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
            "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory, "ca")
    make_cert(directory, "server", "ca", "DNS:localhost")  # no IP: connecting by IP needs a name
    make_cert(directory, "client", "ca", "DNS:client")
    make_ca(directory, "other-ca")
    make_cert(directory, "stranger", "other-ca", "DNS:stranger")
    return directory


@pytest.fixture(scope="module")
def server(certs: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tls")
    proc = ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          "--server-enable-mtls=true", "--server-cert", str(certs / "server.crt"),
                          "--server-key", str(certs / "server.key"),
                          "--server-ca-cert", str(certs / "ca.crt")], tmp).wait_serving()
    yield proc
    proc.close()


def tls(certs: Path, name: str = "client") -> ClientTLSConfig:
    return ClientTLSConfig(cert_file=str(certs / f"{name}.crt"), key_file=str(certs / f"{name}.key"),
                           ca_file=str(certs / "ca.crt"))


def test_client_with_certificate(server: ServerProcess, certs: Path) -> None:
    with Client("localhost", server.port, tls_config=tls(certs)) as client:
        assert "mTLS" in repr(client)
        client.create_topic("secure")
        assert client.produce("secure", b"secret") == 1
        assert client.consume_latest("secure") == (b"secret", 1)


def test_server_hostname_when_connecting_by_address(server: ServerProcess, certs: Path) -> None:
    with Client("127.0.0.1", server.port, tls_config=tls(certs), retries=0, timeout=5) as client:
        with pytest.raises(smq.SMQAuthenticationError) as caught:
            client.connect()
    assert str(caught.value).endswith(
        f"the certificate of the SMQ server at 127.0.0.1:{server.port} is not made for "
        "'127.0.0.1': connect by a name it has, or give that name with server_hostname=")
    with Client("127.0.0.1", server.port, tls_config=tls(certs), server_hostname="localhost") as client:
        client.connect()


@pytest.mark.parametrize("how", ["plaintext", "unknown CA"])
def test_refused_without_a_trusted_certificate(server: ServerProcess, certs: Path, how: str) -> None:
    config = None if how == "plaintext" else tls(certs, "stranger")
    with Client("localhost", server.port, tls_config=config, retries=0, timeout=5) as client:
        with pytest.raises(smq.SMQConnectionError):
            client.produce("secure", b"x")


def test_command_line_mtls_flags(server: ServerProcess, certs: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(certs)
    flags = ["--host", "localhost", "--port", str(server.port), "--enable-mtls",
             "--client-cert", "client.crt", "--client-key", "client.key", "--ca-cert", "ca.crt"]
    assert cli.main(["topic", "create", "cli-secure", *flags]) == 0
    assert cli.main(["produce", "cli-secure", "hello", *flags]) == 0
    assert cli.main(["consume", "cli-secure", *flags]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1\thello"
    # The same from the environment, as the original SMQ's users set it.
    for name, value in (("ENABLE_MTLS", "true"), ("CLIENT_CERT", "client.crt"),
                        ("CLIENT_KEY", "client.key"), ("CA_CERT", "ca.crt"), ("SMQ_HOST", "localhost"),
                        ("PORT", str(server.port))):
        monkeypatch.setenv(name, value)
    assert cli.main(["offsets", "cli-secure", "--json"]) == 0
    assert '"latest": 1' in capsys.readouterr().out


def test_command_line_mtls_needs_the_files(server: ServerProcess, certs: Path, capsys) -> None:
    assert cli.main(["ping", "--port", str(server.port), "--enable-mtls"]) == 2
    assert "--enable-mtls needs --client-cert, --client-key, --ca-cert" in capsys.readouterr().err
    assert cli.main(["ping", "--port", str(server.port), "--enable-mtls", "--client-cert", "nope.crt",
                     "--client-key", "k", "--ca-cert", "c"]) == 2
    assert "--client-cert (CLIENT_CERT) 'nope.crt' cannot be read" in capsys.readouterr().err
