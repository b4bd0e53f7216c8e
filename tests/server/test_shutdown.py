"""Stopping: SIGTERM ends open streams with UNAVAILABLE and exits 0 within the grace
period; every write acknowledged before it is there after a restart. The embedded
`Server` starts and stops in-process and cleans up after itself, also when it fails."""
from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import apsw
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.poll import eventually
from support.servers import ServerProcess
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.server.config import ServerConfig as Config
from smq.errors import StartupError
from smq.server import Server

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

RPC_TIMEOUT = 30
EXIT_TIMEOUT = 10  # well above --shutdown-grace 2, well below a hang


class StreamWatcher(threading.Thread):
    """Reads a StreamConsume until it ends; keeps what came and how it ended."""

    def __init__(self, server: ServerProcess, topic: str) -> None:
        super().__init__(daemon=True)
        self.call = server.stub().StreamConsume(smq_pb2.ConsumeRequest(topic=topic, offset=0),
                                                timeout=120)
        self.subscribed = threading.Event()
        self.received: list[int] = []
        self.ended_with: grpc.StatusCode | None = None

    def run(self) -> None:
        try:
            for reply in self.call:
                self.subscribed.set()
                if reply.offset != -1:
                    self.received.append(reply.offset)
            self.ended_with = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.ended_with = exc.code()
        finally:
            self.subscribed.set()


def signal_and_wait(server: ServerProcess, signum: int = signal.SIGTERM) -> int:
    """Send the signal; the exit code, which must come within EXIT_TIMEOUT."""
    server.proc.send_signal(signum)
    return server.proc.wait(EXIT_TIMEOUT)


def test_sigterm_ends_streams_with_unavailable_and_exits_0(start_server, tmp_path: Path):
    db = tmp_path / "smq.db"
    server = start_server("--shutdown-grace", "2", "--heartbeat-interval", "0.2", db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="live"), timeout=RPC_TIMEOUT)
    watchers = [StreamWatcher(server, "live") for _ in range(3)]
    for watcher in watchers:
        watcher.start()
        assert watcher.subscribed.wait(RPC_TIMEOUT)
    acked = [stub.Produce(smq_pb2.ProduceRequest(topic="live", message=f"m{i}".encode()),
                          timeout=RPC_TIMEOUT).offset for i in range(20)]
    eventually(lambda: all(len(w.received) >= len(acked) for w in watchers),  # pushed to all
               timeout=RPC_TIMEOUT, interval=0.02,
               message=lambda: str([len(w.received) for w in watchers]))

    code = signal_and_wait(server)
    assert code == 0, server.log()
    for watcher in watchers:
        watcher.join(EXIT_TIMEOUT)
        assert not watcher.is_alive()
        assert watcher.ended_with == grpc.StatusCode.UNAVAILABLE, watcher.ended_with
        assert watcher.received == acked
    assert "Traceback" not in server.log()

    server = start_server(db=db)
    page = server.stub().BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="live", start_offset=1,
                                                                  limit=100), timeout=RPC_TIMEOUT)
    assert [(m.offset, m.message) for m in page.messages] == \
        [(o, f"m{i}".encode()) for i, o in enumerate(acked)]


def test_sigterm_during_concurrent_produce_keeps_every_ack(start_server, tmp_path: Path):
    db = tmp_path / "smq.db"
    server = start_server("--shutdown-grace", "2", db=db)
    server.stub().CreateTopic(smq_pb2.CreateTopicRequest(topic="busy"), timeout=RPC_TIMEOUT)
    acked: list[tuple[int, bytes]] = []
    failures: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        stub = server.stub()
        for i in range(100_000):
            payload = f"{n}-{i}".encode()
            try:
                offset = stub.Produce(smq_pb2.ProduceRequest(topic="busy", message=payload),
                                      timeout=RPC_TIMEOUT).offset
            except grpc.RpcError as exc:
                with lock:
                    failures.append(exc.code())
                return
            with lock:
                acked.append((offset, payload))

    threads = [threading.Thread(target=producer, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: len(acked) >= 200, timeout=60, interval=0.01, message=server.log)
    code = signal_and_wait(server)
    assert code == 0, server.log()
    for thread in threads:
        thread.join(RPC_TIMEOUT + 10)
        assert not thread.is_alive()
    # docs/wire.md says UNAVAILABLE; a call that gRPC core had received but not yet handed to
    # the server when shutdown began is cancelled by core itself (CANCELLED): a known
    # deviation, reported. Neither is an acknowledgement, so neither may lose an ack.
    assert len(failures) == 4
    assert set(failures) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failures

    server = start_server(db=db)
    stub = server.stub()
    for offset, payload in acked:
        assert stub.Consume(smq_pb2.ConsumeRequest(topic="busy", offset=offset),
                            timeout=RPC_TIMEOUT).message == payload
    latest = stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic="busy"), timeout=RPC_TIMEOUT)
    assert latest.offset >= max(o for o, _ in acked)
    assert stub.Produce(smq_pb2.ProduceRequest(topic="busy", message=b"n"),
                        timeout=RPC_TIMEOUT).offset == latest.offset + 1


def wait_latest(stub: smq_pb2_grpc.SuhaibMessageQueueStub, topic: str, offset: int) -> None:
    """Poll until `offset` is committed in the topic (the server got that far)."""
    def committed() -> bool:
        try:
            return stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic=topic),
                                        timeout=RPC_TIMEOUT).offset >= offset
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION  # still empty
            return False

    eventually(committed, timeout=RPC_TIMEOUT, interval=0.02,
               message=f"offset {offset} of {topic} never committed")


def unfinished_stream_produce(stub: smq_pb2_grpc.SuhaibMessageQueueStub, topic: str,
                              never: threading.Event) -> grpc.Future:
    """A StreamProduce that sent one message (committed) and never half-closes."""
    def requests() -> Iterator[smq_pb2.ProduceRequest]:
        yield smq_pb2.ProduceRequest(topic=topic, message=b"first")
        never.wait(60)

    future = stub.StreamProduce.future(requests(), timeout=120)
    wait_latest(stub, topic, 1)
    return future


def test_unfinished_client_stream_holds_shutdown_only_for_the_grace(start_server):
    server = start_server("--shutdown-grace", "2")
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="slow"), timeout=RPC_TIMEOUT)
    never = threading.Event()
    try:
        future = unfinished_stream_produce(stub, "slow", never)
        code = signal_and_wait(server)
        assert code == 0, server.log()
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=EXIT_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        never.set()
    assert "Traceback" not in server.log(), server.log()


def test_client_cancelling_stream_produce_leaves_no_traceback(start_server):
    server = start_server("--max-streams", "1")
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="gone"), timeout=RPC_TIMEOUT)
    never = threading.Event()
    try:
        future = unfinished_stream_produce(stub, "gone", never)
        future.cancel()
    finally:
        never.set()
    def slot_back() -> bool:  # the one stream slot comes back once the server ended the call
        try:
            stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="gone", message=b"again")]),
                               timeout=RPC_TIMEOUT)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    eventually(slot_back, timeout=RPC_TIMEOUT, message="the cancelled stream was never ended")
    assert server.terminate() == 0  # the log is complete once the process is gone
    assert "Traceback" not in server.log() and "ERROR" not in server.log(), server.log()


def test_health_watch_sees_not_serving_when_draining(start_server):
    server = start_server("--shutdown-grace", "2")
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="smq.SuhaibMessageQueue"), timeout=60)
    replies = iter(watch)
    assert next(replies).status == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGTERM)
    statuses = []
    with pytest.raises(grpc.RpcError):
        for reply in replies:
            statuses.append(reply.status)
    assert statuses[:1] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert server.proc.wait(EXIT_TIMEOUT) == 0


def test_sigint_also_stops_cleanly(start_server):
    server = start_server()
    code = signal_and_wait(server, signal.SIGINT)
    assert code == 0, server.log()
    assert "stopped" in server.log()


# -- the embedded Server -----------------------------------------------------------------------

def writer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "smq-writer")


def refused(port: int) -> bool:
    stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        stub.Connect(smq_pb2.ConnectRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_embedded_server_in_process(tmp_path: Path):
    db = tmp_path / "embedded.db"
    before = writer_threads()
    with Server(Config(dbpath=str(db), port=0, bind="127.0.0.1")) as server:
        assert server.port > 0
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="e"), timeout=RPC_TIMEOUT)
        assert stub.Produce(smq_pb2.ProduceRequest(topic="e", message=b"in-process"),
                            timeout=RPC_TIMEOUT).offset == 1
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        port = server.port
        channel.close()
    assert refused(port)
    assert writer_threads() == before
    server.stop()  # a second stop is harmless

    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()

    with Server(Config(dbpath=str(db), port=0, bind="127.0.0.1")) as again:
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(f"127.0.0.1:{again.port}"))
        reply = stub.Consume(smq_pb2.ConsumeRequest(topic="e", offset=1), timeout=RPC_TIMEOUT)
        assert reply.message == b"in-process"
    assert writer_threads() == before


def test_embedded_server_that_cannot_bind_cleans_up(tmp_path: Path):
    before = writer_threads()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as info:
            Server(Config(dbpath=str(tmp_path / "e.db"), port=port, bind="127.0.0.1"))
    assert str(port) in str(info.value)
    assert writer_threads() == before, "a failed start left its writer thread running"


def test_embedded_server_with_bad_certificates_creates_no_database(tmp_path: Path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage")
    db = tmp_path / "e.db"
    with pytest.raises(StartupError):
        Server(Config(dbpath=str(db), port=0, bind="127.0.0.1", server_enable_mtls=True,
                      server_cert=str(garbage), server_key=str(garbage), server_ca_cert=str(garbage)))
    assert not db.exists()
