"""Hostile and broken clients, property-based: every RPC's fields fuzzed with hypothesis
against one real server per module.

Every answer must be one of WIRE.md's codes (never INTERNAL or UNKNOWN), every call
ends within its deadline, the server stays up, and a canary topic no fuzz case may
write to is unchanged at the end (and `PRAGMA integrity_check` is ok).

SMQ_FUZZ_EXAMPLES scales max_examples (default 60 per test; the state machine runs a
third of that, each up to 40 steps). The number of cases and calls that ran is
printed at the end of the module.
"""
from __future__ import annotations

import collections
import os
import re
import string
import time
from pathlib import Path

import apsw
import grpc
import pytest

from conftest import ServerProcess
from smq._proto import smq_pb2, smq_pb2_grpc

MAX_MESSAGE = 16 * 1024
HEARTBEAT = 0.3
DEADLINE = 30.0  # generous: the machine is shared; a hang is far longer than this
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
OK = grpc.StatusCode.OK
WIRE_CODES = {OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
CANARY = "canary"
STATS: collections.Counter = collections.Counter()  # cases and calls, reported at the end


def start_module_server(tmp: Path, *flags: str) -> ServerProcess:
    return ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          *flags], tmp).wait_serving()


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("fuzz")
    proc = start_module_server(tmp, "--heartbeat-interval", str(HEARTBEAT),
                               "--max-message-size", str(MAX_MESSAGE))
    proc.db = tmp / "smq.db"
    yield proc
    proc.close()
    if STATS:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\n[fuzz] {STATS['cases']} fuzz cases ({STATS['calls']} RPC calls) ran; "
                  f"status codes seen: {dict(sorted((k, v) for k, v in STATS.items() if k.isupper()))}")


@pytest.fixture(scope="module")
def stub(server) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return server.stub()


def call(method, request, **kwargs):
    """(status code, reply or None). Asserts the code is a WIRE.md one."""
    STATS["calls"] += 1
    try:
        reply = method(request, timeout=DEADLINE, **kwargs)
        code = OK
    except grpc.RpcError as exc:
        reply, code = None, exc.code()
        assert code in WIRE_CODES, f"{code} {exc.details()!r} for {request!r:.300}"
    STATS[code.name] += 1
    return code, reply


def integrity(db: Path) -> str:
    conn = apsw.Connection(str(db))
    try:
        return conn.execute("PRAGMA integrity_check").get
    finally:
        conn.close()


# -- found by fuzzing, fixed ---------------------------------------------------------

def test_delete_until_int64_max_empties_the_topic(stub):
    """Was INTERNAL ('int too big to convert'): trimming computed until + 1 in SQL."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="int64-max"))
    for _ in range(3):
        stub.Produce(smq_pb2.ProduceRequest(topic="int64-max", message=b"x"))
    code, _ = call(stub.DeleteUntilOffset,
                   smq_pb2.DeleteUntilOffsetRequest(topic="int64-max", offset=2**63 - 1))
    assert code == OK
    info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic="int64-max")).topic
    assert (info.message_count, info.next_offset) == (0, 4)
    assert stub.Produce(smq_pb2.ProduceRequest(topic="int64-max", message=b"y")).offset == 4


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_stream_on_a_trimmed_empty_topic_heartbeats_instead_of_spinning(server, stub):
    """Was: a stream starting below the next offset of a topic trimmed empty (or deleted
    and re-created) busy-looped (a core at 100%) and never sent a heartbeat."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="emptied"))
    for _ in range(3):
        stub.Produce(smq_pb2.ProduceRequest(topic="emptied", message=b"gone"))
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="emptied", offset=3))
    consume = stub.StreamConsume(smq_pb2.ConsumeRequest(topic="emptied", offset=1), timeout=DEADLINE)
    subscribe = stub.Subscribe(smq_pb2.SubscribeRequest(topic="emptied", offset=2), timeout=DEADLINE)
    try:
        assert next(consume).offset == -1  # a heartbeat
        beat = next(subscribe)
        assert list(beat.messages) == [] and beat.next_offset == 4  # where the stream goes on
        before = cpu_seconds(server.proc.pid)
        time.sleep(2)
        busy = cpu_seconds(server.proc.pid) - before
        assert busy < 1.0, f"the server used {busy:.2f} s of CPU in 2 s with two idle streams"
        stub.Produce(smq_pb2.ProduceRequest(topic="emptied", message=b"new"))
        assert (next(r for r in consume if r.offset != -1).offset) == 4
        page = next(r for r in subscribe if r.messages)
        assert [(m.offset, m.message) for m in page.messages] == [(4, b"new")]
    finally:
        consume.cancel()
        subscribe.cancel()


SMQ_METHODS = [m.name for m in smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"].methods]
BAD_BODIES = [b"\xff\xff\xff", b"\x0a\x7f", b"\x0a\x03\xff\xfe\xfd", b"\x08", b"\x12\x05ab"]


def parses(name: str, body: bytes) -> bool:
    """Whether `body` is a valid request message of method `name`."""
    method = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"].methods_by_name[name]
    try:
        getattr(smq_pb2, method.input_type.name).FromString(body)
        return True
    except Exception:
        return False


def raw_call(channel: grpc.Channel, name: str, body: bytes):
    """Call method `name` with a raw request body: (code, details)."""
    method = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"].methods_by_name[name]
    path = f"/smq.SuhaibMessageQueue/{name}"
    STATS["calls"] += 1
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter([body]), timeout=DEADLINE)
        elif method.server_streaming:
            stream = channel.unary_stream(path)(body, timeout=DEADLINE)
            next(stream)
            stream.cancel()
        else:
            channel.unary_unary(path)(body, timeout=DEADLINE)
        return OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_undecodable_request_bodies_answer_invalid_argument(server, stub):
    """Were INTERNAL 'Exception deserializing request!', with a traceback in the log
    for each: truncated protobuf, garbage, invalid UTF-8 in a string field."""
    channel = server.channel()
    refused = 0
    for name in SMQ_METHODS:
        for body in BAD_BODIES:
            code, details = raw_call(channel, name, body)
            if parses(name, body):  # e.g. an unknown field of a message with no fields
                assert code in WIRE_CODES, (name, body, code, details)
            else:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, body, code, details)
                refused += 1
    assert refused >= 3 * len(SMQ_METHODS)
    # In a StreamProduce, the messages before the bad one stay appended (WIRE.md).
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="raw"))
    good = smq_pb2.ProduceRequest(topic="raw", message=b"before").SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        channel.stream_unary("/smq.SuhaibMessageQueue/StreamProduce")(
            iter([good, b"\xff\xff\xff", good]), timeout=DEADLINE)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="raw"))
    assert [m.message for m in reply.messages] == [b"before"]
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("topic, code", [("bad name\x00", grpc.StatusCode.INVALID_ARGUMENT),
                                         ("no-such-topic", grpc.StatusCode.NOT_FOUND)])
def test_empty_produce_batch_checks_its_topic(stub, topic, code):
    """Was OK (0, 0): an empty ProduceBatch skipped the topic check entirely."""
    assert call(stub.ProduceBatch, smq_pb2.ProduceBatchRequest(topic=topic))[0] == code
