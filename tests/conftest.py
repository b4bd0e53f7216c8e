"""Shared fixtures: real server processes on loopback ephemeral ports, real files.

`smq_server` starts `python -m smq` with a database in the test's temp dir and
returns a ServerProcess; `start_server` starts more (or restarts on the same file).
Every test gets a clean environment: no SMQ variable of the developer's leaks in.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import grpc
import pytest

from smq import cli
from smq._proto import smq_pb2, smq_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"server did not start in {timeout}s:\n{self.log()}")

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


@pytest.fixture
def smq(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Run:
    return Run(capsys, monkeypatch)


@pytest.fixture
def client(server: ServerProcess) -> Iterator:
    """An smq.client.Client on the module's `server` fixture (modules that define one)."""
    from smq.client import Client
    with Client("127.0.0.1", server.port) as client:
        yield client


@pytest.fixture
def topic(client, request: pytest.FixtureRequest) -> str:
    """A topic of the test's own name on `client`'s server."""
    name = request.node.name.replace("[", "_").replace("]", "")[:200]
    client.create_topic(name)
    return name


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """start_server(*flags, db=, env=, wait=True, command=) -> ServerProcess on a free port.
    `command` replaces the server command (e.g. a wrapper in front of SERVER_COMMAND)."""
    started: list[ServerProcess] = []

    def start(*flags: str, db: Path | str | None = None, env: dict[str, str] | None = None,
              wait: bool = True, port: str = "0",
              command: list[str] | None = None) -> ServerProcess:
        args = ["--dbpath", str(db or tmp_path / "smq.db"), "--port", port,
                "--bind", "127.0.0.1", *flags]
        server = ServerProcess(args, tmp_path, env, command)
        started.append(server)
        return server.wait_serving() if wait else server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def smq_server(start_server) -> ServerProcess:
    return start_server("--heartbeat-interval", "0.2")


@pytest.fixture
def stub(smq_server: ServerProcess) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return smq_server.stub()


def make_topic(stub: smq_pb2_grpc.SuhaibMessageQueueStub, name: str, count: int = 0) -> list[int]:
    """Create a topic and produce `count` messages b'm1', b'm2', ...; returns their offsets."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
    return [stub.Produce(smq_pb2.ProduceRequest(topic=name, message=f"m{i}".encode())).offset
            for i in range(1, count + 1)]


# -- files and start-up failures ------------------------------------------------------

def start_and_fail(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER_COMMAND, "--port", "0", "--bind", "127.0.0.1", *flags],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real small filesystem (needs root; the test is skipped otherwise)."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                            str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


SBIN = "/usr/sbin:/sbin"  # not on PATH in every sandbox (Bazel's has /bin:/usr/bin)


@contextlib.contextmanager
def ext4(path: Path, size_mb: int = 64):
    """A real ext4 filesystem on a loop device (needs root; the test is skipped otherwise)."""
    image = path.with_suffix(".img")
    path.mkdir()
    with open(image, "wb") as stream:
        stream.truncate(size_mb * 1024**2)
    mkfs = shutil.which("mkfs.ext4", path=os.pathsep.join([os.environ.get("PATH", ""), SBIN]))
    if os.geteuid() != 0 or mkfs is None \
            or subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True).returncode \
            or subprocess.run(["mount", "-o", "loop", str(image), str(path)],
                              capture_output=True).returncode:
        image.unlink()
        pytest.skip("cannot mount an ext4 loop device here (needs root and mkfs.ext4)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        image.unlink()


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def shut_down_ext4(path: Path) -> None:
    """What ext4 does to itself after a fatal I/O error: every later access fails with EIO."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def integrity(db: Path) -> str:
    conn = apsw.Connection(str(db))
    try:
        return conn.execute("PRAGMA integrity_check").get
    finally:
        conn.close()
