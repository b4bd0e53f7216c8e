"""The memory budget end to end: an in-process server (so that its budget can be read)
and clients that never read their replies (soak/stalled.py: raw HTTP/2 that answers
SETTINGS and PING but never opens a flow-control window).

Whatever the calls do (stall, get refused, are cancelled, disconnect, or the server
stops), what they held of the budget comes back to zero, and the budget is never
exceeded while they hold it.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from support import ROOT
from support.poll import eventually
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.server.config import ServerConfig as Config
from smq.server import Server
from smq.server.budget import CallMemory

sys.path.insert(0, str(ROOT / "soak"))
from stalled import StalledConnection  # noqa: E402

MIB = 1024**2
DEADLINE = 30.0
BULK = smq_pb2.BulkRetrieveRequest(topic="pages", start_offset=1, limit=10_000).SerializeToString()
CANCELLED, RESOURCE_EXHAUSTED = "1", "8"


def start(tmp_path: Path, **settings) -> Server:
    """A server with a topic of 10,000 messages of 300 bytes: pages of ~3 MiB."""
    settings = {"memory_budget": 32 * MIB, "heartbeat_interval": 0.5, **settings}
    server = Server(Config(dbpath=str(tmp_path / "smq.db"), port=0, bind="127.0.0.1",
                           durability="normal", **settings)).start()
    stub = stub_of(server)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="pages"), timeout=DEADLINE)
    for _ in range(10):
        stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="pages", messages=[b"p" * 300] * 1000),
                          timeout=DEADLINE)
    return server


def stub_of(server: Server) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                    options=[("grpc.use_local_subchannel_pool", 1)])
    return smq_pb2_grpc.SuhaibMessageQueueStub(channel)


class UsedSampler:
    """The most the budget held, sampled every 10 ms."""

    def __init__(self, server: Server) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        self._thread.start()

    def _run(self, server: Server) -> None:
        while not self._stop.wait(0.01):
            self.most = max(self.most, server.budget.used)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


@pytest.fixture
def server(tmp_path):
    server = start(tmp_path)
    yield server
    server.stop(0)


def test_unread_bulk_replies_stay_within_the_budget_then_return_to_zero(server):
    sampler = UsedSampler(server)
    conn = StalledConnection("127.0.0.1", server.port)
    try:
        time.sleep(0.2)
        calls = [conn.call("BulkRetrieve", BULK) for _ in range(40)]
        eventually(lambda: len(conn.statuses()) >= 20, timeout=15)  # the refused ones end at once
        time.sleep(0.5)
        held = server.budget.used
        statuses = conn.statuses()
        # Others are served all along, with a smaller page if need be.
        reply = stub_of(server).BulkRetrieve(smq_pb2.BulkRetrieveRequest(
            topic="pages", start_offset=1, limit=10_000), timeout=DEADLINE)
        assert reply.count > 0 and reply.next_offset == reply.count + 1
    finally:
        conn.close()
    eventually(lambda: server.budget.used == 0, timeout=15,
               message=lambda: f"{server.budget.used} bytes still held")
    most = sampler.stop()
    assert 0 < most <= server.budget.limit
    assert held >= 2 * 3 * MIB  # at least one full page (and gRPC's copy) was held for it
    assert set(statuses.values()) == {RESOURCE_EXHAUSTED}, statuses
    open_calls = [sid for sid in calls if sid not in statuses]
    assert 0 < len(open_calls) < 20


def test_past_the_budget_a_call_is_told_why(server):
    conn = StalledConnection("127.0.0.1", server.port)
    try:
        time.sleep(0.2)
        for _ in range(30):
            conn.call("BulkRetrieve", BULK)
        eventually(lambda: RESOURCE_EXHAUSTED in conn.statuses().values(), timeout=15)
        hog = server.budget.open_call(None, lambda: None)  # all the rest, reserve included
        hog.hold(server.budget.limit)
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(server).BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="pages", limit=10),
                                         timeout=DEADLINE)
        hog.close()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server memory budget exhausted" in refused.value.details()
        assert "--memory-budget" in refused.value.details()
    finally:
        conn.close()
    eventually(lambda: server.budget.used == 0, timeout=15)


def test_large_requests_past_the_budget_are_refused_small_ones_not(server):
    hog = server.budget.open_call(None, lambda: None)
    hog.hold(server.budget.limit - 3 * MIB)
    stub = stub_of(server)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="pages", messages=[b"b" * MIB] * 2),
                              timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Produce(smq_pb2.ProduceRequest(topic="pages", message=b"small"),
                            timeout=DEADLINE).offset == 10_001
    finally:
        hog.close()
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="pages", messages=[b"b" * MIB] * 2),
                      timeout=DEADLINE)
    eventually(lambda: server.budget.used == 0, timeout=15)


def test_stream_produce_messages_are_held_until_committed_then_released(server):
    stub = stub_of(server)
    reply = stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="pages", message=b"s" * 100_000)]
                                    * 60), timeout=DEADLINE)
    assert reply.offset == 10_060
    eventually(lambda: server.budget.used == 0, timeout=15)
    hog = server.budget.open_call(None, lambda: None)
    hog.hold(server.budget.limit - server.budget.reserve)  # room for small messages only
    try:  # no room for the next message: the stream ends, what came before stays
        with pytest.raises(grpc.RpcError) as refused:
            stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="pages", message=b"t" * 100)]
                                    + [smq_pb2.ProduceRequest(topic="pages", message=b"u" * MIB)]),
                               timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        hog.close()
    assert stub.Consume(smq_pb2.ConsumeRequest(topic="pages", offset=10_061)).message == b"t" * 100
    eventually(lambda: server.budget.used == 0, timeout=15)


@pytest.mark.parametrize("method, request_bytes", [
    ("Subscribe", smq_pb2.SubscribeRequest(topic="pages", offset=1).SerializeToString()),
    ("StreamConsume", smq_pb2.ConsumeRequest(topic="pages", offset=1).SerializeToString()),
    ("BulkRetrieve", BULK)])
def test_a_reader_that_stalls_is_ended_after_the_stall_timeout(tmp_path, method, request_bytes):
    server = start(tmp_path, stall_timeout=1.0)
    conn = StalledConnection("127.0.0.1", server.port)
    try:
        time.sleep(0.2)
        stream = conn.call(method, request_bytes)
        eventually(lambda: server.budget.used > 0, timeout=15)
        eventually(lambda: conn.status(stream) is not None, timeout=10)
        assert conn.status(stream) == CANCELLED
        eventually(lambda: server.budget.used == 0, timeout=15)
        assert stub_of(server).BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="pages", limit=5),
                                            timeout=DEADLINE).count == 5
    finally:
        conn.close()
        server.stop(0)


def test_the_budget_returns_to_zero_when_the_server_stops_with_stalled_calls(tmp_path):
    server = start(tmp_path)
    conn = StalledConnection("127.0.0.1", server.port)
    try:
        time.sleep(0.2)
        for _ in range(5):
            conn.call("BulkRetrieve", BULK)
            conn.call("Subscribe", smq_pb2.SubscribeRequest(topic="pages").SerializeToString())
        eventually(lambda: server.budget.used > 6 * MIB, timeout=15)
        server.stop(1)
        assert server.budget.used == 0
    finally:
        conn.close()


def test_list_answers_are_built_one_at_a_time_and_charged(tmp_path, monkeypatch):
    """The hostile run's case: 40 concurrent ListConsumers over 50,000 consumers took the
    server to 413 MiB, building every list at once outside the budget. Now one list is
    built at a time, and its answer is held in the budget until the client takes it."""
    server = start(tmp_path)
    try:
        stub = stub_of(server)
        for i in range(200):
            stub.CommitOffset(smq_pb2.CommitOffsetRequest(consumer=f"c{i:04d}" + "x" * 200,
                                                          topic="pages", offset=0), timeout=DEADLINE)
        building, most = [0], [0]
        lock = threading.Lock()
        consumers = server.service.consumers

        def slow_consumers(*args):
            with lock:
                building[0] += 1
                most[0] = max(most[0], building[0])
            time.sleep(0.05)  # a large list takes this long to read and sort
            try:
                return consumers(*args)
            finally:
                with lock:
                    building[0] -= 1

        monkeypatch.setattr(server.service, "consumers", slow_consumers)
        charged: list[int] = []  # the budget in use once an answer is held: exact, not sampled
        hold = CallMemory.hold

        def recorded_hold(memory: CallMemory, size: int) -> None:
            hold(memory, size)
            charged.append(server.budget.used)

        monkeypatch.setattr(CallMemory, "hold", recorded_hold)
        pages: list[int] = []

        def list_consumers() -> None:  # a failed call leaves no page: counted below
            reply = stub.ListConsumers(smq_pb2.ListConsumersRequest(page_size=100),
                                       timeout=DEADLINE)
            pages.append(len(reply.consumers))

        calls = [threading.Thread(target=list_consumers) for _ in range(8)]
        for call in calls:
            call.start()
        for call in calls:
            call.join()
        assert pages == [100] * 8
        assert most[0] == 1
        assert len(charged) == 8
        assert min(charged) >= 2 * 100 * 200  # a page of 100 entries of 200+ bytes, twice
        eventually(lambda: server.budget.used == 0, timeout=15)
    finally:
        server.stop(0)
