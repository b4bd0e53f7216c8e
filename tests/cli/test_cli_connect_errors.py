"""`python -m smq COMMAND` when the server cannot be reached, or the certificates do not
fit: exit code 1, the error in one line that names the command's action, one line of
what to change on the command line, and none of gRPC's C-core log lines."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.certs import CertSet
from support.servers import (
    C_CORE_LINE,
    ServerProcess,
    clean_env,
    free_port,
)
from support.tls_servers import certs, plain_server, tls_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.process  # starts servers and commands (tests/conftest.py)


def smq(*args: str, cwd: Path) -> tuple[int, list[str], float]:
    """Run `python -m smq` from this checkout: (exit code, stderr lines, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "smq", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=60, env=clean_env())
    seconds = time.monotonic() - started
    assert not C_CORE_LINE.search(result.stderr), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.splitlines(), seconds


def mtls(certs: CertSet, cert: str = "client", ca: str = "ca_cert", key: str | None = None
         ) -> list[str]:
    return ["--enable-mtls", "--client-cert", str(getattr(certs, f"{cert}_cert")),
            "--client-key", str(getattr(certs, f"{key or cert}_key")),
            "--ca-cert", str(getattr(certs, ca))]


def at(server: ServerProcess, host: str = "localhost") -> list[str]:
    return ["--host", host, "--port", str(server.port)]


def test_the_certificates_work(tls_server: ServerProcess, certs: CertSet, tmp_path: Path) -> None:
    assert smq("ping", *at(tls_server), *mtls(certs), cwd=tmp_path)[:2] == (0, [])


def test_client_certificate_of_another_ca(tls_server: ServerProcess, certs: CertSet,
                                          tmp_path: Path) -> None:
    code, lines, _ = smq("consume", "t", *at(tls_server), *mtls(certs, "other_client"),
                         cwd=tmp_path)
    assert code == 1 and lines == [
        "smq: error: could not read messages of 't': the SMQ server at "
        f"localhost:{tls_server.port} refused the client certificate "
        f"{str(certs.other_client_cert)!r}: check that it is signed by the CA the server "
        "trusts (its --server-ca-cert)",
        "(give a certificate signed by the CA the server trusts: --client-cert and --client-key, "
        "or CLIENT_CERT and CLIENT_KEY)"]


def test_expired_client_certificate(tls_server: ServerProcess, certs: CertSet,
                                    tmp_path: Path) -> None:
    code, lines, _ = smq("info", *at(tls_server), *mtls(certs, "expired_client"), cwd=tmp_path)
    assert code == 1 and len(lines) == 2 and "it expired on " in lines[0]


def test_no_client_certificate(tls_server: ServerProcess, tmp_path: Path) -> None:
    code, lines, _ = smq("topic", "list", *at(tls_server), cwd=tmp_path)
    assert code == 1 and lines == [
        f"smq: error: could not list topics: the SMQ server at localhost:{tls_server.port} expects "
        "TLS: connect with mutual TLS (a client certificate, its key and the CA)",
        "(this server uses mutual TLS: --enable-mtls --client-cert FILE --client-key FILE "
        "--ca-cert FILE, or ENABLE_MTLS, CLIENT_CERT, CLIENT_KEY, CA_CERT)"]


def test_server_certificate_of_another_ca(tls_server: ServerProcess, certs: CertSet,
                                          tmp_path: Path) -> None:
    code, lines, _ = smq("ping", *at(tls_server), *mtls(certs, ca="other_ca_cert"), cwd=tmp_path)
    assert code == 1 and lines == [
        f"smq: error: could not ping the server: the certificate of the SMQ server at "
        f"localhost:{tls_server.port} is not signed by the CA in {str(certs.other_ca_cert)!r} "
        "(unable to get local issuer certificate)",
        "(give the CA that signed the server's certificate: --ca-cert, or CA_CERT)"]


def test_server_certificate_for_another_name(tls_server: ServerProcess, certs: CertSet,
                                             tmp_path: Path) -> None:
    code, lines, _ = smq("ping", *at(tls_server, "127.0.0.1"), *mtls(certs),
                         "--server-hostname", "elsewhere", cwd=tmp_path)
    assert code == 1 and len(lines) == 2 and "is not made for 'elsewhere'" in lines[0]
    assert lines[1] == ("(connect with --host set to a name in the server's certificate, or give "
                        "one with --server-hostname NAME)")
    ok = smq("ping", *at(tls_server, "127.0.0.1"), *mtls(certs), "--server-hostname", "localhost",
             cwd=tmp_path)
    assert ok[:2] == (0, [])


def test_key_of_another_certificate(tls_server: ServerProcess, certs: CertSet,
                                    tmp_path: Path) -> None:
    code, lines, _ = smq("ping", *at(tls_server), *mtls(certs, key="other_client"), cwd=tmp_path)
    assert code == 2 and lines == [
        f"smq ping: error: --client-key (CLIENT_KEY) {str(certs.other_client_key)!r} is not the "
        f"key of --client-cert (CLIENT_CERT) {str(certs.client_cert)!r} (their public keys "
        "differ): give the key made with that certificate"]


def test_tls_client_and_plaintext_server(plain_server: ServerProcess, certs: CertSet,
                                         tmp_path: Path) -> None:
    code, lines, _ = smq("offsets", "t", *at(plain_server), *mtls(certs), cwd=tmp_path)
    assert code == 1 and lines == [
        f"smq: error: could not get the offsets of 't': the SMQ server at "
        f"localhost:{plain_server.port} does not speak TLS: connect without mutual TLS",
        "(this server is plaintext: leave out --enable-mtls, or set ENABLE_MTLS=false)"]


@pytest.mark.parametrize("command", [["info"], ["consume", "t"], ["produce", "t", "x"]])
def test_server_down(command: list[str], tmp_path: Path) -> None:
    port = free_port()
    code, lines, seconds = smq(*command, "--port", str(port), cwd=tmp_path)
    doing = {"info": "get the server's info", "consume": "read messages of 't'",
             "produce": "produce to 't'"}[command[0]]
    assert code == 1 and lines == [
        f"smq: error: could not {doing}: cannot reach the SMQ server at localhost:{port}: "
        "connection refused (is it running, on this port?)",
        "(connect elsewhere with --host/--port or --unix-socket, or set SMQ_HOST, PORT, "
        "SMQ_UNIX_SOCKET)"]
    assert seconds < 3, f"took {seconds:.2f} s"


def test_server_down_verbose_adds_grpc_text(tmp_path: Path) -> None:
    code, lines, _ = smq("ping", "--port", str(free_port()), "-v", cwd=tmp_path)
    assert code == 1 and len(lines) == 3 and lines[2].startswith("(gRPC: failed to connect")


def test_grpc_logs_when_asked(tls_server: ServerProcess, certs: CertSet, tmp_path: Path) -> None:
    """A user who sets GRPC_VERBOSITY gets gRPC's logs."""
    result = subprocess.run([sys.executable, "-m", "smq", "ping", *at(tls_server),
                             *mtls(certs, ca="other_ca_cert")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60,
                            env=clean_env(GRPC_VERBOSITY="DEBUG"))
    assert result.returncode == 1 and C_CORE_LINE.search(result.stderr)
