"""Real server processes on loopback ephemeral ports, and in-process `smq` commands.

ServerProcess runs `python -m smq` (or $SMQ_TEST_SERVER) with its log in a file and
learns its port from the log; module_server starts one for a whole module; clean_env
keeps the developer's SMQ variables out; Run calls cli.main in this process. The
fixtures built on these (start_server, smq_server, stub, smq, client, topic) are in
tests/conftest.py.
"""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import apsw
import grpc
import pytest

from smq import cli
from smq._proto import smq_pb2, smq_pb2_grpc
from support.poll import eventually

# The server under test: `python -m smq` from this checkout, or a built artifact
# (SMQ_TEST_SERVER=dist/smq-...-linux-x86_64.pex runs the same tests against the PEX).
SERVER_COMMAND = os.environ.get("SMQ_TEST_SERVER", "").split() or [sys.executable, "-m", "smq"]
LISTENING = re.compile(r"serving on \S+:(\d+)")
ENV_NAMES = ("DB_PATH", "PORT", "SERVER_ENABLE_MTLS", "SERVER_CERT_FILE", "SERVER_KEY_FILE",
             "SERVER_CA_CERT_FILE", "ALLOW_REMOTE_WRITES", "ENABLE_MTLS", "CLIENT_CERT",
             "CLIENT_KEY", "CA_CERT", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def mdwe_supported() -> bool:
    """Whether this kernel enforces PR_SET_MDWE, the rule behind systemd's
    MemoryDenyWriteExecute (Linux 6.3+; checked in a child process)."""
    probe = ("import ctypes, mmap\n"
             "assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0\n"
             "try:\n"
             "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except OSError:\n"
             "    raise SystemExit(0)\n"
             "raise SystemExit(1)\n")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_NAMES and not (k.startswith("SMQ_") and k != "SMQ_TEST_SERVER")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ServerProcess:
    """A `python -m smq` child process. `port` is known once it logs that it serves."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.args = args
        self.log_path = cwd / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            [*(command or SERVER_COMMAND), *args], cwd=cwd, env=env or clean_env(),
            stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.port: int | None = None

    def wait_serving(self, timeout: float = 15.0) -> "ServerProcess":
        def serving() -> bool:
            match = LISTENING.search(self.log())
            if match:
                self.port = int(match.group(1))
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            return False

        eventually(serving, timeout=timeout, interval=0.02,
                   message=lambda: f"server did not start in {timeout}s:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))

    def stub(self, own_connection: bool = False) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        """A stub on a new channel; channels alike share one TCP connection unless
        `own_connection` (the server's stream rules go by connection)."""
        options = {"grpc.use_local_subchannel_pool": 1} if own_connection else {}
        return smq_pb2_grpc.SuhaibMessageQueueStub(self.channel(**options))

    def terminate(self, timeout: float = 60.0) -> int:  # generous: CI machines get loaded
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop_process(self) -> None:
        """SIGSTOP, returning once the kernel reports the process stopped (the signal is
        delivered asynchronously; a test that goes on at once may still be answered)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")
        eventually(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T",
                   timeout=10, interval=0.01)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()


def module_server(tmp_path_factory: pytest.TempPathFactory, name: str, *flags: str,
                  socket: bool = False) -> ServerProcess:
    """A server for a whole test module (its tests use distinct topics): short heartbeats,
    optionally a Unix socket (`.socket`)."""
    tmp = tmp_path_factory.mktemp(name)
    extra = ["--unix-socket", str(tmp / "smq.sock")] if socket else []
    proc = ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          "--heartbeat-interval", "0.2", *extra, *flags], tmp).wait_serving()
    proc.socket = str(tmp / "smq.sock") if socket else None
    return proc


def point_cli_at(server: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A clean environment for in-process `smq` commands, aimed at `server`; no ./.env of
    the developer's."""
    for name in list(os.environ):
        if name in ENV_NAMES or name.startswith("SMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMQ_HOST", "127.0.0.1")
    monkeypatch.setenv("PORT", str(server.port))


class Run:
    """smq(*args, stdin=b"...") runs cli.main in this process: (exit code, stdout, stderr).
    Point it at a server with point_cli_at first."""

    def __init__(self, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code
        out, err = self.capsys.readouterr()
        return code, out, err


def make_topic(stub: smq_pb2_grpc.SuhaibMessageQueueStub, name: str, count: int = 0) -> list[int]:
    """Create a topic and produce `count` messages b'm1', b'm2', ...; returns their offsets."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
    return [stub.Produce(smq_pb2.ProduceRequest(topic=name, message=f"m{i}".encode())).offset
            for i in range(1, count + 1)]


# -- start-up failures ----------------------------------------------------------------

def start_and_fail(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER_COMMAND, "--port", "0", "--bind", "127.0.0.1", *flags],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def integrity(db: Path) -> str:
    conn = apsw.Connection(str(db))
    try:
        return conn.execute("PRAGMA integrity_check").get
    finally:
        conn.close()


# -- servers that cannot be reached ---------------------------------------------------

def mtls_server(certs, directory: Path) -> ServerProcess:
    """A server that requires client certificates signed by `certs.ca_cert` (a
    support.certs.CertSet), on 127.0.0.1."""
    return ServerProcess(["--dbpath", str(directory / "smq.db"), "--port", "0",
                          "--bind", "127.0.0.1", *certs.server_flags()], directory).wait_serving()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


C_CORE_LINE = re.compile(r"^[EIWD]\d{4}|ssl_transport_security|handshaker", re.MULTILINE)
