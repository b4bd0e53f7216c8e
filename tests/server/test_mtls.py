"""Server mTLS with certificates made in the test: the CA's clients are served, anyone
else is refused; bad certificate files stop the server at start-up (one line, exit 2),
never falling back to plaintext."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from support.certs import CertSet, make_certs
from support.servers import ServerProcess, clean_env
from smq._proto import smq_pb2, smq_pb2_grpc

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

RPC_TIMEOUT = 15


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_server(certs: CertSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One mTLS server (configured by flags) shared by the tests that only call it."""
    workdir = tmp_path_factory.mktemp("mtls-server")
    server = ServerProcess(["--dbpath", str(workdir / "smq.db"), "--port", "0",
                            "--bind", "127.0.0.1", *certs.server_flags()], workdir)
    try:
        yield server.wait_serving()
    finally:
        server.close()


def tls_stub(port: int, certs: CertSet, key: str | None = "client_key",
             cert: str | None = "client_cert") -> smq_pb2_grpc.SuhaibMessageQueueStub:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.read("ca_cert"),
        private_key=certs.read(key) if key else None,
        certificate_chain=certs.read(cert) if cert else None)
    return smq_pb2_grpc.SuhaibMessageQueueStub(
        grpc.secure_channel(f"localhost:{port}", credentials))


def refused_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_client_certificate_from_the_ca_is_served(mtls_server: ServerProcess, certs: CertSet):
    stub = tls_stub(mtls_server.port, certs)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="secure"), timeout=RPC_TIMEOUT)
    offset = stub.Produce(smq_pb2.ProduceRequest(topic="secure", message=b"hello"),
                          timeout=RPC_TIMEOUT).offset
    reply = stub.Consume(smq_pb2.ConsumeRequest(topic="secure", offset=offset), timeout=RPC_TIMEOUT)
    assert (reply.message, reply.offset) == (b"hello", offset)
    assert "mTLS" in mtls_server.log()


@pytest.mark.parametrize("who", ["no client certificate", "other CA's client", "expired client",
                                 "plaintext"])
def test_other_clients_are_refused_and_change_nothing(who: str, mtls_server: ServerProcess,
                                                      certs: CertSet):
    if who == "no client certificate":
        stub = tls_stub(mtls_server.port, certs, key=None, cert=None)
    elif who == "other CA's client":
        stub = tls_stub(mtls_server.port, certs, key="other_client_key", cert="other_client_cert")
    elif who == "expired client":
        stub = tls_stub(mtls_server.port, certs, key="expired_client_key", cert="expired_client_cert")
    else:
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(
            grpc.insecure_channel(f"127.0.0.1:{mtls_server.port}"))
    topic = "intruder-" + who.split()[0]
    code = refused_code(lambda: stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic),
                                                 timeout=RPC_TIMEOUT))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert refused_code(lambda: stub.Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)) \
        == grpc.StatusCode.UNAVAILABLE
    good = tls_stub(mtls_server.port, certs)
    assert refused_code(lambda: good.GetLatestOffset(
        smq_pb2.GetLatestOffsetRequest(topic=topic), timeout=RPC_TIMEOUT)) == grpc.StatusCode.NOT_FOUND


def test_mtls_from_environment_variables(certs: CertSet, start_server):
    server = start_server(env=clean_env(
        SERVER_ENABLE_MTLS="true", SERVER_CERT_FILE=str(certs.server_cert),
        SERVER_KEY_FILE=str(certs.server_key), SERVER_CA_CERT_FILE=str(certs.ca_cert)))
    tls_stub(server.port, certs).Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)
    plain = server.stub()
    assert refused_code(lambda: plain.Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)) \
        == grpc.StatusCode.UNAVAILABLE
    no_cert = tls_stub(server.port, certs, key=None, cert=None)
    assert refused_code(lambda: no_cert.Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)) \
        == grpc.StatusCode.UNAVAILABLE


# -- refusing to start --------------------------------------------------------------------------

def bad_files(certs: CertSet, tmp_path: Path, case: str) -> tuple[dict[str, Path], str]:
    """The three server files with one made bad; returns them and the flag to be named."""
    files = {"--server-cert": certs.server_cert, "--server-key": certs.server_key,
             "--server-ca-cert": certs.ca_cert}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    if case == "missing key file":
        files["--server-key"] = tmp_path / "missing.key"
        return files, "--server-key"
    if case == "missing CA file":
        files["--server-ca-cert"] = tmp_path / "missing-ca.crt"
        return files, "--server-ca-cert"
    if case == "unreadable cert (a directory)":
        (tmp_path / "cert-dir").mkdir()
        files["--server-cert"] = tmp_path / "cert-dir"
        return files, "--server-cert"
    if case == "garbage cert":
        files["--server-cert"] = garbage
        return files, "--server-cert"
    if case == "empty cert":
        (tmp_path / "empty.crt").write_text("")
        files["--server-cert"] = tmp_path / "empty.crt"
        return files, "--server-cert"
    if case == "key not matching the cert":
        files["--server-key"] = certs.client_key
        return files, "--server-key"
    if case == "garbage key":
        files["--server-key"] = garbage
        return files, "--server-key"
    if case == "garbage CA":
        files["--server-ca-cert"] = garbage
        return files, "--server-ca-cert"
    if case == "CA file holding only a key":
        files["--server-ca-cert"] = certs.client_key
        return files, "--server-ca-cert"
    raise AssertionError(case)


BAD_CASES = ["missing key file", "missing CA file", "unreadable cert (a directory)", "garbage cert",
             "empty cert", "key not matching the cert", "garbage key", "garbage CA",
             "CA file holding only a key"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_certificate_files_refuse_to_start(case: str, certs: CertSet, tmp_path: Path):
    files, named = bad_files(certs, tmp_path, case)
    db = tmp_path / "smq.db"
    args = ["--dbpath", str(db), "--port", "0", "--bind", "127.0.0.1", "--server-enable-mtls"]
    for flag, path in files.items():
        args += [flag, str(path)]
    result = subprocess.run([sys.executable, "-m", "smq", *args], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    out = result.stdout
    assert result.returncode == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("smq: error: ") and named in lines[0], out
    assert str(files[named]) in lines[0], out
    assert "Traceback" not in out and "serving on" not in out and "plaintext" not in out
    assert not db.exists(), "the database was created before the certificates were checked"


def test_bad_certificate_from_environment_refuses_to_start(certs: CertSet, tmp_path: Path):
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello")
    env = clean_env(SERVER_ENABLE_MTLS="1", SERVER_CERT_FILE=str(certs.server_cert),
                    SERVER_KEY_FILE=str(certs.server_key), SERVER_CA_CERT_FILE=str(garbage),
                    DB_PATH=str(tmp_path / "smq.db"), PORT="0", SMQ_BIND="127.0.0.1")
    result = subprocess.run([sys.executable, "-m", "smq"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 2, result.stdout
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert str(garbage) in result.stdout
    assert not (tmp_path / "smq.db").exists()


# -- certificate files without --server-enable-mtls ----------------------------------------------

def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("WARNING")]


def test_certificate_files_without_mtls_are_named_in_one_warning(certs: CertSet, start_server):
    server = start_server("--server-cert", str(certs.server_cert),
                          env=clean_env(SERVER_KEY_FILE=str(certs.server_key)))
    server.stub().Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)  # plaintext, as asked
    (warning,) = warnings_in(server.log())
    assert "--server-cert (SERVER_CERT_FILE)" in warning
    assert "--server-key (SERVER_KEY_FILE)" in warning
    assert "--server-ca-cert" not in warning  # not given: not named
    assert "--server-enable-mtls" in warning and "plaintext" in warning


def test_no_warning_without_certificate_files(start_server):
    server = start_server()
    assert warnings_in(server.log()) == []
