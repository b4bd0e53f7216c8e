"""Edge reliability on real files: bad databases at start-up, retention, the disk
budget (SQLite's page limit and a genuinely full small filesystem)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import apsw
import grpc
import pytest

from support.poll import eventually
from support.disks import tmpfs
from support.servers import assert_one_line_refusal, integrity, start_and_fail
from smq.server import retention
from smq._proto import smq_pb2
from smq.server.topic_state import stored_messages

KIB = 1024




def make_database(path: Path, messages: int = 2000) -> None:
    """A real SMQ database with some content, written by the server itself."""
    from smq.server.storage import Storage
    from smq.server.ops import Append, CreateTopic
    from smq.server.writer import GroupCommitWriter
    storage = Storage(str(path))
    writer = GroupCommitWriter(storage)
    writer.submit(CreateTopic("t")).wait()
    writer.submit(Append([("t", os.urandom(200)) for _ in range(messages)])).wait()
    writer.close()
    storage.close()


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "corrupt":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff" * 8192)
    elif how == "header":
        with open(path, "r+b") as f:
            f.seek(16)
            f.write(b"\x00\x07garbage")


@pytest.mark.parametrize("how", ["truncated", "corrupt", "header"])
def test_damaged_database_is_refused_in_one_line(tmp_path, how):
    db = tmp_path / "q.db"
    make_database(db)
    damage(db, how)
    before = db.read_bytes()
    result = start_and_fail(tmp_path, "--dbpath", str(db))
    assert_one_line_refusal(result, str(db))
    assert db.read_bytes() == before, "a refused file must be left as it was"


def test_non_sqlite_file_is_refused(tmp_path):
    db = tmp_path / "notes.txt"
    db.write_text("my notes, not a database\n" * 100)
    assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)), "not an SQLite database")


def test_other_sqlite_database_is_refused(tmp_path):
    db = tmp_path / "other.db"
    conn = apsw.Connection(str(db))
    conn.execute("CREATE TABLE accounts (id INTEGER)")
    conn.close()
    assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)), "not an SMQ one")


def test_newer_format_is_refused(tmp_path):
    db = tmp_path / "q.db"
    make_database(db, messages=1)
    conn = apsw.Connection(str(db))
    conn.pragma("user_version", 99)
    conn.close()
    assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(db)), "newer SMQ", "99")


def test_missing_directory_is_refused(tmp_path):
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "nope" / "q.db"))
    assert_one_line_refusal(result, "does not exist")




def test_read_only_directory_is_refused(tmp_path):
    with tmpfs(tmp_path / "ro", "4m") as mount:
        make_database(mount / "q.db", messages=10)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert_one_line_refusal(start_and_fail(tmp_path, "--dbpath", str(mount / "q.db")), "q.db")


def test_move_aside_starts_fresh_and_keeps_the_damaged_file(start_server, tmp_path):
    db = tmp_path / "q.db"
    make_database(db)
    damage(db, "corrupt")
    damaged = db.read_bytes()
    server = start_server("--on-corrupt", "move-aside", db=db)
    kept = list(tmp_path.glob("q.db.corrupt-*"))
    assert [p.name for p in kept if not p.name.endswith(("-wal", "-shm"))], kept
    main_copy = next(p for p in kept if not p.name.endswith(("-wal", "-shm")))
    assert main_copy.read_bytes() == damaged
    assert "DATABASE DAMAGED" in server.log()
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x")).offset == 1


# -- retention ------------------------------------------------------------------

def produce(stub, topic: str, count: int, size: int = 100) -> list[int]:
    return [stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=b"x" * size)).offset
            for _ in range(count)]


def offsets(stub, topic: str) -> tuple[int, int] | None:
    try:
        return (stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic=topic)).offset,
                stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic=topic)).offset)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        return None


def test_retention_by_count_default_and_bytes_override(start_server, tmp_path):
    server = start_server("--retention-max-messages", "10")
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="count"))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="count", messages=[b"m"] * 25))
    assert offsets(stub, "count") == (16, 25)

    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="bytes"))
    reply = stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="bytes", policy=smq_pb2.TopicPolicy(max_bytes=1000, max_messages=0)))
    assert reply.effective.max_bytes == 1000 and reply.effective.max_messages == 0
    produce(stub, "bytes", 30)  # 100 bytes each: at most 10 may stay
    assert offsets(stub, "bytes") == (21, 30)
    info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic="bytes")).topic
    assert info.stored_bytes == 1000 and info.message_count == 10

    # The override is stored in the database.
    assert server.terminate() == 0
    server = start_server(db=tmp_path / "smq.db")
    policy = server.stub().GetTopicPolicy(smq_pb2.GetTopicPolicyRequest(topic="bytes"))
    assert policy.overrides.max_bytes == 1000 and not policy.overrides.HasField("max_age_seconds")


def test_retention_by_age_trims_without_new_writes(start_server):
    server = start_server()
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="aged"))
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="aged", policy=smq_pb2.TopicPolicy(max_age_seconds=1)))
    produce(stub, "aged", 5)
    eventually(lambda: offsets(stub, "aged") is None, timeout=15, interval=0.2,
               message="the aged messages were not deleted")
    assert produce(stub, "aged", 1) == [6]  # offsets go on


def test_invalid_policy_is_rejected(smq_server):
    stub = smq_server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    for policy in (smq_pb2.TopicPolicy(max_messages=-1), smq_pb2.TopicPolicy(on_full="explode")):
        with pytest.raises(grpc.RpcError) as err:
            stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(topic="t", policy=policy))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the disk budget ---------------------------------------------------------------

def fill_until_refused(stub, topic: str, size: int, limit: int = 5000) -> list[int]:
    acked = []
    for _ in range(limit):
        try:
            acked.append(stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=b"p" * size)).offset)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return acked
    raise AssertionError("the budget was never reached")




def test_page_limit_rejects_then_writes_resume_after_a_trim(start_server, tmp_path):
    server = start_server("--max-db-size", "512KiB")
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    acked = fill_until_refused(stub, "t", 4 * KIB)
    assert len(acked) > 20 and acked == list(range(1, len(acked) + 1))
    # Reads keep working at the limit.
    assert stub.Consume(smq_pb2.ConsumeRequest(topic="t", offset=acked[-1])).message == b"p" * 4 * KIB
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="t", offset=acked[len(acked) // 2]))
    assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"again")).offset == acked[-1] + 1
    assert server.terminate() == 0
    assert integrity(tmp_path / "smq.db") == "ok"


def test_drop_oldest_policy_keeps_accepting_at_the_limit(start_server, tmp_path):
    server = start_server("--max-db-size", "512KiB", "--on-full", "drop-oldest")
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    acked = produce(stub, "t", 400, size=4 * KIB)  # 1.6 MiB through a 512 KiB budget
    assert acked == list(range(1, 401))
    earliest, latest = offsets(stub, "t")
    assert latest == 400 and earliest > 1
    for offset in range(earliest, latest + 1):
        assert stub.Consume(smq_pb2.ConsumeRequest(topic="t", offset=offset)).offset == offset
    assert server.terminate() == 0
    assert integrity(tmp_path / "smq.db") == "ok"


def test_real_full_filesystem(start_server, tmp_path):
    with tmpfs(tmp_path / "small", "3m") as mount:
        ballast = mount / "ballast"
        ballast.write_bytes(b"\0" * 512 * KIB)
        db = mount / "q.db"
        server = start_server("--min-free-space", "0", db=db)
        stub = server.stub()
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
        acked = fill_until_refused(stub, "t", 16 * KIB)
        assert acked, "nothing fit"
        # Reads keep working, the server stays up and answers the next write the same way.
        assert stub.Consume(smq_pb2.ConsumeRequest(topic="t", offset=acked[0])).offset == acked[0]
        with pytest.raises(grpc.RpcError) as err:
            stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"p" * 16 * KIB))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Space freed elsewhere on the filesystem: writes resume by themselves.
        ballast.unlink()
        offset = stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"after")).offset
        assert offset == acked[-1] + 1
        assert server.terminate() == 0
        assert integrity(db) == "ok"
        conn = apsw.Connection(str(db))
        stored = [offset for _, offset, _ in stored_messages(conn)]
        conn.close()
        assert stored == acked + [offset]


def test_space_taken_by_another_file_is_noticed_while_the_budget_is_far(start_server, tmp_path):
    """Far from the floor the writer reuses its measure of free space for a moment
    (retention.ROOM_SECONDS); space another process takes meanwhile must still be seen."""
    with tmpfs(tmp_path / "big", "400m") as mount:  # tmpfs pages cost memory only when written
        server = start_server("--min-free-space", "100MiB", db=mount / "q.db")
        stub = server.stub()
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
        assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"far")).offset == 1
        # The writer's budget is far, so its measure is being reused (the path under test).
        assert shutil.disk_usage(mount).free - 100 * 1024 * KIB > retention.ROOM_TRUSTED_ABOVE
        with open(mount / "ballast", "wb") as ballast:  # leaves < 100 MiB free
            for _ in range(310):
                ballast.write(b"\0" * 1024 * KIB)
        time.sleep(3 * retention.ROOM_SECONDS)
        with pytest.raises(grpc.RpcError) as err:
            stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"near"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (mount / "ballast").unlink()
        assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"again")).offset == 2
        assert server.terminate() == 0


def test_free_space_floor_refuses_before_the_disk_is_full(start_server, tmp_path):
    with tmpfs(tmp_path / "small", "4m") as mount:
        server = start_server("--min-free-space", "2MiB", db=mount / "q.db")
        stub = server.stub()
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
        fill_until_refused(stub, "t", 16 * KIB)
        assert shutil.disk_usage(mount).free >= 1.5 * 1024 * KIB
        assert server.terminate() == 0


def test_a_second_server_on_the_same_database_is_refused(start_server, tmp_path):
    first = start_server()
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "smq.db"))
    assert_one_line_refusal(result, "in use by another SMQ")
    stub = first.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x")).offset == 1
    assert first.terminate() == 0
    start_server(db=tmp_path / "smq.db")  # free again once the first one stopped
