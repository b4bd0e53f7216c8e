"""Every unary and client-streaming RPC of docs/wire.md through the raw stub, with the
exact gRPC status code of every row of its status-code table.

Most tests share one server (module scope) and each uses its own topic, named after
the test; tests that restart a server or need other flags start their own.
StreamConsume has its own file (test_streams.py).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from support.servers import SERVER_COMMAND, ServerProcess, clean_env, make_topic
from smq._proto import smq_pb2 as pb, smq_pb2_grpc
from smq.server.service import DEFAULT_PAGE_MESSAGES, MAX_PAGE_MESSAGES
from smq.server.formats import MESSAGE_ROWS

TIMEOUT = 20.0  # seconds for any one call: generous, the machine is shared
MiB = 1024**2
DEFAULT_MAX_MESSAGE_SIZE = MiB  # the server's --max-message-size default (docs/wire.md, "Limits")

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


# -- fixtures and helpers -----------------------------------------------------------

@pytest.fixture(scope="module")
def shared_server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("wire")
    server = ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0",
                            "--bind", "127.0.0.1"], tmp, clean_env())
    try:
        yield server.wait_serving()
    finally:
        server.close()


@pytest.fixture(scope="module")
def stub(shared_server: ServerProcess) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return shared_server.stub()


@pytest.fixture
def topic(request, stub) -> str:
    """A topic of this test's own on the shared server, created and empty."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", request.node.name)[:200]
    stub.CreateTopic(pb.CreateTopicRequest(topic=name), timeout=TIMEOUT)
    return name


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    """The RpcError that call() raises (fails the test if it does not raise)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def produce(stub, topic: str, message: bytes) -> int:
    return stub.Produce(pb.ProduceRequest(topic=topic, message=message), timeout=TIMEOUT).offset


def consume(stub, topic: str, offset: int) -> pb.ConsumeResponse:
    return stub.Consume(pb.ConsumeRequest(topic=topic, offset=offset), timeout=TIMEOUT)


def earliest(stub, topic: str) -> int:
    return stub.GetEarliestOffset(pb.GetEarliestOffsetRequest(topic=topic), timeout=TIMEOUT).offset


def latest(stub, topic: str) -> int:
    return stub.GetLatestOffset(pb.GetLatestOffsetRequest(topic=topic), timeout=TIMEOUT).offset


def delete_until(stub, topic: str, offset: int) -> None:
    stub.DeleteUntilOffset(pb.DeleteUntilOffsetRequest(topic=topic, offset=offset), timeout=TIMEOUT)


def bulk(stub, topic: str, start: int, limit: int) -> pb.BulkRetrieveResponse:
    return stub.BulkRetrieve(pb.BulkRetrieveRequest(topic=topic, start_offset=start, limit=limit),
                             timeout=TIMEOUT)


def stream_produce(stub, requests: list[pb.ProduceRequest]) -> int:
    return stub.StreamProduce(iter(requests), timeout=TIMEOUT).offset


def stored(stub, topic: str) -> list[tuple[int, bytes]]:
    """Every stored (offset, message) of a topic, read with BulkRetrieve pages."""
    out: list[tuple[int, bytes]] = []
    start = 0
    while True:
        page = bulk(stub, topic, start, 1000)
        if not page.count:
            return out
        out += [(m.offset, m.message) for m in page.messages]
        start = page.next_offset


def assert_empty(stub, topic: str) -> None:
    for call in (lambda: earliest(stub, topic), lambda: latest(stub, topic)):
        error = error_of(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "topic is empty"


def first_stream_response(stub, request: pb.ConsumeRequest) -> pb.ConsumeResponse:
    stream = stub.StreamConsume(request, timeout=TIMEOUT)
    try:
        return next(stream)
    finally:
        stream.cancel()


# Every RPC that names a topic, called with just that topic (and harmless other fields).
TOPIC_CALLS: dict[str, Callable[[smq_pb2_grpc.SuhaibMessageQueueStub, str], object]] = {
    "CreateTopic": lambda s, t: s.CreateTopic(pb.CreateTopicRequest(topic=t), timeout=TIMEOUT),
    "GetLatestOffset": lambda s, t: latest(s, t),
    "GetEarliestOffset": lambda s, t: earliest(s, t),
    "Produce": lambda s, t: produce(s, t, b"x"),
    "Consume": lambda s, t: consume(s, t, 1),
    "StreamProduce": lambda s, t: stream_produce(s, [pb.ProduceRequest(topic=t, message=b"x")]),
    "StreamConsume": lambda s, t: first_stream_response(s, pb.ConsumeRequest(topic=t, offset=0)),
    "DeleteUntilOffset": lambda s, t: delete_until(s, t, 1),
    "BulkRetrieve": lambda s, t: bulk(s, t, 0, 10),
}
TAKES_EXISTING_TOPIC = sorted(set(TOPIC_CALLS) - {"CreateTopic"})

INVALID_NAMES = {
    "empty": "",
    "250_chars": "a" * 250,
    "space": "my topic",
    "slash": "a/b",
    "unicode": "t\u00f8pic",
    "emoji": "topic\U0001f600",
    "nul": "nul\x00byte",
    "trailing_newline": "topic\n",
    "sql": "x'; DROP TABLE messages;--",
    "sql_or": "a' OR '1'='1",
    "percent": "a%",
    "dotdot_path": "../etc",
}
VALID_NAMES = {
    "249_chars": "b" * 249,
    "dots": "a.b.c",
    "underscore": "_",
    "dash": "-",
    "dot": ".",
    "mixed": "Ab9.x_y-Z",
    "digits": "0123456789",
}


# -- Connect --------------------------------------------------------------------

def test_connect_succeeds(stub):
    assert stub.Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()


# -- topic names ----------------------------------------------------------------------

@pytest.mark.parametrize("rpc", TAKES_EXISTING_TOPIC)
def test_missing_topic_is_not_found(stub, rpc):
    error = error_of(lambda: TOPIC_CALLS[rpc](stub, f"missing-{rpc}"))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    # ... and the call did not create it.
    assert error_of(lambda: latest(stub, f"missing-{rpc}")).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("rpc", sorted(TOPIC_CALLS))
@pytest.mark.parametrize("name", INVALID_NAMES.values(), ids=INVALID_NAMES.keys())
def test_invalid_topic_name_is_invalid_argument(stub, rpc, name):
    error = error_of(lambda: TOPIC_CALLS[rpc](stub, name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_invalid_names_leave_the_database_intact(shared_server, stub, topic):
    offsets = [produce(stub, topic, f"keep{i}".encode()) for i in range(3)]
    for name in INVALID_NAMES.values():
        for call in TOPIC_CALLS.values():
            with pytest.raises(grpc.RpcError):
                call(stub, name)
    assert stored(stub, topic) == [(o, f"keep{i}".encode()) for i, o in enumerate(offsets)]
    assert produce(stub, topic, b"after") == offsets[-1] + 1
    # The schema is whole and no invalid name became a topic row.
    dbpath = shared_server.args[shared_server.args.index("--dbpath") + 1]
    with contextlib.closing(sqlite3.connect(f"file:{dbpath}?mode=ro", uri=True)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        names = {row[0] for row in db.execute("SELECT name FROM topics")}
    assert {"topics", "message_rows", "time_marks", "consumers", "meta"} <= tables
    assert not names & set(INVALID_NAMES.values())


@pytest.mark.parametrize("name", VALID_NAMES.values(), ids=VALID_NAMES.keys())
def test_valid_topic_names_are_accepted(stub, name):
    stub.CreateTopic(pb.CreateTopicRequest(topic=name), timeout=TIMEOUT)
    offset = produce(stub, name, b"hello " + name.encode())
    assert consume(stub, name, offset) == pb.ConsumeResponse(message=b"hello " + name.encode(),
                                                             offset=offset)
    assert latest(stub, name) == offset
    assert bulk(stub, name, offset, 1).messages[0].offset == offset


# -- CreateTopic ------------------------------------------------------------------------

def test_create_topic_is_idempotent(stub, topic):
    make_topic(stub, topic, 3)
    assert stub.CreateTopic(pb.CreateTopicRequest(topic=topic), timeout=TIMEOUT) == \
        pb.CreateTopicResponse(created=False)  # (`created`: this SMQ's addition)
    assert stored(stub, topic) == [(1, b"m1"), (2, b"m2"), (3, b"m3")]
    assert produce(stub, topic, b"m4") == 4


def test_concurrent_create_topic_calls_all_succeed(stub, topic):
    name = topic + ".racy"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(
            lambda _: stub.CreateTopic(pb.CreateTopicRequest(topic=name), timeout=TIMEOUT), range(8)))
    assert sorted(reply.created for reply in replies) == [False] * 7 + [True]  # exactly one made it
    assert produce(stub, name, b"one") == 1
    assert stored(stub, name) == [(1, b"one")]


def test_new_topic_is_empty(stub, topic):
    assert_empty(stub, topic)
    page = bulk(stub, topic, 0, 10)
    assert (list(page.messages), page.count, page.next_offset) == ([], 0, 0)


# -- Produce and offsets ----------------------------------------------------------------

def test_offsets_start_at_1_and_are_contiguous(stub, topic):
    assert [produce(stub, topic, f"p{i}".encode()) for i in range(1, 21)] == list(range(1, 21))
    assert (earliest(stub, topic), latest(stub, topic)) == (1, 20)
    assert stored(stub, topic) == [(i, f"p{i}".encode()) for i in range(1, 21)]


def test_concurrent_producers_get_unique_contiguous_offsets(stub, topic):
    def producer(worker: int) -> list[tuple[int, bytes]]:
        payloads = [f"w{worker}-{i}".encode() for i in range(25)]
        return [(produce(stub, topic, p), p) for p in payloads]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [pair for batch in pool.map(producer, range(4)) for pair in batch]
    assert sorted(offset for offset, _ in results) == list(range(1, 101))
    # Each acknowledged offset holds exactly the message it was acknowledged for.
    assert stored(stub, topic) == sorted(results)
    for worker in range(4):  # one producer's messages keep their order
        mine = [offset for offset, payload in results if payload.startswith(f"w{worker}-".encode())]
        assert mine == sorted(mine)


def test_empty_message_round_trips(stub, topic):
    offset = produce(stub, topic, b"")
    assert offset == 1
    assert consume(stub, topic, 1) == pb.ConsumeResponse(message=b"", offset=1)
    assert [(m.offset, m.message) for m in bulk(stub, topic, 1, 10).messages] == [(1, b"")]
    assert (earliest(stub, topic), latest(stub, topic)) == (1, 1)


def test_message_of_exactly_the_maximum_size_round_trips(stub, topic):
    payload = os.urandom(DEFAULT_MAX_MESSAGE_SIZE)
    offset = produce(stub, topic, payload)
    assert consume(stub, topic, offset).message == payload
    assert stream_produce(stub, [pb.ProduceRequest(topic=topic, message=payload)]) == offset + 1
    assert bulk(stub, topic, offset + 1, 1).messages[0].message == payload


@pytest.mark.parametrize("size", [DEFAULT_MAX_MESSAGE_SIZE + 1, 2 * DEFAULT_MAX_MESSAGE_SIZE],
                         ids=["max+1", "2x_max"])
def test_message_above_the_maximum_is_resource_exhausted(stub, topic, size):
    make_topic(stub, topic, 1)
    error = error_of(lambda: produce(stub, topic, b"x" * size))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    error = error_of(lambda: stream_produce(stub, [pb.ProduceRequest(topic=topic, message=b"x" * size)]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert stored(stub, topic) == [(1, b"m1")]
    assert produce(stub, topic, b"m2") == 2


def test_max_message_size_flag_sets_the_limit(start_server):
    server = start_server("--max-message-size", "1KiB")
    stub = server.stub()
    make_topic(stub, "t")
    assert produce(stub, "t", b"k" * 1024) == 1
    error = error_of(lambda: produce(stub, "t", b"k" * 1025))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert consume(stub, "t", 1).message == b"k" * 1024


# -- Consume -----------------------------------------------------------------------

def test_consume_returns_the_message_and_echoes_the_offset(stub, topic):
    make_topic(stub, topic, 5)
    for offset in (1, 3, 5):
        assert consume(stub, topic, offset) == pb.ConsumeResponse(message=f"m{offset}".encode(),
                                                                  offset=offset)


@pytest.mark.parametrize("above", [1, 2, 1000, 2**62])
def test_consume_above_latest_is_out_of_range(stub, topic, above):
    make_topic(stub, topic, 3)
    assert error_of(lambda: consume(stub, topic, 3 + above)).code() == grpc.StatusCode.OUT_OF_RANGE


def test_consume_on_a_new_topic_is_out_of_range(stub, topic):
    assert error_of(lambda: consume(stub, topic, 1)).code() == grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize("offset", [0, -1, -(2**63)])
def test_consume_below_1_is_not_found(stub, topic, offset):
    make_topic(stub, topic, 3)
    assert error_of(lambda: consume(stub, topic, offset)).code() == grpc.StatusCode.NOT_FOUND


def test_consume_deleted_offset_is_not_found(stub, topic):
    make_topic(stub, topic, 5)
    delete_until(stub, topic, 3)
    for offset in (1, 3):
        assert error_of(lambda: consume(stub, topic, offset)).code() == grpc.StatusCode.NOT_FOUND
    assert consume(stub, topic, 4).message == b"m4"
    delete_until(stub, topic, 5)  # trimmed empty: stored ones gone, above latest still out of range
    assert error_of(lambda: consume(stub, topic, 5)).code() == grpc.StatusCode.NOT_FOUND
    assert error_of(lambda: consume(stub, topic, 6)).code() == grpc.StatusCode.OUT_OF_RANGE


def test_consume_on_a_topic_trimmed_empty_says_it_is_empty(stub, topic):
    make_topic(stub, topic, 3)
    delete_until(stub, topic, 3)
    error = error_of(lambda: consume(stub, topic, 2))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "offset 2 was deleted; the topic is empty (the next message gets offset 4)"


# -- GetEarliestOffset / GetLatestOffset --------------------------------------------

def test_earliest_and_latest_follow_produce_and_delete(stub, topic):
    make_topic(stub, topic, 1)
    assert (earliest(stub, topic), latest(stub, topic)) == (1, 1)
    make_topic(stub, topic, 4)
    assert (earliest(stub, topic), latest(stub, topic)) == (1, 5)
    delete_until(stub, topic, 2)
    assert (earliest(stub, topic), latest(stub, topic)) == (3, 5)


def test_topic_trimmed_empty_is_failed_precondition(stub, topic):
    make_topic(stub, topic, 3)
    delete_until(stub, topic, 3)
    assert_empty(stub, topic)


# -- DeleteUntilOffset ------------------------------------------------------------

def test_delete_until_offset_is_inclusive_and_idempotent(stub, topic):
    make_topic(stub, topic, 10)
    assert stub.DeleteUntilOffset(pb.DeleteUntilOffsetRequest(topic=topic, offset=4),
                                  timeout=TIMEOUT) == pb.DeleteUntilOffsetResponse()
    after = [(o, f"m{o}".encode()) for o in range(5, 11)]
    assert stored(stub, topic) == after
    for again in (4, 2, 1, 0, -5):  # repeating it, or deleting less, changes nothing
        delete_until(stub, topic, again)
        assert stored(stub, topic) == after
        assert (earliest(stub, topic), latest(stub, topic)) == (5, 10)


@pytest.mark.parametrize("until", [6, 1000, 2**63 - 1])
def test_delete_above_latest_empties_topic_and_offsets_go_on(stub, topic, until):
    make_topic(stub, topic, 5)
    delete_until(stub, topic, until)
    assert_empty(stub, topic)
    assert stored(stub, topic) == []
    delete_until(stub, topic, until)  # idempotent on an empty topic too
    assert produce(stub, topic, b"next") == 6
    assert (earliest(stub, topic), latest(stub, topic)) == (6, 6)
    assert stored(stub, topic) == [(6, b"next")]


def test_delete_on_a_new_topic_then_produce_starts_at_1(stub, topic):
    delete_until(stub, topic, 50)
    assert_empty(stub, topic)
    assert produce(stub, topic, b"first") == 1


def _restart_keeps_offsets(start_server, tmp_path, stop: Callable[[ServerProcess], None]):
    db = tmp_path / "restart.db"
    server = start_server(db=db)
    stub = server.stub()
    make_topic(stub, "kept", 3)
    make_topic(stub, "trimmed", 5)
    delete_until(stub, "trimmed", 5)
    make_topic(stub, "partly", 4)
    delete_until(stub, "partly", 2)
    stop(server)

    stub = start_server(db=db).stub()
    assert stored(stub, "kept") == [(1, b"m1"), (2, b"m2"), (3, b"m3")]
    assert_empty(stub, "trimmed")
    assert (earliest(stub, "partly"), latest(stub, "partly")) == (3, 4)
    assert produce(stub, "kept", b"k") == 4
    assert produce(stub, "trimmed", b"t") == 6  # never reuses an offset
    assert produce(stub, "partly", b"p") == 5
    stub.CreateTopic(pb.CreateTopicRequest(topic="trimmed"), timeout=TIMEOUT)  # still idempotent
    assert latest(stub, "trimmed") == 6


def test_offsets_are_not_reused_after_a_graceful_restart(start_server, tmp_path):
    _restart_keeps_offsets(start_server, tmp_path, lambda server: server.terminate())


def test_offsets_are_not_reused_after_a_crash(start_server, tmp_path):
    _restart_keeps_offsets(start_server, tmp_path, lambda server: server.kill())


# -- BulkRetrieve -----------------------------------------------------------------

def test_bulk_retrieve_start_is_inclusive(stub, topic):
    make_topic(stub, topic, 10)
    page = bulk(stub, topic, 3, 4)
    assert [(m.offset, m.message) for m in page.messages] == [(o, f"m{o}".encode()) for o in range(3, 7)]
    assert (page.count, page.next_offset) == (4, 7)


@pytest.mark.parametrize("start", [0, -1, -(2**63)])
def test_bulk_retrieve_from_below_1_starts_at_the_first(stub, topic, start):
    make_topic(stub, topic, 3)
    page = bulk(stub, topic, start, 10)
    assert [m.offset for m in page.messages] == [1, 2, 3]
    assert (page.count, page.next_offset) == (3, 4)


def test_bulk_retrieve_skips_deleted_messages(stub, topic):
    make_topic(stub, topic, 6)
    delete_until(stub, topic, 4)
    page = bulk(stub, topic, 1, 10)
    assert [m.offset for m in page.messages] == [5, 6]
    assert (page.count, page.next_offset) == (2, 7)


@pytest.mark.parametrize("count, start", [(0, 0), (0, 5), (3, 4), (3, 1000), (3, 2**63 - 1)],
                         ids=["empty_topic_from_0", "empty_topic_from_5", "latest+1", "far_beyond",
                              "int64_max"])
def test_bulk_retrieve_returning_nothing_keeps_start_offset(stub, topic, count, start):
    make_topic(stub, topic, count)
    page = bulk(stub, topic, start, 10)
    assert (list(page.messages), page.count, page.next_offset) == ([], 0, start)


@pytest.mark.parametrize("limit", [0, -1, -(2**31)])
def test_bulk_retrieve_limit_at_most_0_means_default_page(stub, topic, limit):
    stream_produce(stub, [pb.ProduceRequest(topic=topic, message=b"d%d" % i)
                          for i in range(DEFAULT_PAGE_MESSAGES + 50)])
    page = bulk(stub, topic, 1, limit)
    assert page.count == DEFAULT_PAGE_MESSAGES == len(page.messages)
    assert [m.offset for m in page.messages] == list(range(1, DEFAULT_PAGE_MESSAGES + 1))
    assert page.next_offset == DEFAULT_PAGE_MESSAGES + 1


def test_bulk_retrieve_huge_limit_is_capped_by_count(stub, topic):
    total = MAX_PAGE_MESSAGES + 50
    assert stream_produce(stub, [pb.ProduceRequest(topic=topic, message=b"%d" % i)
                                 for i in range(1, total + 1)]) == total
    page = bulk(stub, topic, 0, 2**31 - 1)
    assert page.count == MAX_PAGE_MESSAGES == len(page.messages)
    assert page.next_offset == MAX_PAGE_MESSAGES + 1
    assert page.messages[-1] == pb.RetrievedMessage(message=b"%d" % MAX_PAGE_MESSAGES,
                                                    offset=MAX_PAGE_MESSAGES)
    rest = bulk(stub, topic, page.next_offset, 2**31 - 1)
    assert [m.offset for m in rest.messages] == list(range(MAX_PAGE_MESSAGES + 1, total + 1))
    assert (rest.count, rest.next_offset) == (50, total + 1)


def test_bulk_retrieve_pages_are_capped_by_bytes(stub, topic):
    payloads = [bytes([i]) * (512 * 1024) for i in range(8)]  # 4 MiB in all
    for payload in payloads:
        produce(stub, topic, payload)
    # A default client (4 MiB receive limit) can read every page.
    page = bulk(stub, topic, 1, 100)
    assert page.ByteSize() < 4 * MiB
    assert 1 <= page.count < 8 and page.count == len(page.messages)
    assert page.next_offset == page.messages[-1].offset + 1
    seen: list[bytes] = []
    start = 1
    while True:
        page = bulk(stub, topic, start, 2**31 - 1)
        assert page.ByteSize() < 4 * MiB
        if not page.count:
            break
        assert [m.offset for m in page.messages] == list(range(start, start + page.count))
        seen += [m.message for m in page.messages]
        start = page.next_offset
    assert seen == payloads


@pytest.mark.parametrize("limit", [1, 7, 25, 100])
def test_feeding_next_offset_back_pages_through_everything(stub, topic, limit):
    make_topic(stub, topic, 25)
    delete_until(stub, topic, 2)
    offsets: list[int] = []
    start = 0
    for _ in range(100):
        page = bulk(stub, topic, start, limit)
        assert page.count == len(page.messages) <= limit
        if not page.count:
            assert page.next_offset == start
            break
        offsets += [m.offset for m in page.messages]
        assert all(m.message == f"m{m.offset}".encode() for m in page.messages)
        start = page.next_offset
    assert offsets == list(range(3, 26))  # no skips, no duplicates


# -- StreamProduce ----------------------------------------------------------------

def test_stream_produce_appends_in_order_and_returns_last_offset(stub, topic):
    make_topic(stub, topic, 2)
    requests = [pb.ProduceRequest(topic=topic, message=f"s{i}".encode()) for i in range(5)]
    assert stub.StreamProduce(iter(requests), timeout=TIMEOUT) == pb.ProduceResponse(offset=7)
    assert stored(stub, topic)[2:] == [(3 + i, f"s{i}".encode()) for i in range(5)]


def test_stream_produce_of_nothing_returns_0(stub, topic):
    assert stream_produce(stub, []) == 0
    assert_empty(stub, topic)


def test_stream_produce_many_messages(stub, topic):
    total = 2500  # more than the server hands its writer at once
    requests = (pb.ProduceRequest(topic=topic, message=b"%d" % i) for i in range(1, total + 1))
    assert stub.StreamProduce(requests, timeout=TIMEOUT).offset == total
    assert stored(stub, topic) == [(i, b"%d" % i) for i in range(1, total + 1)]


def test_stream_produce_to_several_topics(stub, topic):
    a, b = topic + ".a", topic + ".b"
    make_topic(stub, a, 1)
    make_topic(stub, b)
    order = [a, b, a, b, b]
    requests = [pb.ProduceRequest(topic=t, message=f"{t}:{i}".encode()) for i, t in enumerate(order)]
    assert stream_produce(stub, requests) == 3  # the last message: b's third
    assert stored(stub, a) == [(1, b"m1"), (2, f"{a}:0".encode()), (3, f"{a}:2".encode())]
    assert stored(stub, b) == [(1, f"{b}:1".encode()), (2, f"{b}:3".encode()), (3, f"{b}:4".encode())]


@pytest.mark.parametrize("bad, code", [
    (pb.ProduceRequest(topic="does-not-exist", message=b"bad"), grpc.StatusCode.NOT_FOUND),
    (pb.ProduceRequest(topic="bad name", message=b"bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.ProduceRequest(topic="{topic}", message=b"x" * (DEFAULT_MAX_MESSAGE_SIZE + 1)),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
], ids=["missing_topic", "invalid_name", "too_large"])
def test_stream_produce_bad_message_ends_call_keeping_earlier_ones(stub, topic, bad, code):
    other = topic + ".other"
    make_topic(stub, other)
    bad = pb.ProduceRequest(topic=bad.topic.replace("{topic}", topic), message=bad.message)
    requests = [pb.ProduceRequest(topic=topic, message=b"before1"),
                pb.ProduceRequest(topic=other, message=b"before2"),
                pb.ProduceRequest(topic=topic, message=b"before3"),
                bad,
                pb.ProduceRequest(topic=topic, message=b"after")]
    error = error_of(lambda: stream_produce(stub, requests))
    assert error.code() == code, error.details()
    assert stored(stub, topic) == [(1, b"before1"), (2, b"before3")]
    assert stored(stub, other) == [(1, b"before2")]
    assert produce(stub, topic, b"next") == 3


def test_stream_produce_bad_first_message_appends_nothing(stub, topic):
    requests = [pb.ProduceRequest(topic="does-not-exist", message=b"bad"),
                pb.ProduceRequest(topic=topic, message=b"after")]
    assert error_of(lambda: stream_produce(stub, requests)).code() == grpc.StatusCode.NOT_FOUND
    assert_empty(stub, topic)


# -- the rest of the status-code table --------------------------------------------------

def test_storage_failure_is_internal_and_the_writer_survives(start_server, tmp_path):
    db_path = tmp_path / "broken.db"
    server = start_server(db=db_path)
    stub = server.stub()
    make_topic(stub, "t", 2)

    def sql(statement: str) -> None:  # change the database under the running server
        with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
            db.execute(statement)

    sql("DROP TABLE message_rows")
    calls = {"Produce": lambda: produce(stub, "t", b"x"), "Consume": lambda: consume(stub, "t", 1),
             "BulkRetrieve": lambda: bulk(stub, "t", 0, 10),
             "StreamProduce": lambda: stream_produce(stub, [pb.ProduceRequest(topic="t", message=b"y")]),
             "Produce again": lambda: produce(stub, "t", b"z")}
    for name, call in calls.items():
        error = error_of(call)  # promptly (TIMEOUT), not after the server's own write timeout
        assert error.code() == grpc.StatusCode.INTERNAL, (name, error.code(), error.details())
        assert "Traceback" not in error.details() and 'File "' not in error.details()
    assert "no such table: message_rows" in server.log()  # the details are in the server log
    assert stub.Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()

    sql(MESSAGE_ROWS)  # the storage comes back (empty): writes work again, offsets go on
    assert produce(stub, "t", b"back") == 3
    assert stored(stub, "t") == [(3, b"back")]
    assert server.terminate() == 0


def test_too_many_concurrent_calls_is_resource_exhausted(start_server, tmp_path):
    """Hold the database's write lock from outside so that Produce calls stay in flight;
    beyond the server's limit of concurrent calls the rest are refused at once."""
    db_path = tmp_path / "busy.db"
    server = start_server("--workers", "1", "--max-streams", "1", db=db_path)
    stub = server.stub()
    make_topic(stub, "t")
    # The server admits only a few calls per connection (the rest wait in the client), so
    # the calls come over 20 separate connections, as from 20 clients.
    stubs = [server.stub(own_connection=True) for _ in range(20)]
    finished: queue.Queue = queue.Queue()
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")  # the server's writer now waits (busy timeout 10 s)
        calls = [stubs[i % 20].Produce.future(pb.ProduceRequest(topic="t", message=b"%d" % i),
                                               timeout=TIMEOUT)
                 for i in range(40)]
        for call in calls:
            call.add_done_callback(finished.put)
        refused = finished.get(timeout=TIMEOUT)  # the first call to end is a refusal
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        lock.execute("ROLLBACK")
    outcomes = []
    for call in calls:
        try:
            outcomes.append(call.result(timeout=TIMEOUT).offset)
        except grpc.RpcError as error:
            outcomes.append(error.code())
    offsets = sorted(o for o in outcomes if isinstance(o, int))
    assert offsets and offsets == list(range(1, len(offsets) + 1))  # the admitted ones all landed
    assert set(outcomes) - set(offsets) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert produce(stub, "t", b"after") == len(offsets) + 1  # and the server is fine afterwards


def _can_mount_private_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs none /mnt"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class FullDiskServer(ServerProcess):
    """A server whose database lives on a 2 MiB tmpfs mounted in its own namespace."""

    def __init__(self, directory: Path, cwd: Path) -> None:
        mount_then_exec = 'mount -t tmpfs -o size=2m smq-full "$1" && shift && exec "$@"'
        self.args = []
        self.log_path = cwd / "full-disk-server.log"
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            ["unshare", "-Urm", "sh", "-c", mount_then_exec, "sh", str(directory),
             *SERVER_COMMAND, "--dbpath", str(directory / "smq.db"), "--port", "0",
             "--bind", "127.0.0.1", "--min-free-space", "0"],  # a real ENOSPC, not the floor
            cwd=cwd, env=clean_env(), stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.port = None


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare -Urm and tmpfs")
def test_disk_full_is_resource_exhausted(tmp_path):
    (tmp_path / "disk").mkdir()
    server = FullDiskServer(tmp_path / "disk", tmp_path)
    try:
        stub = server.wait_serving().stub()
        make_topic(stub, "t")
        acked: list[tuple[int, bytes]] = []
        for _ in range(20):  # 20 x 256 KiB cannot fit in 2 MiB
            payload = os.urandom(256 * 1024)
            try:
                acked.append((produce(stub, "t", payload), payload))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                break
        else:
            pytest.fail("the disk never filled up")
        assert acked and [o for o, _ in acked] == list(range(1, len(acked) + 1))
        assert stored(stub, "t") == acked  # what was acknowledged is intact and readable
    finally:
        server.close()


def test_topic_that_is_not_utf8_is_invalid_argument(smq_server):
    """Raw protobuf bytes with a non-UTF-8 topic (field 1 = b'\\xff\\xfe'): gRPC cannot
    decode them into a message; the server still answers INVALID_ARGUMENT, not INTERNAL."""
    channel = smq_server.channel()
    raw = b"\x0a\x02\xff\xfe"
    for method in ("GetLatestOffset", "Produce", "CreateTopic"):
        call = channel.unary_unary(f"/smq.SuhaibMessageQueue/{method}")
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
    stream = channel.stream_unary("/smq.SuhaibMessageQueue/StreamProduce")
    with pytest.raises(grpc.RpcError) as err:
        stream(iter([raw]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    consume = channel.unary_stream("/smq.SuhaibMessageQueue/StreamConsume")
    with pytest.raises(grpc.RpcError) as err:
        next(iter(consume(raw, timeout=10)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in smq_server.log()
