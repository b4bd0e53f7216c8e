"""StreamConsume as docs/wire.md defines it: history from max(offset, earliest), then live
push of each commit, heartbeats (offset -1) while idle, continuing past deleted
messages, stream slots freed by cancellation, UNAVAILABLE on shutdown.

Streams are read by a background thread into a queue, so every wait has a generous
timeout and no test depends on sleeping.
"""
from __future__ import annotations

import concurrent.futures
import queue
import signal
import threading
import time

import grpc
import pytest

from support.poll import eventually
from support.servers import ServerProcess, make_topic
from smq._proto import smq_pb2 as pb

TIMEOUT = 20.0  # for unary calls
WAIT = 10.0     # for something a stream must deliver "promptly" (generous: shared machine)
HEARTBEAT = pb.ConsumeResponse(message=b"", offset=-1)

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


class StreamReader:
    """Reads a StreamConsume call on a thread; the test takes responses with a timeout."""

    _END = object()

    def __init__(self, stub, topic: str, offset: int) -> None:
        self.call = stub.StreamConsume(pb.ConsumeRequest(topic=topic, offset=offset))
        self._responses: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
            self._responses.put(self._END)
        except grpc.RpcError as error:
            self._responses.put(error)

    def next(self, timeout: float = WAIT) -> pb.ConsumeResponse:
        """The next response, heartbeats included."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived on the stream in {timeout}s") from None
        if isinstance(item, grpc.RpcError):
            raise item
        if item is self._END:
            raise AssertionError("the stream ended (status OK) while it should stay open")
        return item

    def next_message(self, timeout: float = WAIT) -> pb.ConsumeResponse:
        """The next response that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.next(max(deadline - time.monotonic(), 0.001))
            if response.offset != -1:
                return response

    def messages(self, count: int, timeout: float = WAIT) -> list[tuple[int, bytes]]:
        return [(r.offset, r.message) for r in (self.next_message(timeout) for _ in range(count))]

    def error(self, timeout: float = WAIT) -> grpc.RpcError:
        """The status the stream ends with (skipping what it still sends)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.next(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as error:
                return error

    def cancel(self) -> None:
        self.call.cancel()


@pytest.fixture
def readers():
    """open(stub, topic, offset) -> StreamReader; all are cancelled after the test."""
    opened: list[StreamReader] = []

    def open_reader(stub, topic: str, offset: int) -> StreamReader:
        reader = StreamReader(stub, topic, offset)
        opened.append(reader)
        return reader

    yield open_reader
    for reader in opened:
        reader.cancel()


def produce(stub, topic: str, message: bytes) -> int:
    return stub.Produce(pb.ProduceRequest(topic=topic, message=message), timeout=TIMEOUT).offset


def delete_until(stub, topic: str, offset: int) -> None:
    stub.DeleteUntilOffset(pb.DeleteUntilOffsetRequest(topic=topic, offset=offset), timeout=TIMEOUT)


def m(*offsets: int) -> list[tuple[int, bytes]]:
    """make_topic's messages at these offsets."""
    return [(o, f"m{o}".encode()) for o in offsets]


# -- history, then live ---------------------------------------------------------------

def test_history_then_live_push(stub, readers):
    make_topic(stub, "t", 3)
    reader = readers(stub, "t", 1)
    assert reader.messages(3) == m(1, 2, 3)
    assert produce(stub, "t", b"live") == 4
    assert reader.messages(1) == [(4, b"live")]
    make_topic(stub, "t", 2)  # m1, m2 again, now at offsets 5, 6
    assert reader.messages(2) == [(5, b"m1"), (6, b"m2")]


def test_live_messages_are_pushed_not_polled(start_server, readers):
    """20 produce -> arrive round trips. Each waits for the previous message to arrive,
    so a server that polls (the original sleeps up to 1 s) needs ~10 s in all; a push
    takes milliseconds each. The 5 s bound is generous for a loaded machine."""
    stub = start_server("--durability", "normal").stub()  # no fsync in the measured loop
    make_topic(stub, "t")
    reader = readers(stub, "t", 0)
    started = time.monotonic()
    for i in range(1, 21):
        assert produce(stub, "t", b"%d" % i) == i
        assert reader.messages(1) == [(i, b"%d" % i)]
    assert time.monotonic() - started < 5.0


def stream_produce_asserting(stub, requests) -> pb.ProduceResponse:
    """StreamProduce from a generator that asserts between messages: its failure comes
    out as itself, not as gRPC's "Exception iterating requests!"."""
    failures: list[AssertionError] = []

    def guarded():
        try:
            yield from requests
        except AssertionError as exc:
            failures.append(exc)

    reply = stub.StreamProduce(guarded(), timeout=TIMEOUT)
    if failures:
        raise failures[0]
    return reply


def test_a_slow_stream_produce_is_committed_message_by_message(stub, readers):
    """StreamProduce batches a fast stream's messages into larger commits; a slow one's
    messages must still each be committed (and pushed to readers) while the stream is
    open, not held until the next message or the end of the stream."""
    make_topic(stub, "slow")
    reader = readers(stub, "slow", 0)
    seen = []

    def requests():
        for i in range(1, 6):
            yield pb.ProduceRequest(topic="slow", message=b"s%d" % i)
            seen.extend(reader.messages(1))  # the next message is sent only once this arrived

    assert stream_produce_asserting(stub, requests()).offset == 5
    assert seen == [(i, b"s%d" % i) for i in range(1, 6)]


def test_a_burst_on_stream_produce_is_committed_while_the_stream_pauses(stub, readers):
    """The tail of a fast burst is committed without waiting for the next message."""
    make_topic(stub, "burst")
    reader = readers(stub, "burst", 0)
    arrived = []

    def requests():
        for burst in range(3):
            for i in range(300):
                yield pb.ProduceRequest(topic="burst", message=b"b%d-%d" % (burst, i))
            arrived.extend(reader.messages(300, timeout=10))  # the stream stays open meanwhile

    assert stream_produce_asserting(stub, requests()).offset == 900
    assert arrived == [(n + 1, b"b%d-%d" % divmod(n, 300)) for n in range(900)]


def test_history_larger_than_one_read_arrives_whole_and_in_order(stub, readers):
    payloads = [bytes([i]) * (512 * 1024) for i in range(1, 9)]  # 4 MiB: more than one page
    make_topic(stub, "t")
    stub.StreamProduce(iter(pb.ProduceRequest(topic="t", message=p) for p in payloads), timeout=TIMEOUT)
    reader = readers(stub, "t", 0)
    assert reader.messages(8) == list(enumerate(payloads, start=1))
    assert produce(stub, "t", b"live") == 9
    assert reader.messages(1) == [(9, b"live")]


def test_stream_on_an_empty_topic_waits_then_gets_the_first_message(stub, readers):
    make_topic(stub, "t")
    reader = readers(stub, "t", 0)
    assert reader.next() == HEARTBEAT  # open and idle (heartbeat interval 0.2 s)
    assert produce(stub, "t", b"first") == 1
    assert reader.messages(1) == [(1, b"first")]


def test_stream_on_a_topic_trimmed_empty_gets_the_next_offset(stub, readers):
    make_topic(stub, "t", 3)
    delete_until(stub, "t", 3)
    reader = readers(stub, "t", 0)
    assert reader.next() == reader.next() == HEARTBEAT  # it waits, idle, like on a new topic
    assert produce(stub, "t", b"after") == 4
    assert reader.messages(1) == [(4, b"after")]


def test_heartbeats_while_idle(stub, readers):
    make_topic(stub, "t", 2)
    reader = readers(stub, "t", 1)
    assert reader.messages(2) == m(1, 2)
    for _ in range(3):  # exactly ConsumeResponse{message: b"", offset: -1}, repeatedly
        assert reader.next() == HEARTBEAT
    assert produce(stub, "t", b"m3") == 3
    assert reader.messages(1) == [(3, b"m3")]


# -- where a stream starts ---------------------------------------------------------------

@pytest.mark.parametrize("offset, first", [(0, 3), (-5, 3), (1, 3), (3, 3), (4, 4), (5, 5)])
def test_stream_starts_at_max_of_offset_and_earliest(stub, readers, offset, first):
    make_topic(stub, "t", 5)
    delete_until(stub, "t", 2)
    reader = readers(stub, "t", offset)
    assert reader.messages(6 - first) == m(*range(first, 6))


def test_stream_from_above_latest_waits_for_that_offset(stub, readers):
    make_topic(stub, "t", 2)
    reader = readers(stub, "t", 4)
    produce(stub, "t", b"m3")  # offset 3: before the requested start, never sent
    produce(stub, "t", b"m4")
    assert reader.messages(1) == [(4, b"m4")]


def test_stream_continues_from_new_earliest_when_messages_ahead_are_deleted(smq_server, stub):
    """The consumer is slow: 10 messages of 1 MiB, and a channel whose flow-control
    window stays small (no BDP probing), so the server cannot run ahead of the reader.
    Deleting 1..7 while the stream is at its start must not stall or break it."""
    payloads = [bytes([i]) * 1024**2 for i in range(1, 11)]
    make_topic(stub, "t")
    assert stub.StreamProduce(iter(pb.ProduceRequest(topic="t", message=p) for p in payloads),
                              timeout=TIMEOUT).offset == 10
    channel = grpc.insecure_channel(smq_server.address, options=[
        ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * 1024)])
    slow = type(stub)(channel)
    stream = slow.StreamConsume(pb.ConsumeRequest(topic="t", offset=1), timeout=60)
    try:
        first = next(stream)
        assert (first.offset, first.message) == (1, payloads[0])
        delete_until(stub, "t", 7)
        offsets = [1]
        for response in stream:
            if response.offset == -1:
                continue
            assert response.message == payloads[response.offset - 1]
            offsets.append(response.offset)
            if response.offset == 10:
                break
        before = [o for o in offsets if o <= 7]
        assert before == list(range(1, len(before) + 1))  # what it had already read, in order
        assert len(before) < 7, "the stream read everything before the delete; nothing tested"
        assert offsets[len(before):] == [8, 9, 10]  # then on from the new earliest
        produce(stub, "t", b"live")
        response = next(r for r in stream if r.offset != -1)
        assert (response.offset, response.message) == (11, b"live")
    finally:
        stream.cancel()
        channel.close()


# -- several streams ---------------------------------------------------------------------

def test_several_consumers_each_see_every_message_once_in_order(stub, readers):
    make_topic(stub, "t", 5)
    consumers = [readers(stub, "t", 0) for _ in range(3)]
    consumers.append(readers(stub, "t", 1))

    def producer(worker: int) -> None:
        for i in range(15):
            produce(stub, "t", f"w{worker}-{i}".encode())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(producer, range(2)))
    everything = stub.BulkRetrieve(pb.BulkRetrieveRequest(topic="t", start_offset=1, limit=100),
                                   timeout=TIMEOUT)
    expected = [(r.offset, r.message) for r in everything.messages]
    assert [o for o, _ in expected] == list(range(1, 36))
    for consumer in consumers:
        assert consumer.messages(35) == expected
    produce(stub, "t", b"one more")  # nothing was sent twice: the next one is 36
    for consumer in consumers:
        assert consumer.messages(1) == [(36, b"one more")]


def test_streams_on_different_topics_get_only_their_own(stub, readers):
    make_topic(stub, "a")
    make_topic(stub, "b")
    reader_a, reader_b = readers(stub, "a", 0), readers(stub, "b", 0)
    produce(stub, "a", b"for a")
    produce(stub, "b", b"for b")
    assert reader_a.messages(1) == [(1, b"for a")]
    assert reader_b.messages(1) == [(1, b"for b")]


# -- stream slots ----------------------------------------------------------------------

def open_stream_when_a_slot_is_free(stub, topic: str, readers, within: float = WAIT) -> StreamReader:
    """A stream that got a slot: retries RESOURCE_EXHAUSTED until `within` seconds pass."""
    def opened() -> StreamReader | None:
        reader = readers(stub, topic, 0)
        try:
            reader.next()
            return reader
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return None

    return eventually(opened, timeout=within, message=f"no stream slot on {topic!r}")


def test_too_many_streams_then_cancel_frees_a_slot(start_server, readers):
    server = start_server("--max-streams", "2", "--heartbeat-interval", "0.2")
    # At --max-streams a connection's new stream on a topic it already streams replaces
    # its oldest one there: the slots themselves are checked from another connection.
    stub, other = server.stub(own_connection=True), server.stub(own_connection=True)
    make_topic(stub, "t", 1)
    first, second = readers(stub, "t", 0), readers(stub, "t", 0)
    assert first.next() == second.next() == pb.ConsumeResponse(message=b"m1", offset=1)

    third = readers(other, "t", 0)
    assert third.error().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:  # StreamProduce needs a stream slot too
        stub.StreamProduce(iter([pb.ProduceRequest(topic="t", message=b"x")]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    first.cancel()
    fourth = open_stream_when_a_slot_is_free(other, "t", readers)
    assert produce(stub, "t", b"m2") == 2
    for reader in (second, fourth):
        assert reader.next_message() == pb.ConsumeResponse(message=b"m2", offset=2)


def test_streams_cancelled_at_once_do_not_keep_their_slots(start_server, readers):
    """Open-and-cancel storms (a client reconnecting in a loop) must not leave slots held
    until the next heartbeat (60 s here) by streams cancelled before they were set up."""
    server = start_server("--max-streams", "2", "--heartbeat-interval", "60")
    stub = server.stub(own_connection=True)
    make_topic(stub, "t", 1)
    for i in range(300):
        call = stub.StreamConsume(pb.ConsumeRequest(topic="t", offset=2))
        if i % 3:
            time.sleep(0.0003 * (i % 7))  # vary where in the server's setup the cancel lands
        call.cancel()
    other = server.stub(own_connection=True)  # see the test above
    both = [open_stream_when_a_slot_is_free(other, "t", readers) for _ in range(2)]
    assert [reader.call.is_active() for reader in both] == [True, True]


# -- shutdown ------------------------------------------------------------------------------

def test_open_streams_end_with_unavailable_on_shutdown(start_server, readers):
    server: ServerProcess = start_server("--heartbeat-interval", "0.2")
    stub = server.stub()
    make_topic(stub, "t", 1)
    waiting, idle = readers(stub, "t", 0), readers(stub, "t", 5)
    assert waiting.next() == pb.ConsumeResponse(message=b"m1", offset=1)
    assert idle.next() == HEARTBEAT
    server.proc.send_signal(signal.SIGTERM)  # drain
    for reader in (waiting, idle):
        assert reader.error(TIMEOUT).code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(TIMEOUT) == 0
