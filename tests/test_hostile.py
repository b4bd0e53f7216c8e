"""Hostile and broken clients on the wire: garbage bytes and half-open HTTP/2
connections, clients that vanish, 200 idle streams, a consumer that never reads,
the stream cap. One server per module (--max-streams 250); its memory is sampled
all along (VmRSS every 0.1 s, and the kernel's VmHWM) and reported at the end.

Two known weaknesses are pinned by strict xfail tests (they fail when fixed: then
drop the marker): a stream flood of HEADERS-only calls on one connection, and the
memory of a ProduceBatch of a million empty messages.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import apsw
import grpc
import pytest

from conftest import ROOT, ServerProcess, clean_env
from smq._proto import smq_pb2, smq_pb2_grpc

MAX_STREAMS = 250
DEADLINE = 30.0  # generous: the machine is shared
MIB = 1024**2
REPORT: dict[str, float] = {}


# -- the server and its memory ------------------------------------------------------

def memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads of a process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(value.split()[0])
    return values


class Sampler:
    """Samples a process's VmRSS every 0.1 s; `peak` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                rss = memory(self.pid)["VmRSS"]
            except OSError:
                return
            self.peak = max(self.peak, rss)
            self.overall = max(self.overall, rss)

    def reset(self) -> int:
        self.peak = memory(self.pid)["VmRSS"]
        return self.peak

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("hostile")
    proc = ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          "--max-streams", str(MAX_STREAMS), "--heartbeat-interval", "1"],
                         tmp).wait_serving()
    proc.db = tmp / "smq.db"
    proc.sampler = Sampler(proc.proc.pid)
    REPORT["RSS at start"] = memory(proc.proc.pid)["VmRSS"] / 1024
    yield proc
    if proc.proc.poll() is None:
        REPORT["peak RSS (VmHWM)"] = memory(proc.proc.pid)["VmHWM"] / 1024
    proc.sampler.stop()
    proc.close()
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n[hostile] figures (memory in MiB of the module's server unless said):")
        for key, value in REPORT.items():
            print(f"[hostile]   {key}: {value:.1f}")


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


@pytest.fixture(scope="module", autouse=True)
def canary(stub) -> list[bytes]:
    payloads = [os.urandom(random.randrange(1, 5000)) for _ in range(100)]
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="canary"))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="canary", messages=payloads))
    return payloads


@pytest.fixture(autouse=True)
def peak_rss(server, request):
    """Record the server's peak RSS during each test."""
    server.sampler.reset()
    yield
    if "start_server" not in request.fixturenames:  # (not for a test with its own server)
        REPORT[f"peak during {request.node.name}"] = server.sampler.peak / 1024


def separate_stub(server) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    """A stub on its own TCP connection (channels otherwise share one)."""
    return smq_pb2_grpc.SuhaibMessageQueueStub(
        server.channel(**{"grpc.use_local_subchannel_pool": 1}))


def serves_normally(server, topic: str, count: int = 50) -> None:
    """A fresh client creates, produces, consumes and reads back, all within deadlines."""
    stub = separate_stub(server)
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=DEADLINE)
    sent = [os.urandom(64) for _ in range(count)]
    offsets = [stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=m), timeout=DEADLINE).offset
               for m in sent]
    stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=topic, offset=offsets[0]), timeout=DEADLINE)
    got = []
    for reply in stream:
        if reply.offset != -1:
            got.append((reply.offset, reply.message))
        if len(got) == count:
            break
    stream.cancel()
    assert got == list(zip(offsets, sent))


# -- raw HTTP/2 -------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


SETTINGS = frame(0x4, 0, 0)


def headers(stream: int, method: str, end_headers: bool = True) -> bytes:
    """A HEADERS frame opening a gRPC call (HPACK literals without indexing)."""
    block = b""
    for name, value in ((":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                        (":path", f"/smq.SuhaibMessageQueue/{method}"),
                        ("content-type", "application/grpc"), ("te", "trailers")):
        block += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return frame(0x1, 0x4 if end_headers else 0, stream, block)


def data(stream: int, payload: bytes) -> bytes:
    return frame(0x0, 0, stream, payload)


def raw_connection(server, *chunks: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    for chunk in chunks:
        sock.sendall(chunk)
    return sock


# -- the tests --------------------------------------------------------------------------

VANISHING_CLIENT = """
import sys, time, grpc
from smq._proto import smq_pb2, smq_pb2_grpc
stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(sys.argv[1]))
streams = [stub.StreamConsume(smq_pb2.ConsumeRequest(topic="canary", offset=1)) for _ in range(60)]
for stream in streams:
    next(stream)
def forever():
    yield smq_pb2.ProduceRequest(topic="vanish", message=b"first")
    time.sleep(3600)
future = stub.StreamProduce.future(forever())
print("ready", flush=True)
time.sleep(3600)
"""


def open_streams_until_refused(server, topic: str, limit: int = MAX_STREAMS + 20):
    """Open StreamConsume calls (each reads its first message) until one is refused:
    (the open calls, the refusal's status code or None)."""
    stub = separate_stub(server)
    opened = []
    for _ in range(limit):
        stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=topic, offset=1), timeout=120)
        try:
            next(stream)
        except grpc.RpcError as exc:
            return opened, exc.code()
        opened.append(stream)
    return opened, None


def cancel_all(streams) -> None:
    for stream in streams:
        stream.cancel()


def wait_for_free_slots(server, topic: str, wanted: int, timeout: float = 60.0):
    """Retry until `wanted` streams open (slots are freed asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        opened, code = open_streams_until_refused(server, topic)
        if len(opened) >= wanted or time.monotonic() > deadline:
            return opened, code
        cancel_all(opened)
        time.sleep(1)


def test_clients_that_vanish_free_their_stream_slots(server, stub):
    """A client process holding 60 streams and a StreamProduce is killed (-9)."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="vanish"))
    client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, server.address], cwd=ROOT,
                              env=clean_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        client.stdout.close()
    opened, code = wait_for_free_slots(server, "canary", MAX_STREAMS)
    cancel_all(opened)
    assert (len(opened), code) == (MAX_STREAMS, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # What the vanished StreamProduce sent before it died was appended (in doubt: it
    # never half-closed, so it never got an answer; the server keeps what it accepted).
    reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="vanish", start_offset=1))
    assert [m.message for m in reply.messages] in ([b"first"], [])
    # Its death is no error of the server's: no traceback in the log (there was one,
    # 'Exception serializing message!', for every StreamProduce whose client died).
    assert "Traceback" not in server.log() and "ERROR" not in server.log()
