"""What is acknowledged stays: across a clean restart (SIGTERM) and across kill -9 right
after acks, in both durability modes; offsets go on and are never reused; the file
passes PRAGMA integrity_check afterwards."""
from __future__ import annotations

import threading
from pathlib import Path

import apsw
import grpc
import pytest

from support.poll import eventually
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.server.schema import StorageOptions
from smq.server.storage import Storage

RPC_TIMEOUT = 30


def read_all(stub: smq_pb2_grpc.SuhaibMessageQueueStub, topic: str) -> dict[int, bytes]:
    """Every stored message of the topic, through BulkRetrieve pages."""
    stored: dict[int, bytes] = {}
    start = 1
    while True:
        page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=start,
                                                             limit=1000), timeout=RPC_TIMEOUT)
        if page.count == 0:
            return stored
        for message in page.messages:
            assert message.offset not in stored
            stored[message.offset] = message.message
        start = page.next_offset


def produce(stub: smq_pb2_grpc.SuhaibMessageQueueStub, topic: str, payload: bytes) -> int:
    return stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=payload),
                        timeout=RPC_TIMEOUT).offset


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def assert_intact(db: Path) -> None:
    """PRAGMA integrity_check on the file of a stopped server."""
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_everything_survives_a_clean_restart(start_server, tmp_path: Path):
    db = tmp_path / "smq.db"
    server = start_server(db=db)
    stub = server.stub()
    payloads = {
        "a": [f"a{i}".encode() for i in range(1, 51)],
        "b.binary-topic_2": [b"", bytes(range(256)), b"\x00" * 10, b"x" * (200 * 1024)],
        "emptied": [b"gone"] * 10,
    }
    for topic, messages in payloads.items():
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=RPC_TIMEOUT)
        offsets = [produce(stub, topic, m) for m in messages]
        assert offsets == list(range(1, len(messages) + 1))
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="never-used"), timeout=RPC_TIMEOUT)
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="emptied", offset=10),
                           timeout=RPC_TIMEOUT)
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="a", offset=20),
                           timeout=RPC_TIMEOUT)
    assert server.terminate() == 0
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "WAL not checkpointed on shutdown"
    assert_intact(db)

    server = start_server(db=db)
    stub = server.stub()
    assert read_all(stub, "a") == {i: f"a{i}".encode() for i in range(21, 51)}
    assert read_all(stub, "b.binary-topic_2") == dict(enumerate(payloads["b.binary-topic_2"], 1))
    assert read_all(stub, "emptied") == {}
    assert read_all(stub, "never-used") == {}
    latest = stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic="a"), timeout=RPC_TIMEOUT)
    earliest = stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic="a"), timeout=RPC_TIMEOUT)
    assert (earliest.offset, latest.offset) == (21, 50)
    assert status_of(lambda: stub.GetLatestOffset(
        smq_pb2.GetLatestOffsetRequest(topic="emptied"), timeout=RPC_TIMEOUT)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # Offsets go on where they were, also on a topic trimmed empty before the restart.
    assert produce(stub, "a", b"next") == 51
    assert produce(stub, "b.binary-topic_2", b"next") == 5
    assert produce(stub, "emptied", b"next") == 11
    assert produce(stub, "never-used", b"first") == 1
    assert server.terminate() == 0
    assert_intact(db)

    server = start_server(db=db)
    stub = server.stub()
    assert read_all(stub, "emptied") == {11: b"next"}
    assert read_all(stub, "a")[51] == b"next"
    assert server.terminate() == 0
    assert_intact(db)


PRODUCERS = 4
TOPICS = ("crash-a", "crash-b")


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_kill_9_right_after_acks_loses_nothing_and_reuses_no_offset(durability: str, start_server,
                                                                   tmp_path: Path):
    db = tmp_path / "smq.db"
    server = start_server("--durability", durability, db=db)
    setup = server.stub()
    for topic in TOPICS:
        setup.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=RPC_TIMEOUT)

    acked: list[tuple[str, int, bytes]] = []
    attempted: set[tuple[str, bytes]] = set()
    failures: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def producer(n: int) -> None:
        stub = server.stub()
        i = 0
        while True:  # until the server dies under us
            topic = TOPICS[(n + i) % len(TOPICS)]
            payload = f"p{n}-{i}".encode()
            with lock:
                attempted.add((topic, payload))
            try:
                offset = produce(stub, topic, payload)
            except grpc.RpcError as exc:
                with lock:
                    failures.append(exc.code())
                return
            with lock:
                acked.append((topic, offset, payload))
            i += 1

    threads = [threading.Thread(target=producer, args=(n,), daemon=True) for n in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    eventually(lambda: len(acked) >= 400 or not all(t.is_alive() for t in threads),
               timeout=60, interval=0.01)
    assert len(acked) >= 400 and not failures, (len(acked), failures, server.log())
    server.proc.kill()  # SIGKILL while the producers are still producing
    server.kill()
    for thread in threads:
        thread.join(RPC_TIMEOUT + 10)
    assert not any(t.is_alive() for t in threads)
    assert len(failures) == PRODUCERS
    assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, failures

    server = start_server("--durability", durability, db=db)
    stub = server.stub()
    for topic in TOPICS:
        stored = read_all(stub, topic)
        mine = [(offset, payload) for t, offset, payload in acked if t == topic]
        offsets = [offset for offset, _ in mine]
        assert len(set(offsets)) == len(offsets), "an offset was acknowledged twice"
        missing = [(o, p) for o, p in mine if stored.get(o) != p]
        assert not missing, f"acknowledged but lost or changed after kill -9: {missing[:10]}"
        assert sorted(stored) == list(range(1, len(stored) + 1)), "gap in the stored offsets"
        # Anything stored beyond the acks can only be a write in flight at the kill.
        unacked = {p for p in stored.values()} - {p for _, p in mine}
        assert unacked <= {p for t, p in attempted if t == topic}
        assert len(unacked) <= PRODUCERS
        assert len(set(stored.values())) == len(stored), "a message was stored twice"
        next_offset = produce(stub, topic, b"after the crash")
        assert next_offset == max(stored) + 1
        assert next_offset > max(offsets)
    assert server.terminate() == 0
    assert_intact(db)


def test_kill_9_immediately_after_a_single_ack(start_server, tmp_path: Path):
    db = tmp_path / "smq.db"
    server = start_server(db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"), timeout=RPC_TIMEOUT)
    offset = produce(stub, "t", b"acked")
    server.proc.kill()
    server.kill()
    server = start_server(db=db)
    stub = server.stub()
    assert read_all(stub, "t") == {offset: b"acked"}
    assert produce(stub, "t", b"next") == offset + 1
    assert server.terminate() == 0
    assert_intact(db)


@pytest.mark.parametrize("mode,synchronous", [("full", 2), ("normal", 1)])
def test_durability_modes_set_wal_and_synchronous(mode: str, synchronous: int, tmp_path: Path):
    """A power cut cannot be tested here; what makes an ack survive one can: WAL with
    synchronous=FULL (2) fsyncs every commit; normal (1) only at checkpoints."""
    storage = Storage(str(tmp_path / "s.db"), StorageOptions(durability=mode))
    try:
        assert storage._writer.pragma("journal_mode") == "wal"
        assert storage._writer.pragma("synchronous") == synchronous
    finally:
        storage.close()
