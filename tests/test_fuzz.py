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
