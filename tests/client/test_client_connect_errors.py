"""When no connection can be made: each cause, found by a real client against a real
server with real certificates (support.certs), raises its class with one line that says
what to change. gRPC's own text stays in `.details`."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
from support.certs import CertSet
from support.servers import ServerProcess, free_port
from support.tls_servers import certs, plain_server, tls_server  # noqa: F401 (fixtures)

import smq
from smq import errors
from smq.client import Client, ClientTLSConfig

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


def tls(certs: CertSet, client: str = "client", ca: str = "ca_cert", key: str | None = None
        ) -> ClientTLSConfig:
    return ClientTLSConfig(cert_file=str(getattr(certs, f"{client}_cert")),
                           key_file=str(getattr(certs, f"{key or client}_key")),
                           ca_file=str(getattr(certs, ca)))


def failure(host: str, port: int, config: ClientTLSConfig | None, **options) -> smq.SMQError:
    """The error of server_info() (retries as by default: a lasting cause is not retried)."""
    with Client(host, port, config, timeout=5, **options) as client, \
            pytest.raises(smq.SMQError) as caught:
        client.server_info()
    error = caught.value
    assert "\n" not in str(error) and "failed to connect" not in str(error), str(error)
    assert error.details, "gRPC's text is kept in .details"
    return error


def test_the_certificates_work(tls_server: ServerProcess, certs: CertSet) -> None:
    with Client("localhost", tls_server.port, tls(certs)) as client:
        client.connect()


def test_client_certificate_of_another_ca(tls_server: ServerProcess, certs: CertSet) -> None:
    started = time.monotonic()
    error = failure("localhost", tls_server.port, tls(certs, "other_client"))
    assert time.monotonic() - started < 2, "a refused certificate is not retried"
    assert type(error) is smq.SMQAuthenticationError and error.cause == "client-cert-refused"
    assert str(error) == (
        f"could not get the server's info: the SMQ server at localhost:{tls_server.port} refused "
        f"the client certificate {str(certs.other_client_cert)!r}: check that it is signed by the "
        "CA the server trusts (its --server-ca-cert)")


def test_expired_client_certificate(tls_server: ServerProcess, certs: CertSet) -> None:
    error = failure("localhost", tls_server.port, tls(certs, "expired_client"))
    assert isinstance(error, smq.SMQAuthenticationError) and error.cause == "client-cert-refused"
    assert str(error).endswith(f"refused the client certificate "
                               f"{str(certs.expired_client_cert)!r}: it expired on "
                               f"{time.strftime('%Y-%m-%d', time.gmtime(time.time() - 86400))}")


def test_no_client_certificate(tls_server: ServerProcess) -> None:
    error = failure("localhost", tls_server.port, None)
    assert isinstance(error, smq.SMQAuthenticationError) and error.cause == "tls-expected"
    assert str(error) == (f"could not get the server's info: the SMQ server at localhost:"
                          f"{tls_server.port} expects TLS: connect with mutual TLS (a client "
                          "certificate, its key and the CA)")


def test_server_certificate_of_another_ca(tls_server: ServerProcess, certs: CertSet) -> None:
    error = failure("localhost", tls_server.port, tls(certs, ca="other_ca_cert"))
    assert isinstance(error, smq.SMQAuthenticationError) and error.cause == "server-cert-untrusted"
    assert str(error) == (f"could not get the server's info: the certificate of the SMQ server at "
                          f"localhost:{tls_server.port} is not signed by the CA in "
                          f"{str(certs.other_ca_cert)!r} (unable to get local issuer certificate)")


def test_server_certificate_for_another_name(tls_server: ServerProcess, certs: CertSet) -> None:
    error = failure("127.0.0.1", tls_server.port, tls(certs), server_hostname="elsewhere")
    assert isinstance(error, smq.SMQAuthenticationError) and error.cause == "hostname-mismatch"
    assert str(error).endswith("is not made for 'elsewhere': server_hostname='elsewhere' does "
                               "not match it either")
    # Without server_hostname=: tests/client/test_client_tls.py.


def test_tls_client_and_plaintext_server(plain_server: ServerProcess, certs: CertSet) -> None:
    error = failure("localhost", plain_server.port, tls(certs))
    assert isinstance(error, smq.SMQAuthenticationError) and error.cause == "not-tls"
    assert str(error) == (f"could not get the server's info: the SMQ server at localhost:"
                          f"{plain_server.port} does not speak TLS: connect without mutual TLS")


def test_key_of_another_certificate(certs: CertSet) -> None:
    with pytest.raises(smq.SMQAuthenticationError) as caught:
        Client("localhost", 1, tls(certs, key="other_client"))
    assert str(caught.value) == (
        f"client key (key_file) {str(certs.other_client_key)!r} is not the key of client "
        f"certificate (cert_file) {str(certs.client_cert)!r} (their public keys differ): give "
        "the key made with that certificate")


@pytest.mark.parametrize("field", ["cert_file", "key_file", "ca_file"])
def test_files_that_are_not_pem(certs: CertSet, tmp_path: Path, field: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    files = {**vars(tls(certs)), field: str(garbage)}
    with pytest.raises(errors.CertificateError) as caught:
        Client("localhost", 1, ClientTLSConfig(**files))
    message = str(caught.value)
    assert "\n" not in message and f"({field}) {str(garbage)!r} is not a PEM" in message


def test_server_down() -> None:
    port = free_port()
    started = time.monotonic()
    error = failure("localhost", port, None, retries=3)  # waits of at least 0.05+0.1+0.2 s
    assert isinstance(error, smq.Unavailable) and error.cause == "refused"
    assert str(error) == (f"could not get the server's info: cannot reach the SMQ server at "
                          f"localhost:{port}: connection refused (is it running, on this port?)")
    assert time.monotonic() - started > 0.2, "still retried while it may be restarting"


def test_host_that_does_not_resolve() -> None:
    error = failure("no-such-host.invalid", 8097, None, retries=0)
    assert isinstance(error, smq.Unavailable) and error.cause == "unresolved"
    assert str(error).endswith("cannot resolve the host name 'no-such-host.invalid'")


def test_server_that_takes_the_connection_and_never_answers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
        port = listener.getsockname()[1]
        with Client("127.0.0.1", port, timeout=1) as client, \
                pytest.raises(smq.SMQError) as caught:
            client.connect(unreachable_for=0.2)  # a taken connection gets the whole timeout
        for sock in accepted:
            sock.close()
    assert isinstance(caught.value, smq.DeadlineExceeded | smq.Unavailable), caught.value
    assert "\n" not in str(caught.value)


def async_failure(host: str, port: int, config: ClientTLSConfig | None) -> smq.SMQError:
    """The error of AsyncClient.server_info(), which must say what the sync client says."""
    async def main() -> smq.SMQError:
        async with smq.AsyncClient(host, port, config, timeout=5, retries=0) as client:
            with pytest.raises(smq.SMQError) as caught:
                await client.server_info()
            return caught.value
    return asyncio.run(main())


def test_the_async_client_says_the_same(tls_server: ServerProcess, certs: CertSet) -> None:
    refused = async_failure("localhost", tls_server.port, tls(certs, "other_client"))
    assert type(refused) is smq.SMQAuthenticationError and refused.cause == "client-cert-refused"
    assert str(refused) == str(failure("localhost", tls_server.port, tls(certs, "other_client")))
    port = free_port()
    down = async_failure("localhost", port, None)
    assert isinstance(down, smq.Unavailable) and down.cause == "refused"
    assert str(down) == str(failure("localhost", port, None, retries=0))
