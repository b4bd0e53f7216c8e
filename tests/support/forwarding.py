"""What the forwarder's tests run: real `nats-server` processes (one server, or a
3-node JetStream cluster) on loopback ports with stores in the test's temp dir, the
forwarder as a child process (`python -m smq.forward`), a reader of a whole stream, and
the SMQ side of a test: messages produced, the forwarder's commits awaited.

Debian's package installs the binary as /usr/sbin/nats-server (`apt-get install -y
nats-server`); tests that need it (the `needs_nats` fixture, tests/forward/conftest.py)
skip with that hint when it is missing, or fail when SMQ_REQUIRE_NATS=1 (as .ci/run sets).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from smq._proto import smq_pb2
from support.poll import eventually

INSTALL_HINT = "nats-server is not installed (CI: apt-get install -y nats-server)"
NODE = "edge"  # the forwarder's node name in the tests of one nats-server
STREAM = "SMQ_edge"


def nats_server_binary() -> str | None:
    """The nats-server on PATH; Debian puts it in /usr/sbin, not on every user's PATH."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together so that none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsServer:
    """One nats-server with JetStream. `start()` (again after `stop()`/`kill()`) keeps
    its ports and its store, like a machine that reboots."""

    def __init__(self, workdir: Path, name: str, client_port: int, *,
                 cluster_port: int | None = None, routes: list[int] | None = None,
                 cluster_name: str = "smqtest", extra_config: str = "") -> None:
        self.name = name
        self.port = client_port
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "nats.conf"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{client_port}",
            f"jetstream {{ store_dir: '{self.dir / 'store'}', max_memory_store: 64MB, "
            "max_file_store: 1GB }",
        ]
        if cluster_port is not None:
            route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes or [])
            lines.append(f"cluster {{ name: {cluster_name}, listen: 127.0.0.1:{cluster_port}, "
                         f"routes: [{route_urls}] }}")
        lines.append(extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "NatsServer":
        binary = nats_server_binary()
        assert binary, INSTALL_HINT
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([binary, "-c", str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                return False

        eventually(listening, timeout=timeout, message=f"nats-server {self.name} did not listen")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown); SIGKILL if it does not end in time."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


class NatsCluster:
    """Three clustered nats-servers (JetStream meta group of three)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        client_ports, cluster_ports = ports[:size], ports[size:]
        self.servers = [
            NatsServer(workdir, f"n{i + 1}", client_ports[i], cluster_port=cluster_ports[i],
                       routes=[p for j, p in enumerate(cluster_ports) if j != i])
            for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> "NatsCluster":
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            server.wait_listening()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


class ForwarderProcess:
    """`python -m smq.forward ARGS` with output in a log file."""

    def __init__(self, args: Sequence[str], cwd: Path, env: dict[str, str]) -> None:
        self.args = list(args)
        self.log_path = cwd / f"forward-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "smq.forward", *self.args],
                                         cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first match of `pattern` in the log, waiting for it."""
        def found():
            if self.proc.poll() is not None and not re.search(pattern, self.log()):
                raise AssertionError(f"forwarder exited {self.proc.returncode}:\n{self.log()}")
            return re.search(pattern, self.log())
        return eventually(found, timeout=timeout, interval=0.1,
                          message=f"{pattern!r} in the forwarder log")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def forward_env(**extra: str) -> dict[str, str]:
    """The environment without any SMQ or NATS setting of the developer's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMQ_", "NATS_")) and k not in (
               "PORT", "ENABLE_MTLS", "CLIENT_CERT", "CLIENT_KEY", "CA_CERT",
               "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    seq: int
    subject: str
    msg_id: str
    data: bytes


def read_stream(urls: Sequence[str], stream: str, **connect: object) -> list[StoredMessage]:
    """Every message of `stream`, in stream order, read by sequence number (no consumer:
    that needs the cluster's meta leader, which a test may just have killed)."""
    import nats

    async def read() -> list[StoredMessage]:
        nc = await nats.connect(servers=list(urls), connect_timeout=2, **connect)
        try:
            js = nc.jetstream(timeout=5)
            last = await retried(lambda: js.stream_info(stream))
            last_seq, first_seq = last.state.last_seq, last.state.first_seq
            found: dict[int, StoredMessage] = {}

            async def get(seq: int) -> None:
                msg = await retried(lambda: js.get_msg(stream, seq))
                found[seq] = StoredMessage(seq, msg.subject, (msg.headers or {}).get("Nats-Msg-Id", ""),
                                          msg.data or b"")

            seqs = list(range(max(first_seq, 1), last_seq + 1)) if last_seq else []
            for start in range(0, len(seqs), 200):
                await asyncio.gather(*(get(seq) for seq in seqs[start:start + 200]))
            return [found[seq] for seq in seqs]
        finally:
            await nc.close()

    async def retried(call):
        deadline = time.monotonic() + 60
        while True:
            try:
                return await call()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    return asyncio.run(read())


def check_exactly_once_in_order(stored: list[StoredMessage], node: str,
                                expected: dict[str, list[bytes]], prefix: str = "smq") -> None:
    """The stream holds, per topic, offsets 1..N once each, in order, with the payloads
    SMQ stored (expected[topic][offset - 1]), and nothing else."""
    by_topic: dict[str, list[StoredMessage]] = {}
    for message in stored:
        topic = message.subject[len(f"{prefix}.{node}."):]
        assert message.subject == f"{prefix}.{node}.{topic}", message
        by_topic.setdefault(topic, []).append(message)
    assert sorted(by_topic) == sorted(t for t in expected if expected[t]), sorted(by_topic)
    for topic, messages in by_topic.items():
        offsets = [int(m.msg_id.rsplit("/", 1)[1]) for m in messages]
        duplicates = len(offsets) - len(set(offsets))
        assert duplicates == 0, f"{topic}: {duplicates} duplicates"
        assert offsets == sorted(offsets), f"{topic}: out of order"
        assert offsets == list(range(1, len(expected[topic]) + 1)), \
            f"{topic}: {len(offsets)} of {len(expected[topic])} messages"
        assert [m.msg_id for m in messages] == [f"{node}/{topic}/{o}" for o in offsets]
        assert [m.data for m in messages] == expected[topic], f"{topic}: payloads differ"


# -- SMQ's side of a forwarder test: its arguments, messages, commits; the stream ---------------

def smq_args(server) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(server.port)]


def produce(stub, topic: str, count: int, start: int = 1) -> list[bytes]:
    payloads = [f"{topic} message {i}".encode() for i in range(start, start + count)]
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic=topic, messages=payloads), timeout=10)
    return payloads


def committed(stub, topic: str, consumer: str = f"forward-{NODE}") -> int | None:
    try:
        return stub.GetCommittedOffset(smq_pb2.GetCommittedOffsetRequest(
            consumer=consumer, topic=topic), timeout=5).offset
    except Exception:
        return None


def wait_committed(stub, expected: dict[str, list[bytes]], timeout: float = 30.0) -> None:
    eventually(lambda: all(committed(stub, t) == len(p) for t, p in expected.items()),
               timeout=timeout, interval=0.1,
               message=f"commits up to {[len(p) for p in expected.values()]}")


def add_stream(url: str, name: str = STREAM, subjects: str = f"smq.{NODE}.>", **options) -> None:
    import nats
    from nats.js.api import StreamConfig

    async def add() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[subjects], **options))
        finally:
            await nc.close()
    asyncio.run(add())


def require_nats() -> None:
    """Skip the test when nats-server is missing; fail it when SMQ_REQUIRE_NATS=1 (CI:
    the forwarding tests must not go unnoticed, as SMQ_REQUIRE_GO does for Go)."""
    import pytest
    if nats_server_binary() is None:
        if os.environ.get("SMQ_REQUIRE_NATS") == "1":
            pytest.fail(f"{INSTALL_HINT}, and SMQ_REQUIRE_NATS=1 requires it")
        pytest.skip(INSTALL_HINT)
