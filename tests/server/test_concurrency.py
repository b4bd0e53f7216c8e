"""Many producers and consumers at once: every consumer sees every message exactly once,
in offset order, each producer's order kept; concurrent StreamProduce; and the limits
(--max-streams, the bounded worker pool) answer RESOURCE_EXHAUSTED instead of hanging."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support.poll import eventually
from support.servers import ServerProcess
from smq._proto import smq_pb2

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

RPC_TIMEOUT = 60
PRODUCERS, PER_PRODUCER, CONSUMERS = 4, 200, 3


def run_threads(threads: list[threading.Thread], timeout: float) -> None:
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running: a call hung"


class Consumer(threading.Thread):
    """StreamConsume from `offset` until `expected` messages came (heartbeats skipped)."""

    def __init__(self, server: ServerProcess, topic: str, expected: int, offset: int = 0) -> None:
        super().__init__(daemon=True)
        self.stub = server.stub()
        self.topic, self.expected, self.offset = topic, expected, offset
        self.subscribed = threading.Event()  # the first reply (a heartbeat) arrived
        self.received: list[tuple[int, bytes]] = []
        self.heartbeats = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        call = self.stub.StreamConsume(smq_pb2.ConsumeRequest(topic=self.topic, offset=self.offset),
                                       timeout=RPC_TIMEOUT)
        try:
            for reply in call:
                self.subscribed.set()
                if reply.offset == -1:
                    self.heartbeats += 1
                    continue
                self.received.append((reply.offset, reply.message))
                if len(self.received) >= self.expected:
                    break
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            call.cancel()
            self.subscribed.set()


def test_producers_and_stream_consumers_see_everything_once_in_order(start_server):
    server = start_server("--heartbeat-interval", "0.2")
    server.stub().CreateTopic(smq_pb2.CreateTopicRequest(topic="fan"), timeout=RPC_TIMEOUT)
    total = PRODUCERS * PER_PRODUCER
    consumers = [Consumer(server, "fan", total) for _ in range(CONSUMERS)]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:  # all waiting on the empty topic before anything is produced
        assert consumer.subscribed.wait(RPC_TIMEOUT)
        assert consumer.error is None, consumer.error

    acked: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def producer(n: int) -> None:
        stub = server.stub()
        offsets = []
        try:
            for i in range(PER_PRODUCER):
                offsets.append(stub.Produce(smq_pb2.ProduceRequest(
                    topic="fan", message=f"{n}:{i}".encode()), timeout=RPC_TIMEOUT).offset)
        except BaseException as exc:
            errors.append(exc)
        acked[n] = offsets

    run_threads([threading.Thread(target=producer, args=(n,)) for n in range(PRODUCERS)], 120)
    assert not errors, errors
    for offsets in acked.values():
        assert offsets == sorted(offsets)  # one producer's messages keep their order
    all_acked = sorted(o for offsets in acked.values() for o in offsets)
    assert all_acked == list(range(1, total + 1))  # every offset given once, no gap

    expected = {acked[n][i]: f"{n}:{i}".encode() for n in range(PRODUCERS) for i in range(PER_PRODUCER)}
    for consumer in consumers:
        consumer.join(RPC_TIMEOUT)
        assert not consumer.is_alive()
        assert consumer.error is None, consumer.error
        offsets = [offset for offset, _ in consumer.received]
        assert offsets == list(range(1, total + 1)), "not every message once in offset order"
        assert dict(consumer.received) == expected
        assert consumer.heartbeats >= 1


def stream_of(topic: str, prefix: str, count: int) -> Iterator[smq_pb2.ProduceRequest]:
    for i in range(count):
        yield smq_pb2.ProduceRequest(topic=topic, message=f"{prefix}{i}".encode())


def test_concurrent_stream_produce(start_server):
    server = start_server()
    stub = server.stub()
    for topic in ("left", "both"):
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=RPC_TIMEOUT)
    count = 500
    last: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def streamer(name: str, topic: str) -> None:
        try:
            start.wait(RPC_TIMEOUT)
            reply = server.stub().StreamProduce(stream_of(topic, name, count), timeout=RPC_TIMEOUT)
            last[name] = reply.offset
        except BaseException as exc:
            errors.append(exc)

    run_threads([threading.Thread(target=streamer, args=("x", "both")),
                 threading.Thread(target=streamer, args=("y", "both"))], 120)
    assert not errors, errors
    stored = {}
    start_offset = 1
    while True:
        page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="both", start_offset=start_offset,
                                                             limit=1000), timeout=RPC_TIMEOUT)
        if not page.count:
            break
        stored.update((m.offset, m.message) for m in page.messages)
        start_offset = page.next_offset
    assert sorted(stored) == list(range(1, 2 * count + 1))
    for name in ("x", "y"):
        mine = sorted((o, p) for o, p in stored.items() if p.startswith(name.encode()))
        assert [p for _, p in mine] == [f"{name}{i}".encode() for i in range(count)]
        assert last[name] == mine[-1][0]  # the reply is the stream's own last offset
    # A stream naming several topics appends each in its own order.
    mixed = [smq_pb2.ProduceRequest(topic=t, message=b"m") for t in ("left", "both", "left")]
    assert stub.StreamProduce(iter(mixed), timeout=RPC_TIMEOUT).offset == 2
    assert stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic="both"),
                                timeout=RPC_TIMEOUT).offset == 2 * count + 1


# -- limits ---------------------------------------------------------------------------------------

def first_reply(call) -> smq_pb2.ConsumeResponse:
    return next(iter(call))


def test_max_streams_refuses_streams_of_other_connections_and_topics(start_server):
    server = start_server("--max-streams", "2", "--heartbeat-interval", "0.2")
    stub = server.stub(own_connection=True)
    for topic in ("s", "t"):
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=RPC_TIMEOUT)
    open_calls = [stub.StreamConsume(smq_pb2.ConsumeRequest(topic="s", offset=0), timeout=RPC_TIMEOUT)
                  for _ in range(2)]
    for call in open_calls:
        assert first_reply(call).offset == -1  # a heartbeat: the stream holds its slot

    other = server.stub(own_connection=True)
    refused = {"another connection's stream on the same topic":
               other.StreamConsume(smq_pb2.ConsumeRequest(topic="s", offset=0), timeout=RPC_TIMEOUT),
               "another connection's Subscribe":
               other.Subscribe(smq_pb2.SubscribeRequest(topic="s", offset=0), timeout=RPC_TIMEOUT),
               "the same connection's stream on another topic":
               stub.StreamConsume(smq_pb2.ConsumeRequest(topic="t", offset=0), timeout=RPC_TIMEOUT)}
    for what, call in refused.items():
        with pytest.raises(grpc.RpcError) as info:
            first_reply(call)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, what
    with pytest.raises(grpc.RpcError) as info:
        stub.StreamProduce(stream_of("s", "p", 1), timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Unary calls are not streams: they still work.
    assert stub.Produce(smq_pb2.ProduceRequest(topic="s", message=b"u"), timeout=RPC_TIMEOUT).offset == 1
    assert all(call.is_active() for call in open_calls)  # nobody else's stream was ended

    open_calls[0].cancel()  # frees a slot once the server notices the cancellation

    def slot_free() -> bool:
        retry = other.StreamConsume(smq_pb2.ConsumeRequest(topic="s", offset=0), timeout=RPC_TIMEOUT)
        try:
            assert first_reply(retry).offset == 1
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        finally:
            retry.cancel()

    eventually(slot_free, timeout=20, message="the cancelled stream's slot was never freed")
    open_calls[1].cancel()


def test_at_max_streams_a_connection_streaming_a_topic_again_replaces_its_oldest_stream(start_server):
    """The original Go client leaves a StreamConsume open when its callback stops it; a
    program doing that in a loop must go on working, on one connection, for ever."""
    # --workers 1: gRPC admits max-streams + 1 calls per connection, so an ended stream
    # that gRPC still counts (kept alive by a reference) shows at once.
    server = start_server("--max-streams", "2", "--workers", "1", "--heartbeat-interval", "0.2")
    stub = server.stub(own_connection=True)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="s"), timeout=RPC_TIMEOUT)
    stub.Produce(smq_pb2.ProduceRequest(topic="s", message=b"m1"), timeout=RPC_TIMEOUT)
    opened = []
    for n in range(30):
        call = (stub.StreamConsume(smq_pb2.ConsumeRequest(topic="s", offset=1), timeout=RPC_TIMEOUT)
                if n % 2 else stub.Subscribe(smq_pb2.SubscribeRequest(topic="s", offset=1), timeout=RPC_TIMEOUT))
        assert first_reply(call) is not None, f"stream {n + 1}"
        opened.append(call)
        if len(opened) > 2:  # the oldest one was ended for it
            with pytest.raises(grpc.RpcError) as info:
                for _ in opened[-3]:
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED
    assert [call.is_active() for call in opened[-2:]] == [True, True]
    # A stream on a missing topic is NOT_FOUND, even at the cap (not RESOURCE_EXHAUSTED).
    for missing in (stub.StreamConsume(smq_pb2.ConsumeRequest(topic="gone", offset=1), timeout=RPC_TIMEOUT),
                    stub.Subscribe(smq_pb2.SubscribeRequest(topic="gone", offset=1), timeout=RPC_TIMEOUT)):
        with pytest.raises(grpc.RpcError) as info:
            first_reply(missing)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [call.is_active() for call in opened[-2:]] == [True, True]
    for call in opened[-2:]:
        call.cancel()


def test_bounded_worker_pool_answers_or_refuses_never_hangs(start_server):
    server = start_server("--workers", "1", "--max-streams", "1")
    server.stub().CreateTopic(smq_pb2.CreateTopicRequest(topic="busy"), timeout=RPC_TIMEOUT)
    callers = 100
    start = threading.Barrier(callers)
    # Separate connections, as from many clients: one connection gets only a few calls
    # admitted at once and the rest wait in the client, which is not what is tested here.
    stubs = [server.stub(own_connection=True) for _ in range(50)]
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        start.wait(RPC_TIMEOUT)
        try:
            stubs[n % len(stubs)].Produce(
                smq_pb2.ProduceRequest(topic="busy", message=f"{n}".encode()), timeout=RPC_TIMEOUT)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        with lock:
            codes.append(code)

    run_threads([threading.Thread(target=caller, args=(n,)) for n in range(callers)], 2 * RPC_TIMEOUT)
    assert len(codes) == callers
    unexpected = [c for c in codes if c not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    assert not unexpected, unexpected
    accepted = codes.count(grpc.StatusCode.OK)
    assert accepted >= 1
    # 100 calls released together against 2 threads and 4 queue places: the bound shows.
    assert accepted < callers, "no call was refused: the worker pool is not bounded"
    # Refused calls wrote nothing; accepted ones are all there.
    latest = server.stub().GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic="busy"),
                                           timeout=RPC_TIMEOUT).offset
    assert latest == accepted
    server.stub().Connect(smq_pb2.ConnectRequest(), timeout=RPC_TIMEOUT)  # still healthy


def test_idle_reflection_streams_cannot_starve_unary_calls(start_server):
    """Reflection is a stream like any other: idle ones (a client that opened the stream
    and went quiet) must not take the unary calls' threads and make them hang."""
    server = start_server("--workers", "1", "--max-streams", "1")
    quiet = threading.Event()

    def one_question() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        quiet.wait(RPC_TIMEOUT)  # then silence, the stream left open

    calls = []
    try:
        for _ in range(2):  # as many as the server has threads
            call = reflection_pb2_grpc.ServerReflectionStub(server.channel()).ServerReflectionInfo(
                one_question(), timeout=RPC_TIMEOUT)
            try:
                reply = next(call)  # this stream's handler is running
                names = {s.name for s in reply.list_services_response.service}
                assert "smq.SuhaibMessageQueue" in names
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            calls.append(call)
        stub = server.stub()
        try:
            stub.Connect(smq_pb2.ConnectRequest(), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.code()
    finally:
        quiet.set()
        for call in calls:
            call.cancel()
