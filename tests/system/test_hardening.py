"""The server works under the unit's MemoryDenyWriteExecute=yes.

systemd implements that setting with a seccomp filter; Linux 6.3+ has the same
rule built in (prctl PR_SET_MDWE: no mapping may be writable and executable, or
become executable). The server is started behind that prctl and driven through
every kind of call, so a dependency that needs W+X memory (a JIT, libffi
trampolines) would fail here before it fails on a device.
"""
from __future__ import annotations

import sys

import pytest

from support.servers import SERVER_COMMAND, mdwe_supported
from smq._proto import smq_pb2

# prctl(PR_SET_MDWE=65, PR_MDWE_REFUSE_EXEC_GAIN=1); the rule survives execve.
WRAPPER = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(not mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_server_runs_without_writable_executable_memory(start_server):
    server = start_server("--heartbeat-interval", "0.2",
                          command=[sys.executable, "-c", WRAPPER, *SERVER_COMMAND])
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"one")).offset == 1
    assert stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="t", message=b"two"),
                                    smq_pb2.ProduceRequest(topic="t", message=b"three")])).offset == 3
    assert stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[b"4", b"5"])).last_offset == 5
    stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic="t", offset=1))
    seen = []
    for reply in stream:
        if reply.offset > 0:
            seen.append(reply.offset)
        if len(seen) == 5:
            break
    stream.cancel()
    assert seen == [1, 2, 3, 4, 5]
    assert stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="t", start_offset=1)).count == 5
    assert server.terminate() == 0
    assert "Traceback" not in server.log()
