"""sd_notify as systemd sees it: a real AF_UNIX datagram socket with SO_PASSCRED,
the server started with NOTIFY_SOCKET and WATCHDOG_USEC, credentials checked."""
from __future__ import annotations

import re
import socket
import struct
import threading
import time
from pathlib import Path

import apsw
import pytest

from support.poll import eventually
from support.servers import clean_env

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

WATCHDOG_SECONDS = 2.0  # the server pings every 1 s, and checks liveness within 0.5 s


class NotifySocket:
    """What systemd's notify socket receives: (time, sender pid, fields) per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, creds_size)
            except socket.timeout:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), pid, fields))

    def wait_for(self, key: str, timeout: float = 20.0) -> tuple[float, int, dict[str, str]]:
        return eventually(lambda: next((m for m in self.messages if key in m[2]), None),
                          timeout=timeout, interval=0.01,
                          message=lambda: f"no {key}; got {self.messages}")

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, _, f in self.messages if "WATCHDOG" in f and start <= t <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_watchdog_hang_and_stopping(start_server, notify_socket, tmp_path):
    db = tmp_path / "smq.db"
    env = clean_env(NOTIFY_SOCKET=notify_socket.path,
                    WATCHDOG_USEC=str(int(WATCHDOG_SECONDS * 1e6)))
    server = start_server("--shutdown-grace", "2", db=db, env=env, wait=False)

    _, pid, ready = notify_socket.wait_for("READY")
    assert ready["READY"] == "1"
    assert pid == server.proc.pid, "READY must come from the main PID (NotifyAccess=main)"
    port = int(re.search(r":(\d+)", ready["STATUS"]).group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the port accepted by the time READY=1 was sent
    assert "0 topics" in ready["STATUS"]

    # Healthy: pings keep coming, one per WATCHDOG_USEC/2 (every 1 s), from the main PID.
    # What is observed is the gaps between them: none as long as the watchdog's timeout,
    # and no flood either.
    start = time.monotonic()

    def four_pings() -> list[float] | None:
        pings = notify_socket.pings(start, time.monotonic())
        return pings if len(pings) >= 4 else None

    pings = eventually(four_pings, timeout=15)
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert max(gaps) < WATCHDOG_SECONDS and sum(gaps) / len(gaps) >= 0.5, gaps
    assert {p for t, p, f in notify_socket.messages if "WATCHDOG" in f} == {server.proc.pid}

    # Wedge the storage: another process holds the write lock, so the writer cannot
    # complete its liveness transaction. No ping may be sent while that lasts: held for
    # well past the watchdog's timeout, which is what systemd would act on.
    blocker = apsw.Connection(str(db))
    blocker.execute("BEGIN IMMEDIATE")
    hung_at = time.monotonic()
    time.sleep(2.5 * WATCHDOG_SECONDS)  # an absence is observed over a span of time
    released_at = time.monotonic()
    blocker.execute("ROLLBACK")
    blocker.close()
    # One ping may already have been on its way when the lock was taken.
    assert notify_socket.pings(hung_at + WATCHDOG_SECONDS / 2 + 0.3, released_at) == []

    # Released: pings come back.
    eventually(lambda: notify_socket.pings(released_at, time.monotonic()), timeout=15,
               message="no ping after the lock was released")

    assert server.terminate() == 0
    _, pid, stopping = notify_socket.wait_for("STOPPING", timeout=5)
    assert stopping["STOPPING"] == "1" and pid == server.proc.pid


def test_status_line_counts_topics_and_messages(start_server, notify_socket):
    env = clean_env(NOTIFY_SOCKET=notify_socket.path)
    server = start_server(env=env)
    from smq._proto import smq_pb2
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    for _ in range(3):
        stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x"))
    # Without WATCHDOG_USEC the status line is refreshed every 10 s and no ping is sent.
    eventually(lambda: any("1 topic, 3 messages stored" in f.get("STATUS", "")
                           for _, _, f in notify_socket.messages),
               timeout=25, interval=0.2, message=lambda: str(notify_socket.messages))
    assert not any("WATCHDOG" in f for _, _, f in notify_socket.messages)
    assert server.terminate() == 0


def test_a_migration_asks_systemd_for_more_time_to_start(start_server, notify_socket, tmp_path):
    """Copying a large file on a slow card could outlast TimeoutStartSec: before each step
    that copies the database, the server asks for time in proportion to its size."""
    from support.formats import THIRD, write_third_format
    db = tmp_path / "old.db"
    write_third_format(db, THIRD, deleted="gone")
    server = start_server(env=clean_env(NOTIFY_SOCKET=notify_socket.path), db=db)
    notify_socket.wait_for("READY")
    extensions = [(t, f) for t, _, f in notify_socket.messages if "EXTEND_TIMEOUT_USEC" in f]
    steps = [f["STATUS"] for _, f in extensions]
    assert steps == ["migrating the database to format 4",
                     "rebuilding the database with 512-byte pages"], steps
    assert all(int(f["EXTEND_TIMEOUT_USEC"]) >= 60_000_000 for _, f in extensions)
    ready_at = notify_socket.wait_for("READY")[0]
    assert all(t < ready_at for t, _ in extensions)
    assert server.terminate() == 0
