"""Hostile and broken clients, property-based: every RPC's fields fuzzed with hypothesis
against one real server per module.

Every answer must be one of docs/wire.md's codes (never INTERNAL or UNKNOWN), every call
ends within its deadline, the server stays up, and a canary topic no fuzz case may
write to is unchanged at the end (and `PRAGMA integrity_check` is ok).

SMQ_FUZZ_EXAMPLES scales max_examples (default 100 per test; the state machine runs a
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
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from support.servers import ServerProcess, integrity
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.server.topic_state import stored_messages

MAX_MESSAGE = 16 * 1024
HEARTBEAT = 0.3
DEADLINE = 15.0  # generous on a shared machine: a hang is far longer than this
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
OK = grpc.StatusCode.OK
WIRE_CODES = {OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
CANARY = "canary"
EXAMPLES = int(os.environ.get("SMQ_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
STATS: collections.Counter = collections.Counter()  # cases and calls, reported at the end
SERVER: dict = {}
CANARY_PAYLOADS: list[bytes] = []  # as the canary fixture wrote them


def server_state() -> str:
    """Threads and memory of the server process, for failure messages."""
    try:
        with open(f"/proc/{SERVER['pid']}/status") as status:
            return " ".join(line.strip() for line in status if line.startswith(("Threads", "VmRSS")))
    except (KeyError, OSError):
        return "server gone"


def start_module_server(tmp: Path, *flags: str) -> ServerProcess:
    return ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          *flags], tmp).wait_serving()


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("fuzz")
    proc = start_module_server(tmp, "--heartbeat-interval", str(HEARTBEAT),
                               "--max-message-size", str(MAX_MESSAGE), "--max-streams", "256")
    proc.db = tmp / "smq.db"
    SERVER["pid"] = proc.proc.pid
    yield proc
    # After every test of the module, in whatever order they ran: a clean stop, a sound
    # file, and the canary (if the module wrote one) stored as it was written.
    code = proc.terminate() if proc.proc.poll() is None else proc.proc.returncode
    proc.close()
    if STATS:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\n[fuzz] {STATS['cases']} fuzz cases ({STATS['calls']} RPC calls) ran; "
                  f"status codes seen: {dict(sorted((k, v) for k, v in STATS.items() if k.isupper()))}")
    log = proc.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert integrity(proc.db) == "ok"
    if CANARY_PAYLOADS:
        conn = apsw.Connection(str(proc.db))
        try:
            rows = [(offset, payload) for name, offset, payload in stored_messages(conn)
                    if name == CANARY]
        finally:
            conn.close()
        assert rows == list(enumerate(CANARY_PAYLOADS, 1))


@pytest.fixture(scope="module")
def stub(server) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return server.stub()


def call(method, request, **kwargs):
    """(status code, reply or None). Asserts the code is a docs/wire.md one."""
    STATS["calls"] += 1
    try:
        reply = method(request, timeout=DEADLINE, **kwargs)
        code = OK
    except grpc.RpcError as exc:
        reply, code = None, exc.code()
        assert code in WIRE_CODES, f"{code} {exc.details()!r} for {request!r:.300} ({server_state()})"
    STATS[code.name] += 1
    return code, reply





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
        code, details = OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    STATS[code.name] += 1
    return code, details


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
    # In a StreamProduce, the messages before the bad one stay appended (docs/wire.md).
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


# -- the canary: written once, never targeted by a write, checked at the end ---------

@pytest.fixture(scope="module", autouse=True)
def canary(stub) -> list[bytes]:
    rng = __import__("random").Random(1)
    payloads = [b"", b"\x00", b"'; DROP TABLE messages; --", "é\u2603\U0001F600".encode(),
                b"\xff" * MAX_MESSAGE] + [rng.randbytes(rng.randrange(1, 2000)) for _ in range(35)]
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=CANARY))
    for payload in payloads[:10]:
        stub.Produce(smq_pb2.ProduceRequest(topic=CANARY, message=payload))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic=CANARY, messages=payloads[10:30]))
    stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic=CANARY, message=p) for p in payloads[30:]]))
    assert stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic=CANARY)).offset == len(payloads)
    CANARY_PAYLOADS[:] = payloads
    return payloads


# -- strategies ------------------------------------------------------------------------

POOL = ["fz-a", "fz-b", "fz.c"]  # topics that exist (fuzzed DeleteTopic may remove them)
TRICKY_NAMES = [
    "", " ", "fz-a ", " fz-a", "fz-a\n", "fz-a\x00", "\x00", "fz-a\x00x", "fz-a/b", "../fz-a",
    "fz-a'", 'fz-a"', "fz-a;", "'; DROP TABLE messages; --", "canary' OR '1'='1", "canary--",
    "canary%", "%", "_%", "*", "canary\u200b", "CANARY", "ｃａｎａｒｙ", "cañary", "\u202ecanary",
    "topics", "messages", "sqlite_master", "\ud7ff", "\U0010ffff", "\t", "a" * 249, "a" * 250,
    "é" * 125, "a" * 100_000, "fz-a\r\nX-Injected: 1"]
VALID_CHARS = string.ascii_letters + string.digits + "._-"
valid_names = st.text(alphabet=VALID_CHARS, min_size=1, max_size=249)
# Names writes may use: anything but the canary.
names = st.one_of(st.sampled_from(POOL), valid_names, st.sampled_from(TRICKY_NAMES),
                  st.text(max_size=300)).filter(lambda name: name != CANARY)
read_names = st.one_of(names, st.just(CANARY))
BOUNDARY_64 = [-2**63, -2**63 + 1, -2**31 - 1, -1, 0, 1, 2, 39, 40, 41, 2**31 - 1, 2**31, 2**32,
               2**53 + 1, 2**62, 2**63 - 2, 2**63 - 1]
BOUNDARY_32 = [-2**31, -1, 0, 1, 2, 99, 100, 101, 9_999, 10_000, 10_001, 2**31 - 1]
int64s = st.one_of(st.sampled_from(BOUNDARY_64), st.integers(-3, 60), st.integers(-2**63, 2**63 - 1))
int32s = st.one_of(st.sampled_from(BOUNDARY_32), st.integers(-3, 60), st.integers(-2**31, 2**31 - 1))
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda size, byte: bytes([byte]) * size,
              st.sampled_from([MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, 256 * 1024]),
              st.integers(0, 255)))


def valid(name: str) -> bool:
    return TOPIC_NAME.fullmatch(name) is not None


def ensure_pool(stub) -> None:
    for name in POOL:
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name), timeout=DEADLINE)


def case() -> None:
    STATS["cases"] += 1


# -- one property per RPC ---------------------------------------------------------------

TOPIC_RPCS = ["GetLatestOffset", "GetEarliestOffset", "CreateTopic", "DescribeTopic",
              "DeleteTopic", "GetTopicPolicy"]


@FUZZ
@given(rpc=st.sampled_from(TOPIC_RPCS), name=names, canary_read=st.booleans())
def test_topic_calls(stub, rpc, name, canary_read):
    case()
    if canary_read and rpc not in ("CreateTopic", "DeleteTopic"):
        name = CANARY
    code, reply = call(getattr(stub, rpc), getattr(smq_pb2, f"{rpc}Request")(topic=name))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        assert rpc in ("GetLatestOffset", "GetEarliestOffset")
    if name == CANARY and rpc in ("GetLatestOffset", "GetEarliestOffset"):
        assert code == OK and reply.offset == (40 if rpc == "GetLatestOffset" else 1)


@FUZZ
@given(name=st.one_of(st.sampled_from(POOL), names), payload=payloads)
def test_produce(stub, name, payload):
    case()
    ensure_pool(stub)
    code, reply = call(stub.Produce, smq_pb2.ProduceRequest(topic=name, message=payload))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    elif name in POOL:
        assert code == (OK if len(payload) <= MAX_MESSAGE else grpc.StatusCode.RESOURCE_EXHAUSTED)
    if code == OK:
        back = stub.Consume(smq_pb2.ConsumeRequest(topic=name, offset=reply.offset), timeout=DEADLINE)
        assert back.message == payload and back.offset == reply.offset


@FUZZ
@given(name=st.one_of(st.sampled_from(POOL), names), batch=st.lists(payloads, max_size=12))
def test_produce_batch(stub, name, batch):
    case()
    ensure_pool(stub)
    code, reply = call(stub.ProduceBatch, smq_pb2.ProduceBatchRequest(topic=name, messages=batch))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    elif name in POOL:
        too_big = any(len(p) > MAX_MESSAGE for p in batch)
        assert code == (grpc.StatusCode.RESOURCE_EXHAUSTED if too_big else OK)
    if code == OK and batch:
        assert reply.last_offset - reply.first_offset + 1 == len(batch)
        back = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(
            topic=name, start_offset=reply.first_offset, limit=len(batch)), timeout=DEADLINE)
        assert [(m.offset, m.message) for m in back.messages] == list(
            zip(range(reply.first_offset, reply.last_offset + 1), batch))
    elif code == OK:
        assert (reply.first_offset, reply.last_offset) == (0, 0)


def predicted_stream_outcome(items):
    """(code, items appended) when every name is a pool topic or invalid; None if unsure."""
    for index, (name, payload) in enumerate(items):
        if not valid(name):
            return grpc.StatusCode.INVALID_ARGUMENT, items[:index]
        if name not in POOL:
            return None
        if len(payload) > MAX_MESSAGE:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, items[:index]
    return OK, items


@FUZZ
@given(items=st.lists(st.tuples(st.one_of(st.sampled_from(POOL), names), payloads), max_size=8))
def test_stream_produce(stub, items):
    case()
    ensure_pool(stub)
    latest = {name: stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=name)).topic.next_offset
              for name in POOL}
    code, reply = call(stub.StreamProduce,
                       iter([smq_pb2.ProduceRequest(topic=n, message=p) for n, p in items]))
    predicted = predicted_stream_outcome(items)
    if predicted is None:
        return
    expected_code, appended = predicted
    assert code == expected_code
    if code == OK:
        assert reply.offset == (latest[appended[-1][0]] + sum(1 for n, _ in appended if n == appended[-1][0]) - 1
                                if appended else 0)
    for name in POOL:  # exactly the items before the failure were appended, in order
        mine = [p for n, p in appended if n == name]
        back = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(
            topic=name, start_offset=latest[name], limit=len(mine) + 1), timeout=DEADLINE)
        assert [m.message for m in back.messages] == mine


@FUZZ
@given(name=read_names, offset=int64s, canary_read=st.booleans())
def test_consume(stub, canary, name, offset, canary_read):
    case()
    name = CANARY if canary_read else name
    code, reply = call(stub.Consume, smq_pb2.ConsumeRequest(topic=name, offset=offset))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if name == CANARY:
        if offset < 1:
            assert code == grpc.StatusCode.NOT_FOUND
        elif offset > len(canary):
            assert code == grpc.StatusCode.OUT_OF_RANGE
        else:
            assert code == OK and (reply.offset, reply.message) == (offset, canary[offset - 1])


def expected_page(stored: list[tuple[int, bytes]], start: int, limit: int) -> list[tuple[int, bytes]]:
    """BulkRetrieve on a topic of small messages (the byte budget is never reached)."""
    count = 100 if limit <= 0 else min(limit, 10_000)
    return [(o, p) for o, p in stored if o >= start][:count]


@FUZZ
@given(name=read_names, start=int64s, limit=int32s, canary_read=st.booleans())
def test_bulk_retrieve(stub, canary, name, start, limit, canary_read):
    case()
    name = CANARY if canary_read else name
    code, reply = call(stub.BulkRetrieve,
                       smq_pb2.BulkRetrieveRequest(topic=name, start_offset=start, limit=limit))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if code != OK:
        return
    got = [(m.offset, m.message) for m in reply.messages]
    assert reply.count == len(got) and len(got) <= (100 if limit <= 0 else min(limit, 10_000))
    assert [o for o, _ in got] == sorted(o for o, _ in got) and all(o >= start for o, _ in got)
    assert reply.next_offset == (got[-1][0] + 1 if got else start)
    if name == CANARY:
        assert got == expected_page(list(enumerate(canary, 1)), start, limit)


@FUZZ
@given(name=names, offset=int64s)
def test_delete_until_offset(stub, name, offset):
    case()
    code, _ = call(stub.DeleteUntilOffset, smq_pb2.DeleteUntilOffsetRequest(topic=name, offset=offset))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if code == OK:
        earliest_code, reply = call(stub.GetEarliestOffset, smq_pb2.GetEarliestOffsetRequest(topic=name))
        assert earliest_code == grpc.StatusCode.FAILED_PRECONDITION or reply.offset > offset


def first_response(method, request):
    """The first response of a server stream (then cancelled): (code, response)."""
    STATS["calls"] += 1
    stream = method(request, timeout=DEADLINE)
    try:
        response, code = next(stream), OK
    except grpc.RpcError as exc:
        response, code = None, exc.code()
        assert code in WIRE_CODES, f"{code} {exc.details()!r} for {request!r:.300} ({server_state()})"
    finally:
        stream.cancel()
    STATS[code.name] += 1
    return code, response


@FUZZ
@given(subscribe=st.booleans(), name=read_names, offset=int64s, page=int32s, canary_read=st.booleans())
def test_streams(stub, canary, subscribe, name, offset, page, canary_read):
    """StreamConsume and Subscribe: the first response, within the deadline (a stream
    that has nothing to send heartbeats every 0.3 s)."""
    case()
    name = CANARY if canary_read else name
    if subscribe:
        code, reply = first_response(stub.Subscribe, smq_pb2.SubscribeRequest(
            topic=name, offset=offset, max_messages=page))
    else:
        code, reply = first_response(stub.StreamConsume, smq_pb2.ConsumeRequest(topic=name, offset=offset))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if name != CANARY:
        return
    assert code == OK
    start = max(offset, 1)
    if subscribe:
        want = [(o, p) for o, p in enumerate(canary, 1) if o >= start][:10_000 if page <= 0 else page]
        assert [(m.offset, m.message) for m in reply.messages] == want
        assert reply.next_offset == (want[-1][0] + 1 if want else start)
    elif start <= len(canary):
        assert (reply.offset, reply.message) == (start, canary[start - 1])
    else:
        assert (reply.offset, reply.message) == (-1, b"")  # heartbeat


optional_int64 = st.one_of(st.none(), int64s)


@FUZZ
@given(name=st.one_of(st.builds(lambda n: "pol-" + n, st.text(VALID_CHARS, max_size=8)), names),
       create=st.booleans(), max_messages=optional_int64, max_bytes=optional_int64,
       max_age=optional_int64,
       on_full=st.one_of(st.none(), st.sampled_from(["reject", "drop-oldest", "REJECT", "", "\x00"]),
                         st.text(max_size=20)))
def test_topic_policy(stub, name, create, max_messages, max_bytes, max_age, on_full):
    """Policies only on topics of their own ("pol-..."): retention must not trim others."""
    case()
    if not name.startswith("pol-"):
        create = False
    if create:
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=name), timeout=DEADLINE)
    fields = {k: v for k, v in (("max_messages", max_messages), ("max_bytes", max_bytes),
                                ("max_age_seconds", max_age), ("on_full", on_full)) if v is not None}
    target = name if name.startswith("pol-") else "pol-never-created"
    code, reply = call(stub.SetTopicPolicy, smq_pb2.SetTopicPolicyRequest(
        topic=target if valid(name) else name, policy=smq_pb2.TopicPolicy(**fields)))
    if not valid(name):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return
    if not create:
        if target == "pol-never-created":  # bad fields may be refused before the lookup
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), code
        return
    bad = any(v < 0 for k, v in fields.items() if k != "on_full") or fields.get(
        "on_full", "reject") not in ("reject", "drop-oldest")
    assert code == (grpc.StatusCode.INVALID_ARGUMENT if bad else OK)
    if code == OK:
        for key, value in fields.items():
            assert getattr(reply.overrides, key) == value
        again = stub.GetTopicPolicy(smq_pb2.GetTopicPolicyRequest(topic=target), timeout=DEADLINE)
        assert again == reply


@FUZZ
@given(method=st.sampled_from(SMQ_METHODS), body=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda topic, tail: b"\x0a" + bytes([len(topic)]) + topic + tail,
              st.binary(min_size=1, max_size=100), st.binary(max_size=20))))
def test_raw_request_bodies(server, method, body):
    """Random bytes as the request of every method (a length-prefixed field 1 first
    half the time, to reach the topic checks with arbitrary non-UTF-8 bytes)."""
    case()
    if method in ("DeleteTopic", "DeleteUntilOffset", "SetTopicPolicy", "Produce", "ProduceBatch",
                  "StreamProduce"):
        try:  # never let a random body write to the canary
            message = getattr(smq_pb2, smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"]
                              .methods_by_name[method].input_type.name).FromString(body)
            if getattr(message, "topic", "") == CANARY:
                return
        except Exception:
            pass
    code, details = raw_call(server.channel(), method, body)
    if parses(method, body):
        assert code in WIRE_CODES, (code, details)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_oversize_requests_are_refused_whole(stub):
    """Beyond the server's maximum message size, and beyond gRPC's receive limit."""
    ensure_pool(stub)
    before = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic="fz-a")).topic.next_offset
    huge = b"h" * (5 * 1024**2)
    for method, request in [
            (stub.Produce, smq_pb2.ProduceRequest(topic="fz-a", message=huge)),
            (stub.ProduceBatch, smq_pb2.ProduceBatchRequest(topic="fz-a", messages=[huge])),
            (stub.ProduceBatch, smq_pb2.ProduceBatchRequest(
                topic="fz-a", messages=[b"m" * MAX_MESSAGE] * 300)),  # 4.8 MB of valid messages
            (stub.ProduceBatch, smq_pb2.ProduceBatchRequest(
                topic="fz-a", messages=[b"ok", b"m" * (MAX_MESSAGE + 1)]))]:
        assert call(method, request)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = call(stub.StreamProduce, iter([smq_pb2.ProduceRequest(topic="fz-a", message=huge)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic="fz-a")).topic.next_offset == before


# -- model-based: random call sequences checked exactly against docs/wire.md --------

class QueueModel(RuleBasedStateMachine):
    """Three fresh topics (and an invalid name), driven by random calls; each answer is
    compared with what docs/wire.md says it must be, from a model of the topics."""

    stub: smq_pb2_grpc.SuhaibMessageQueueStub

    def __init__(self) -> None:
        super().__init__()
        STATS["machines"] += 1
        self.prefix = f"sm{STATS['machines']}-{os.getpid()}"
        self.exists = [False] * 3
        self.next = [1] * 3
        self.stored: list[dict[int, bytes]] = [{} for _ in range(3)]

    def name(self, i: int) -> str:
        return f"{self.prefix}-{i}" if i < 3 else f"{self.prefix} bad!"

    def check(self, i: int, method, request, expected_code):
        case()
        code, reply = call(method, request)
        if i == 3:
            expected_code = grpc.StatusCode.INVALID_ARGUMENT
        elif not self.exists[i] and expected_code != "create":
            expected_code = grpc.StatusCode.NOT_FOUND
        elif expected_code == "create":
            expected_code = OK
        assert code == expected_code, f"{code} != {expected_code} for {request!r:.200}"
        return code == OK and reply

    topic = st.integers(0, 3)

    @rule(i=topic)
    def create(self, i):
        if self.check(i, self.stub.CreateTopic, smq_pb2.CreateTopicRequest(topic=self.name(i)), "create"):
            self.exists[i] = True

    @rule(i=topic)
    def delete_topic(self, i):
        if self.check(i, self.stub.DeleteTopic, smq_pb2.DeleteTopicRequest(topic=self.name(i)), OK):
            self.exists[i] = False
            self.stored[i] = {}

    def append(self, i: int, payload: bytes) -> int:
        offset = self.next[i]
        self.stored[i][offset] = payload
        self.next[i] += 1
        return offset

    @rule(i=topic, payload=payloads)
    def produce(self, i, payload):
        too_big = len(payload) > MAX_MESSAGE
        reply = self.check(i, self.stub.Produce, smq_pb2.ProduceRequest(topic=self.name(i), message=payload),
                           grpc.StatusCode.RESOURCE_EXHAUSTED if too_big else OK)
        if reply:
            assert reply.offset == self.append(i, payload)

    @rule(i=topic, batch=st.lists(payloads, max_size=5))
    def produce_batch(self, i, batch):
        too_big = any(len(p) > MAX_MESSAGE for p in batch)
        reply = self.check(i, self.stub.ProduceBatch, smq_pb2.ProduceBatchRequest(
            topic=self.name(i), messages=batch), grpc.StatusCode.RESOURCE_EXHAUSTED if too_big else OK)
        if reply:
            offsets = [self.append(i, p) for p in batch]
            assert (reply.first_offset, reply.last_offset) == ((offsets[0], offsets[-1]) if offsets else (0, 0))

    @rule(items=st.lists(st.tuples(topic, payloads), max_size=6))
    def stream_produce(self, items):
        case()
        code, reply = call(self.stub.StreamProduce, iter(
            [smq_pb2.ProduceRequest(topic=self.name(i), message=p) for i, p in items]))
        expected, last = OK, 0
        for i, payload in items:
            if i == 3:
                expected = grpc.StatusCode.INVALID_ARGUMENT
            elif not self.exists[i]:
                expected = grpc.StatusCode.NOT_FOUND
            elif len(payload) > MAX_MESSAGE:
                expected = grpc.StatusCode.RESOURCE_EXHAUSTED
            if expected != OK:
                break
            last = self.append(i, payload)
        assert code == expected
        if code == OK:
            assert reply.offset == last

    @rule(i=topic, offset=int64s)
    def trim(self, i, offset):
        if self.check(i, self.stub.DeleteUntilOffset, smq_pb2.DeleteUntilOffsetRequest(
                topic=self.name(i), offset=offset), OK):
            self.stored[i] = {o: p for o, p in self.stored[i].items() if o > offset}

    @rule(i=topic, offset=int64s)
    def consume(self, i, offset):
        if i < 3 and self.exists[i]:
            expected = (grpc.StatusCode.OUT_OF_RANGE if offset >= self.next[i] and offset >= 1 else
                        OK if offset in self.stored[i] else grpc.StatusCode.NOT_FOUND)
        else:
            expected = OK
        reply = self.check(i, self.stub.Consume, smq_pb2.ConsumeRequest(topic=self.name(i), offset=offset),
                           expected)
        if reply:
            assert (reply.offset, reply.message) == (offset, self.stored[i][offset])

    @rule(i=topic, latest=st.booleans())
    def earliest_latest(self, i, latest):
        stored = self.stored[i] if i < 3 else {}
        method, request = ((self.stub.GetLatestOffset, smq_pb2.GetLatestOffsetRequest) if latest else
                           (self.stub.GetEarliestOffset, smq_pb2.GetEarliestOffsetRequest))
        reply = self.check(i, method, request(topic=self.name(i)),
                           OK if stored else grpc.StatusCode.FAILED_PRECONDITION)
        if reply:
            assert reply.offset == (max(stored) if latest else min(stored))

    @rule(i=topic, start=int64s, limit=int32s)
    def bulk_retrieve(self, i, start, limit):
        reply = self.check(i, self.stub.BulkRetrieve, smq_pb2.BulkRetrieveRequest(
            topic=self.name(i), start_offset=start, limit=limit), OK)
        if reply:
            want = expected_page(sorted(self.stored[i].items()), start, limit)
            assert [(m.offset, m.message) for m in reply.messages] == want
            assert reply.count == len(want)
            assert reply.next_offset == (want[-1][0] + 1 if want else start)

    @rule(i=topic)
    def describe(self, i):
        reply = self.check(i, self.stub.DescribeTopic, smq_pb2.DescribeTopicRequest(topic=self.name(i)), OK)
        if reply:
            stored, info = self.stored[i], reply.topic
            assert (info.earliest_offset, info.latest_offset) == ((min(stored), max(stored)) if stored else (0, 0))
            assert (info.message_count, info.stored_bytes, info.next_offset) == (
                len(stored), sum(map(len, stored.values())), self.next[i])

    @rule(i=topic, offset=int64s, page=int32s, subscribe=st.booleans())
    def follow(self, i, offset, page, subscribe):
        case()
        if subscribe:
            code, reply = first_response(self.stub.Subscribe, smq_pb2.SubscribeRequest(
                topic=self.name(i), offset=offset, max_messages=page))
        else:
            code, reply = first_response(self.stub.StreamConsume, smq_pb2.ConsumeRequest(
                topic=self.name(i), offset=offset))
        if i == 3:
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            return
        if not self.exists[i]:
            assert code == grpc.StatusCode.NOT_FOUND
            return
        assert code == OK
        start = max(offset, 1)
        want = [(o, p) for o, p in sorted(self.stored[i].items()) if o >= start]
        if subscribe:
            want = want[:10_000 if page <= 0 else page]
            assert [(m.offset, m.message) for m in reply.messages] == want
            assert reply.next_offset == (want[-1][0] + 1 if want else max(start, self.next[i]))
        else:
            assert (reply.offset, reply.message) == (want[0] if want else (-1, b""))

    @rule()
    def list_topics(self):
        case()
        code, reply = call(self.stub.ListTopics, smq_pb2.ListTopicsRequest())
        assert code == OK
        listed = {t.name for t in reply.topics}
        for i in range(3):
            assert (self.name(i) in listed) == self.exists[i]


def test_model_based_call_sequences(stub):
    QueueModel.stub = stub
    run_state_machine_as_test(QueueModel, settings=settings(
        max_examples=max(EXAMPLES // 3, 5), stateful_step_count=40, deadline=None,
        suppress_health_check=list(HealthCheck)))


# -- the server survived, and the canary and the file are intact ------------------------

def test_zz_server_survived_with_data_intact(server, stub, canary):
    """After whatever ran before (this need not run last: the module's server fixture
    stops the server at the end and checks the exit code, the file and the canary again)."""
    stub.Connect(smq_pb2.ConnectRequest(), timeout=DEADLINE)  # answers (raises otherwise)
    reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=CANARY, start_offset=1, limit=1000))
    assert [(m.offset, m.message) for m in reply.messages] == list(enumerate(canary, 1))
    info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=CANARY)).topic
    assert (info.earliest_offset, info.latest_offset, info.next_offset, info.stored_bytes) == (
        1, len(canary), len(canary) + 1, sum(map(len, canary)))
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log and "ERROR" not in log, log[-3000:]
    assert integrity(server.db) == "ok"
    conn = apsw.Connection(str(server.db))
    try:
        rows = [(offset, payload) for name, offset, payload in stored_messages(conn) if name == CANARY]
    finally:
        conn.close()
    assert rows == list(enumerate(canary, 1))
