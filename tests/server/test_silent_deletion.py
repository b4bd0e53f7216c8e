"""No message is deleted without somebody asking (issue 13): a deleted topic's leftovers,
drop-oldest at the disk budget, a truncated database file, the WAL in the budget, and
messages that retention would delete in the very commit that acknowledges them."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import apsw
import grpc
import pytest

from support.disks import tmpfs
from support.servers import assert_one_line_refusal, integrity, start_and_fail
from smq._proto import smq_pb2
from smq.server.topic_state import stored_messages

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

KIB = 1024
MIB = 1024 * KIB


def produce(stub, topic: str, count: int, size: int = 100) -> list[int]:
    return [stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=b"x" * size)).offset
            for _ in range(count)]


def stored_offsets(db: Path, topic: str) -> list[int]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [offset for name, offset, _ in stored_messages(conn) if name == topic]
    finally:
        conn.close()


def describe(stub, topic: str) -> smq_pb2.TopicInfo:
    return stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic)).topic


# -- 1. a deleted topic leaves nothing behind ---------------------------------------------

def test_a_deleted_topics_policy_and_consumers_do_not_come_back(start_server, tmp_path):
    server = start_server()
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="p"))
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="p", policy=smq_pb2.TopicPolicy(max_messages=5, on_full="drop-oldest")))
    produce(stub, "p", 3)
    stub.CommitOffset(smq_pb2.CommitOffsetRequest(consumer="c", topic="p", offset=2))
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="p"))
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="p"))
    assert produce(stub, "p", 20) == list(range(4, 24))  # offsets go on, never reused
    assert describe(stub, "p").message_count == 20

    for _ in range(2):  # what the running server says, then what the file says
        policy = stub.GetTopicPolicy(smq_pb2.GetTopicPolicyRequest(topic="p"))
        assert policy.overrides == smq_pb2.TopicPolicy()
        assert not stub.ListConsumers(smq_pb2.ListConsumersRequest(topic="p")).consumers
        assert server.terminate() == 0
        server = start_server(db=tmp_path / "smq.db")
        stub = server.stub()
    assert produce(stub, "p", 1) == [24]
    assert describe(stub, "p").message_count == 21
    assert describe(stub, "p").stored_bytes == 2100


def test_offsets_appended_in_the_commit_that_deletes_the_topic_are_not_given_again(tmp_path):
    """In-process, one group commit: appends, then DeleteTopic of the same topic. The
    deleted topic's next offset must be stored, or a topic created again reuses offsets."""
    from smq.server.ops import Append, CreateTopic, DeleteTopic
    from smq.server.storage import Storage
    from smq.server.writer import GroupCommitWriter
    writer = GroupCommitWriter(Storage(str(tmp_path / "q.db")))
    writer.execute(CreateTopic("p"))
    append, delete = Append.to_topic("p", [b"m"] * 3), DeleteTopic("p")
    writer._commit_group([append, delete])  # as a busy writer gathers them: one transaction
    assert append.result == (1, 3) and delete.result is True
    writer.execute(CreateTopic("p"))
    assert writer.execute(Append.to_topic("p", [b"n"])) == (4, 4)
    writer.execute(DeleteTopic("p"))
    writer.close()
    writer.storage.close()
    writer = GroupCommitWriter(Storage(str(tmp_path / "q.db")))  # what the file says
    writer.execute(CreateTopic("p"))
    assert writer.execute(Append.to_topic("p", [b"o"])) == (5, 5)
    writer.close()
    writer.storage.close()


def test_produces_racing_delete_and_create_never_get_an_offset_twice(start_server):
    """The hostile run's case: producers on a topic that is deleted and created again,
    over and over (30 times at the time, 2 in 4 runs reused ~20 offsets): every
    acknowledged offset is unique."""
    import threading
    server = start_server()
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="p"))
    acked: list[int] = []
    stop = threading.Event()

    def producer() -> None:
        while not stop.is_set():
            try:
                acked.append(stub.Produce(smq_pb2.ProduceRequest(topic="p", message=b"x"),
                                          timeout=10).offset)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # between delete and create

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(100):
            stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="p"))
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="p"))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(acked) > 100
    assert len(set(acked)) == len(acked), sorted(o for o in set(acked) if acked.count(o) > 1)


# -- 2. drop-oldest: accepted after dropping what it needs, or refused dropping nothing ----

def fill_with(stub, topic: str, size: int) -> list[int]:
    acked = []
    while True:
        try:
            acked.append(stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=b"r" * size)).offset)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return acked


def drop_oldest_topic(stub, name: str, count: int, size: int) -> None:
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic=name, policy=smq_pb2.TopicPolicy(on_full="drop-oldest")))
    for _ in range(count):
        stub.Produce(smq_pb2.ProduceRequest(topic=name, message=b"d" * size))


def test_drop_oldest_refuses_without_dropping_when_dropping_all_would_not_do(start_server, tmp_path):
    """The issue's case: 200 messages could never make room for 900 KB."""
    server = start_server("--max-db-size", "4MiB", "--max-message-size", "1MiB")
    stub = server.stub()
    drop_oldest_topic(stub, "drop", 200, 1 * KIB)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="reject"))
    fill_with(stub, "reject", 16 * KIB)
    with pytest.raises(grpc.RpcError) as err:
        stub.Produce(smq_pb2.ProduceRequest(topic="drop", message=b"big" * 300 * KIB))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = describe(stub, "drop")
    assert (info.earliest_offset, info.latest_offset, info.message_count) == (1, 200, 200)
    assert server.terminate() == 0
    assert stored_offsets(tmp_path / "smq.db", "drop") == list(range(1, 201))


def test_drop_oldest_drops_only_what_the_write_needs(start_server, tmp_path):
    server = start_server("--max-db-size", "4MiB")
    stub = server.stub()
    drop_oldest_topic(stub, "drop", 600, 1 * KIB)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="reject"))
    fill_with(stub, "reject", 16 * KIB)
    offset = stub.Produce(smq_pb2.ProduceRequest(topic="drop", message=b"n" * 100 * KIB)).offset
    assert offset == 601
    info = describe(stub, "drop")
    dropped = info.earliest_offset - 1
    # 100 KiB needs about 100 one-KiB messages' room, less what was free before.
    assert 50 <= dropped <= 130, dropped
    assert info.message_count == 600 - dropped + 1
    assert server.terminate() == 0
    assert stored_offsets(tmp_path / "smq.db", "drop") == list(range(dropped + 1, 602))


def test_drop_oldest_never_drops_what_the_same_commit_acknowledges(start_server, tmp_path):
    """A ProduceBatch larger than the topic can ever hold at the budget is refused whole."""
    server = start_server("--max-db-size", "2MiB", "--max-message-size", "1MiB")
    stub = server.stub()
    drop_oldest_topic(stub, "drop", 10, 1 * KIB)
    with pytest.raises(grpc.RpcError) as err:
        stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="drop", messages=[b"b" * 64 * KIB] * 40))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = describe(stub, "drop")
    assert (info.earliest_offset, info.latest_offset) == (1, 10)
    assert server.terminate() == 0


# -- 4. a zero-length database file -------------------------------------------------------

def killed_with_acknowledged_messages(start_server, db: Path, count: int = 100) -> None:
    server = start_server(db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert produce(stub, "t", count) == list(range(1, count + 1))
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def sidecars(db: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(db.parent.glob(db.name + "*"))}


@pytest.mark.parametrize("keep_wal", [True, False])
def test_a_truncated_database_after_a_crash_is_refused(start_server, tmp_path, keep_wal):
    db = tmp_path / "q.db"
    killed_with_acknowledged_messages(start_server, db)
    assert os.path.getsize(str(db) + "-wal") > 0, "the crash should leave the WAL"
    os.truncate(db, 0)
    if not keep_wal:
        os.unlink(str(db) + "-wal")
    before = sidecars(db)
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db), "0 bytes")
    assert sidecars(db) == before, "a refused database must be left as it was"


def test_a_truncated_database_after_a_clean_stop_is_refused(start_server, tmp_path):
    """After a clean stop SMQ leaves its (empty) -wal and -shm beside the file: they show
    that a zero-length file once held a database."""
    db = tmp_path / "q.db"
    server = start_server(db=db)
    server.stub().CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert server.terminate() == 0
    assert os.path.exists(str(db) + "-wal") and os.path.exists(str(db) + "-shm")
    os.truncate(db, 0)
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db))
    assert db.stat().st_size == 0


def test_a_missing_database_beside_a_wal_with_data_is_refused(start_server, tmp_path):
    db = tmp_path / "q.db"
    killed_with_acknowledged_messages(start_server, db)
    db.unlink()
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db))
    assert not db.exists()


def test_move_aside_takes_a_truncated_database_and_its_wal(start_server, tmp_path):
    db = tmp_path / "q.db"
    killed_with_acknowledged_messages(start_server, db)
    wal = Path(str(db) + "-wal").read_bytes()
    os.truncate(db, 0)
    server = start_server("--on-corrupt", "move-aside", db=db)
    moved = sorted(p.name for p in tmp_path.glob("q.db.corrupt-*"))
    assert [name.rsplit("-", 1)[-1] for name in moved if name.endswith(("-wal", "-shm"))] == ["shm", "wal"]
    kept_wal = next(p for p in tmp_path.glob("q.db.corrupt-*-wal"))
    assert kept_wal.read_bytes() == wal
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert produce(stub, "t", 1) == [1]


def test_a_touched_empty_file_starts_a_new_database(start_server, tmp_path):
    db = tmp_path / "q.db"
    db.touch()
    stub = start_server(db=db).stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert produce(stub, "t", 1) == [1]


# -- the WAL in the budget, and a reserve to delete with ------------------------------------

def test_the_wal_counts_in_the_disk_budget(start_server, tmp_path):
    db = tmp_path / "q.db"
    server = start_server("--max-db-size", "8MiB", db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    largest = 0
    for _ in range(2000):
        try:
            stub.Produce(smq_pb2.ProduceRequest(topic="t", message=os.urandom(8 * KIB)))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            break
        files = sum(os.path.getsize(p) for p in (db, f"{db}-wal") if os.path.exists(p))
        largest = max(largest, files)
    else:
        raise AssertionError("the budget was never reached")
    assert largest <= 8 * MIB, f"database and WAL took {largest} bytes of an 8 MiB budget"
    assert server.terminate() == 0


def test_a_full_budget_can_still_trim_and_delete_after_a_restart(start_server, tmp_path):
    db = tmp_path / "q.db"
    server = start_server("--max-db-size", "2MiB", db=db)
    stub = server.stub()
    for name in ("a", "b"):
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
    acked = fill_with(stub, "a", 4 * KIB) + fill_with(stub, "b", 100)
    assert acked
    assert server.terminate() == 0
    stub = start_server("--max-db-size", "2MiB", db=db).stub()
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="a", offset=10))
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="b"))
    assert describe(stub, "a").earliest_offset == 11


def test_a_full_filesystem_can_still_trim_and_delete_after_a_restart(start_server, tmp_path):
    """SMQ filled the filesystem itself (no --min-free-space floor): it stops a reserve
    short of full, which trims and deletes may use, after a restart too."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        db = mount / "q.db"
        server = start_server("--min-free-space", "0", db=db)
        stub = server.stub()
        for name in ("a", "b"):
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
        acked = fill_with(stub, "a", 16 * KIB)
        fill_with(stub, "b", 200)
        assert len(acked) > 10
        # Full: what is left is the reserve and the WAL's share (storage.free_space).
        assert shutil.disk_usage(mount).free < 1024 * KIB
        assert server.terminate() == 0
        server = start_server("--min-free-space", "0", db=db)
        stub = server.stub()
        stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="a", offset=len(acked) // 2))
        stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="b"))
        assert describe(stub, "a").earliest_offset == len(acked) // 2 + 1
        assert server.terminate() == 0
        assert integrity(db) == "ok"


# -- what retention would delete in the commit that acknowledges it ---------------------------

def test_a_message_larger_than_the_topics_max_bytes_is_refused(smq_server):
    stub = smq_server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="small"))
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="small", policy=smq_pb2.TopicPolicy(max_bytes=1000)))
    produce(stub, "small", 5)
    for call in (lambda: stub.Produce(smq_pb2.ProduceRequest(topic="small", message=b"x" * 1001)),
                 lambda: stub.ProduceBatch(smq_pb2.ProduceBatchRequest(
                     topic="small", messages=[b"x" * 10, b"x" * 1001])),
                 lambda: stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="small", message=b"y"),
                                                  smq_pb2.ProduceRequest(topic="small", message=b"x" * 2000)]))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "max_bytes" in err.value.details()
    info = describe(stub, "small")
    # The stream's first message, before the refused one, stays (StreamProduce's rule).
    assert (info.earliest_offset, info.latest_offset, info.message_count) == (1, 6, 6)
    assert produce(stub, "small", 1, size=1000) == [7]  # exactly max_bytes still fits


def test_retention_still_keeps_the_newest_of_a_batch_of_messages_that_each_fit(smq_server):
    """Only a message that could never be kept is refused; a batch larger than the topic
    keeps its newest messages, as retention does."""
    stub = smq_server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="ring"))
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="ring", policy=smq_pb2.TopicPolicy(max_messages=5, max_bytes=1000)))
    reply = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="ring", messages=[b"m" * 300] * 6))
    assert (reply.first_offset, reply.last_offset) == (1, 6)
    info = describe(stub, "ring")
    assert (info.earliest_offset, info.latest_offset) == (4, 6)


# -- found by a hostile review --------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\n", b"x" * 100])
def test_a_database_file_shorter_than_a_page_is_refused(start_server, tmp_path, content):
    """`echo > q.db` leaves 1 byte: SQLite would start an empty database over the WAL."""
    db = tmp_path / "q.db"
    killed_with_acknowledged_messages(start_server, db)
    db.write_bytes(content)
    before = sidecars(db)
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db), f"{len(content)} bytes long")
    assert sidecars(db) == before


def test_a_refused_database_gets_no_wal_or_shm_beside_it(start_server, tmp_path):
    """Files made by the refused start would later pass for evidence that a truncated
    file held a database."""
    db = tmp_path / "q.db"
    server = start_server(db=db)
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[os.urandom(1000)] * 500))
    assert server.terminate() == 0
    for suffix in ("-wal", "-shm"):
        os.unlink(f"{db}{suffix}")
    with open(db, "r+b") as f:  # damage the middle: quick_check finds it
        f.seek(db.stat().st_size // 2)
        f.write(b"\xff" * 8192)
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db), "damaged")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("q.db")) == ["q.db"]


def test_deleting_a_topic_of_small_messages_at_a_full_filesystem(start_server, tmp_path):
    """Deleting touches every page the topic holds; it goes in steps that fit the reserve."""
    with tmpfs(tmp_path / "small", "1m") as mount:
        db = mount / "q.db"
        server = start_server("--min-free-space", "0", db=db)
        stub = server.stub()
        for name in ("a", "b"):
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name))
        acked = fill_with(stub, "a", 100)
        assert len(acked) > 1000
        fill_with(stub, "b", 100)
        stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="a", offset=len(acked) // 2))
        stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="a"))
        assert server.terminate() == 0
        stub = start_server("--min-free-space", "0", db=db).stub()
        stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="b"))
        assert not stub.ListTopics(smq_pb2.ListTopicsRequest()).topics
        assert integrity(db) == "ok"


def test_a_stream_at_the_disk_budget_keeps_what_came_before_the_refused_message(tmp_path):
    """In-process on a real file: the writer's StreamProduce op, messages of one commit."""
    from smq.errors import StorageFull
    from smq.server.schema import StorageOptions
    from smq.server.storage import Storage
    from smq.server.ops import Append, CreateTopic
    from smq.server.writer import GroupCommitWriter
    storage = Storage(str(tmp_path / "q.db"), StorageOptions(max_db_size=1 * MIB))
    writer = GroupCommitWriter(storage)
    writer.execute(CreateTopic("t"))
    op = Append([("t", b"s" * 16 * KIB) for _ in range(100)])  # 1.6 MiB into 1 MiB
    with pytest.raises(StorageFull):
        writer.execute(op)
    first, last = op.result
    assert first == 1 and last > 10
    assert writer.topics["t"].next_offset == last + 1
    writer.close()
    storage.close()
    assert stored_offsets(tmp_path / "q.db", "t") == list(range(1, last + 1))


def test_a_stream_refused_at_the_budget_drops_nothing_of_a_drop_oldest_topic(tmp_path):
    from smq.errors import StorageFull
    from smq.domain import TopicPolicy
    from smq.server.schema import StorageOptions
    from smq.server.storage import Storage
    from smq.server.ops import Append, CreateTopic, SetPolicy
    from smq.server.writer import GroupCommitWriter
    storage = Storage(str(tmp_path / "q.db"), StorageOptions(max_db_size=1 * MIB))
    writer = GroupCommitWriter(storage)
    for name in ("drop", "fill"):
        writer.execute(CreateTopic(name))
    writer.execute(SetPolicy("drop", TopicPolicy(on_full="drop-oldest")))
    writer.execute(Append.to_topic("drop", [b"d" * 100] * 10))
    with pytest.raises(StorageFull):
        while True:
            writer.execute(Append.to_topic("fill", [b"f" * 8 * KIB]))
    op = Append([("drop", b"small"), ("drop", b"x" * 600 * KIB)])  # cannot fit even alone
    with pytest.raises(StorageFull):
        writer.execute(op)
    topic = writer.topics["drop"]
    assert (topic.earliest, topic.next_offset) == (1, 12)  # the ten, and "small": nothing dropped
    writer.close()
    storage.close()
    assert stored_offsets(tmp_path / "q.db", "drop") == list(range(1, 12))
