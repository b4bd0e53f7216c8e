"""Go clients of the original SMQ against this server: interop/go/main.go is built with
grpc-go and the stubs protoc-gen-go makes from proto/smq.proto (under the original's
import path), then drives a real server the way the original Go client does: its dial
options and timeouts, StreamProduce that never reads the reply, StreamConsume that
leaves the call open when its callback stops, heartbeats skipped, plaintext and mTLS.

Needs Debian's Go toolchain and grpc-go (CI installs them; the module skips with this
hint when they are missing, or fails when SMQ_REQUIRE_GO=1)."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.certs import CertSet, make_certs
from support import ROOT
from support.servers import ServerProcess, module_server
from smq.client import Client

DEBIAN_GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put sources
ORIGINAL_IMPORT_PATH = "github.com/Suhaibinator/SuhaibMessageQueue/proto"  # proto's go_package
GO_TIMEOUT = 120


def missing_go_tools() -> list[str]:
    missing = [tool for tool in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
               if shutil.which(tool) is None]
    # grpc-go 1.33 encodes through github.com/golang/protobuf; before 1.4 (no registry.go)
    # it cannot handle the messages protoc-gen-go makes today.
    for source in ("google.golang.org/grpc/server.go", "github.com/golang/protobuf/proto/registry.go"):
        if not (DEBIAN_GOPATH / "src" / source).is_file():
            missing.append(source)
    return missing


@pytest.fixture(scope="module")
def go_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built interop program."""
    missing = missing_go_tools()
    if missing:
        message = f"missing {', '.join(missing)} (install the Go packages .ci/run lists)"
        if os.environ.get("SMQ_REQUIRE_GO") == "1":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("go")
    stubs = work / "src" / ORIGINAL_IMPORT_PATH
    program = work / "src" / "smqgocheck"
    stubs.mkdir(parents=True)
    program.mkdir(parents=True)
    subprocess.run(["protoc", "-I", str(ROOT / "proto"), f"--go_out=paths=source_relative:{stubs}",
                    f"--go-grpc_out=paths=source_relative:{stubs}", str(ROOT / "proto" / "smq.proto")],
                   check=True, timeout=GO_TIMEOUT)
    shutil.copy(ROOT / "interop" / "go" / "main.go", program)
    # GOPATH mode against Debian's packaged sources: no module download, works offline.
    env = {"PATH": os.environ["PATH"], "GO111MODULE": "off", "GOFLAGS": "",
           "GOPATH": f"{work}:{DEBIAN_GOPATH}", "GOCACHE": str(work / "cache"), "HOME": str(work)}
    built = subprocess.run(["go", "build", "-o", str(work / "smq-go-check"), "."], cwd=program,
                           env=env, capture_output=True, text=True, timeout=GO_TIMEOUT)
    assert built.returncode == 0, built.stderr
    return work / "smq-go-check"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "go")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: CertSet) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "go-mtls", *certs.server_flags())
    yield proc
    proc.close()


def run_go(go_check: Path, server: ServerProcess, scenario: str, topic: str,
           *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(go_check), "-addr", f"127.0.0.1:{server.port}", "-topic", topic,
                           *flags, scenario], capture_output=True, text=True, timeout=GO_TIMEOUT)


def passed(result: subprocess.CompletedProcess) -> list[str]:
    """The checks it printed as passed; any failure fails the test with its output."""
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    return [line[3:] for line in result.stdout.splitlines() if line.startswith("ok ")]


@pytest.mark.parametrize("scenario", ["basic", "streams", "errors", "batch"])
def test_go_client_scenarios(go_check: Path, server: ServerProcess, scenario: str) -> None:
    checks = passed(run_go(go_check, server, scenario, f"go-{scenario}"))
    assert checks[0] == "connect" and len(checks) >= 2, checks


def test_what_go_wrote_python_reads_byte_for_byte(go_check: Path, server: ServerProcess) -> None:
    passed(run_go(go_check, server, "basic", "go-to-python"))
    with Client("127.0.0.1", server.port) as client:
        assert client.consume("go-to-python", 77) == (b'{"go":77}', 77)
        assert client.get_earliest_offset("go-to-python") == 51  # Go trimmed until 50


def test_a_go_program_leaving_streams_open_keeps_working(go_check: Path, server: ServerProcess) -> None:
    # 100 abandoned StreamConsume calls on one connection: past the server's 64 streams and
    # gRPC's per-connection limit, so each new one must replace the oldest.
    checks = passed(run_go(go_check, server, "abandoned", "go-abandoned", "-times", "100"))
    assert checks[-1].startswith("100 streams left open")
    assert "ended the oldest stream of ipv4:127.0.0.1:" in server.log()
    with Client("127.0.0.1", server.port) as client:  # and other clients were never locked out
        assert next(client.subscribe("go-abandoned", 1, reconnect=False))[1] == 1


def test_go_client_over_mtls(go_check: Path, mtls_server: ServerProcess, certs: CertSet) -> None:
    tls = ["-ca", str(certs.ca_cert), "-cert", str(certs.client_cert), "-key", str(certs.client_key),
           "-server-name", "localhost"]
    assert len(passed(run_go(go_check, mtls_server, "basic", "go-mtls", *tls))) >= 5


def test_go_client_without_a_certificate_is_refused(go_check: Path, mtls_server: ServerProcess,
                                                    certs: CertSet) -> None:
    result = run_go(go_check, mtls_server, "basic", "go-refused", "-ca", str(certs.ca_cert),
                    "-connect-timeout", "3s")
    assert result.returncode == 1 and result.stdout.startswith("FAIL connect:"), result.stdout
