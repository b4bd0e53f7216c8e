"""smq/server/write_lanes.py: small writes go before large ones, in turns, and a group is
all small or all large. In-process; the last test drives the real writer and storage."""
from __future__ import annotations

import threading
import time

import grpc

from smq._proto import smq_pb2
from smq.server.ops import StreamAppend, WriteOp
from smq.server.schema import StorageOptions
from smq.server.storage import Storage
from smq.server.write_lanes import LARGE_GROUP_BYTES, MAX_GROUP_MESSAGES, STOP, WriteLanes
from smq.server.write_queue import SMALL_WRITE
from smq.server.writer import GroupCommitWriter

LARGE = SMALL_WRITE + 1


class Op(WriteOp):
    """A write of `size` bytes; applying it records its name in `log`."""

    def __init__(self, name: str, size: int, log: list[str] | None = None,
                 messages: int = 1, source: str | None = None) -> None:
        super().__init__()
        self.name, self.bytes, self.messages, self.log = name, size, messages, log
        self.source = source
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def apply(self, writer) -> None:
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        if self.log is not None:
            self.log.append(self.name)
        self.result = True


def names(group) -> list[str]:
    return [op.name for op in group]


def lanes_with(*ops) -> WriteLanes:
    lanes = WriteLanes()
    for op in ops:
        lanes.put(op)
    assert lanes.wait_for_work(0)
    return lanes


def test_small_writes_queued_after_large_ones_go_first_then_they_take_turns():
    lanes = lanes_with(Op("L1", LARGE), Op("s1", 100), Op("L2", LARGE), Op("s2", 100))
    assert names(lanes.next_group(1, 0)) == ["s1", "s2"]
    lanes.put(Op("s3", 100))
    assert names(lanes.next_group(1, 0)) == ["L1", "L2"]  # large ones waited one small group
    lanes.put(Op("L3", LARGE))
    assert names(lanes.next_group(1, 0)) == ["s3"]
    assert names(lanes.next_group(1, 0)) == ["L3"]
    assert lanes.empty() and not lanes.wait_for_work(0)


def test_a_connection_s_small_write_never_overtakes_its_own_large_one():
    # A client whose large write timed out sends its next, small one: the large one may
    # still be committed, and then before the small one.
    lanes = lanes_with(Op("X-large", LARGE, source="X"), Op("X-small", 100, source="X"),
                       Op("Y-small", 100, source="Y"))
    assert names(lanes.next_group(1, 0)) == ["Y-small"]
    assert names(lanes.next_group(1, 0)) == ["X-large", "X-small"]
    lanes.put(Op("X-after", 100, source="X"))  # X has nothing large waiting any more
    lanes.put(Op("Y-large", LARGE, source="Y"))
    assert names(lanes.next_group(1, 0)) == ["X-after"]
    assert names(lanes.next_group(1, 0)) == ["Y-large"]


def test_a_large_group_holds_about_a_mebibyte_and_always_one_op():
    part = LARGE_GROUP_BYTES * 2 // 5
    lanes = lanes_with(Op("A", part), Op("B", part), Op("C", part),
                       Op("D", 3 * LARGE_GROUP_BYTES))
    assert names(lanes.next_group(1, 0)) == ["A", "B"]
    assert names(lanes.next_group(1, 0)) == ["C"]
    assert names(lanes.next_group(1, 0)) == ["D"]  # larger than the cap: alone


def test_a_small_group_holds_up_to_its_message_cap():
    half = MAX_GROUP_MESSAGES // 2
    lanes = lanes_with(*(Op(name, 100, messages=half) for name in "abc"))
    assert names(lanes.next_group(1, 0)) == ["a", "b"]
    assert names(lanes.next_group(1, 0)) == ["c"]


def test_a_small_group_waits_for_the_writers_expected_but_not_for_large_ones():
    lanes = lanes_with(Op("s1", 100))
    arrivals = [Op("L1", LARGE), Op("s2", 100)]
    feeder = threading.Timer(0.05, lambda: [lanes.put(op) for op in arrivals])
    feeder.start()
    group = lanes.next_group(expected=2, wait_seconds=5)
    feeder.join()
    assert names(group) == ["s1", "s2"]
    assert names(lanes.next_group(1, 0)) == ["L1"]


def test_a_stream_op_that_grew_large_while_it_waited_goes_with_the_large_ones():
    stream = StreamAppend("t", b"x" * 100, 0.0)
    lanes = lanes_with(stream, Op("s1", 100))
    while stream.add("t", b"y" * 1000):  # the stream's messages keep coming meanwhile
        pass
    assert stream.bytes > SMALL_WRITE
    assert names(lanes.next_group(1, 0)) == ["s1"]
    assert lanes.next_group(1, 0) == [stream]
    assert not stream.add("t", b"z"), "sealed once taken into a group"


def test_stop_comes_after_every_write_queued_before_it():
    lanes = lanes_with(Op("L1", LARGE), Op("s1", 100))
    lanes.put(STOP)
    assert names(lanes.next_group(1, 0)) == ["s1"]
    assert lanes.stopping
    assert lanes.wait_for_work(10)
    assert names(lanes.next_group(1, 0)) == ["L1"]
    assert not lanes.wait_for_work(10)  # at once: nothing comes after STOP


def test_the_writer_commits_small_writes_queued_behind_a_large_one_before_it(tmp_path):
    storage = Storage(str(tmp_path / "w.db"), StorageOptions(durability="normal"))
    writer = GroupCommitWriter(storage)
    log: list[str] = []
    try:
        first = Op("L0", LARGE, log)
        first.hold = threading.Event()
        writer.submit(first)
        assert first.entered.wait(10)  # the writer is inside L0's transaction
        queued = [Op("L1", LARGE, log), Op("s1", 100, log), Op("L2", LARGE, log),
                  Op("s2", 100, log)]
        for op in queued:
            writer.submit(op)
        first.hold.set()
        for op in [first, *queued]:
            assert op.wait(10)
        assert log == ["L0", "s1", "s2", "L1", "L2"]
    finally:
        writer.close(10)
        storage.close()


def test_a_write_given_up_on_is_not_overtaken_by_the_callers_next_one(start_server):
    """On a real server whose large lane is kept busy by 8 streams of 64 KiB messages,
    one caller sends ProduceBatches of 300 KB with a 50 ms deadline (they time out in
    the lane, and may still be committed), each followed by a small Produce: the topic
    holds the caller's messages in the order it sent them (hostile review: it did not)."""
    server = start_server("--durability", "normal")
    stub = server.stub(own_connection=True)
    for topic in ("busy", "mine"):
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=10)
    stop = threading.Event()

    def flood() -> None:
        def requests():
            while not stop.is_set():
                yield smq_pb2.ProduceRequest(topic="busy", message=b"s" * 65536)
        try:
            server.stub(own_connection=True).StreamProduce(requests(), timeout=120)
        except grpc.RpcError:
            pass

    streams = [threading.Thread(target=flood) for _ in range(8)]
    for thread in streams:
        thread.start()
    given_up = 0
    try:
        for seq in range(0, 40, 2):
            try:
                stub.ProduceBatch(smq_pb2.ProduceBatchRequest(
                    topic="mine", messages=[b"%04d" % seq + bytes(300_000)]), timeout=0.05)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                given_up += 1
            stub.Produce(smq_pb2.ProduceRequest(topic="mine", message=b"%04d" % (seq + 1)),
                         timeout=30)
    finally:
        stop.set()
        for thread in streams:
            thread.join(30)
    assert given_up, "no write was given up on: the lanes were not busy"
    time.sleep(1)  # a batch given up on may still be committed
    sent: list[int] = []
    offset = 1
    while True:  # pages: a reply holds about ten of the large messages
        reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(
            topic="mine", start_offset=offset, limit=100), timeout=10)
        if not reply.messages:
            break
        sent += [int(m.message[:4]) for m in reply.messages]
        offset = reply.messages[-1].offset + 1
    assert sent == sorted(sent)
    assert [s for s in sent if s % 2] == list(range(1, 40, 2))  # every small one, once
