"""smq/server/write_queue.py: large writes take room before they go to the writer, so that a
small write never waits behind more than a few of them; with real threads."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from support.poll import eventually
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.errors import Overloaded
from smq.server import Server
from smq.server.config import ServerConfig as Config
from smq.server.write_queue import SMALL_WRITE, WriteQueue

MIB = 1024**2


class Write:
    """Stands for a stream's write: done once the writer committed it."""

    def __init__(self) -> None:
        self.committed = threading.Event()

    def done(self) -> bool:
        return self.committed.is_set()


def hold_room(queue: WriteQueue, size: int, release: threading.Event) -> threading.Thread:
    """A call whose write of `size` holds its room until `release` is set (its commit)."""
    taken = threading.Event()

    def write():
        with queue.room(size):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=write)
    thread.start()
    assert taken.wait(5)
    return thread


def test_small_writes_never_wait():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release = threading.Event()
    thread = hold_room(queue, 4 * MIB, release)
    started = time.monotonic()
    with queue.room(SMALL_WRITE):
        assert queue.queued == 4 * MIB
    queue.room_until_done(Write(), 4 * MIB, large=False)
    assert time.monotonic() - started < 0.1
    release.set()
    thread.join()
    assert queue.queued == 0


def test_a_large_write_waits_for_room_then_goes():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    release = threading.Event()
    thread = hold_room(queue, 3 * MIB, release)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    with queue.room(2 * MIB):
        assert queue.queued == 2 * MIB
    assert 0.1 < time.monotonic() - started < 3
    thread.join()


def test_a_stream_write_holds_room_until_the_writer_is_done_with_it():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    write = Write()
    queue.room_until_done(write, 4 * MIB, large=True)
    assert queue.queued == 4 * MIB
    threading.Timer(0.2, write.committed.set).start()  # nobody tells the queue: it looks
    started = time.monotonic()
    with queue.room(MIB):
        assert queue.queued == MIB
    assert 0.1 < time.monotonic() - started < 3


def test_a_write_larger_than_the_limit_goes_alone():
    queue = WriteQueue(limit=4 * MIB, wait_seconds=5)
    with queue.room(10 * MIB):
        assert queue.queued == 10 * MIB


def test_past_the_waiting_bound_and_the_wait_writes_are_refused():
    queue = WriteQueue(limit=4 * MIB, max_waiting=1, wait_seconds=0.5)
    release = threading.Event()
    holder = hold_room(queue, 4 * MIB, release)
    outcomes: list[str] = []

    def wait_for_room():
        try:
            with queue.room(MIB):
                outcomes.append("written")
        except Overloaded as exc:
            outcomes.append(str(exc))

    waiter = threading.Thread(target=wait_for_room)
    waiter.start()
    time.sleep(0.1)
    with pytest.raises(Overloaded, match="too many large writes queued"):
        with queue.room(MIB):  # one waits already: refused at once
            pass
    waiter.join()
    assert len(outcomes) == 1 and "too many large writes queued" in outcomes[0]
    release.set()
    holder.join()
    assert queue.queued == 0


def test_stream_writes_wait_longer_and_are_not_refused_for_waiting_unary_writes():
    queue = WriteQueue(limit=4 * MIB, max_waiting=1, wait_seconds=0.2, stream_wait_seconds=5)
    first = Write()
    queue.room_until_done(first, 4 * MIB, large=True)
    waiters = []
    for _ in range(3):  # three streams wait at once, past the unary writers' bound
        write = Write()
        thread = threading.Thread(target=queue.room_until_done, args=(write, 4 * MIB, True))
        thread.start()
        waiters.append((thread, write))
    time.sleep(0.5)  # longer than a unary write would wait
    first.committed.set()
    def all_got_room() -> bool:
        for thread, write in waiters:  # each that got room is written, and the next goes
            if not thread.is_alive():
                write.committed.set()
        return not any(thread.is_alive() for thread, _ in waiters)

    eventually(all_got_room, timeout=10, interval=0.01)
    for thread, write in waiters:
        assert not thread.is_alive()
        write.committed.set()
    assert queue.queued == 0


def test_a_write_whose_caller_gave_up_while_it_waited_for_room_is_not_written(tmp_path):
    """A real server whose write queue is full: a 300 KB ProduceBatch times out while it
    waits for room, and its caller sends a small Produce at once. The batch must not be
    stored after it (the hostile review's order violation): it is not stored at all,
    since nobody was told it was."""
    server = Server(Config(dbpath=str(tmp_path / "smq.db"), port=0, bind="127.0.0.1",
                           durability="normal")).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"), timeout=10)
        held = Write()  # a stream's large write waiting for the disk: the queue is full
        server.service.write_queue.room_until_done(held, 4 * MIB, large=True)
        with pytest.raises(grpc.RpcError) as given_up:
            stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[b"B" * 300_000]),
                              timeout=0.2)
        assert given_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"P"), timeout=10).offset == 1
        held.committed.set()  # the batch gets room now: it is dropped, not written
        time.sleep(server.service.write_queue.wait_seconds)
        reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="t", start_offset=1, limit=10),
                                  timeout=10)
        assert [m.message for m in reply.messages] == [b"P"]
        assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"Q"), timeout=10).offset == 2
        channel.close()
    finally:
        server.stop(0)
