"""Hostile and broken clients on the wire: garbage bytes and half-open HTTP/2
connections, clients that vanish, 200 idle streams, a consumer that never reads,
the stream cap. One server per module (--max-streams 250); its memory is sampled
all along (VmRSS every 0.1 s, and the kernel's VmHWM) and reported at the end.

A flood of HEADERS-only calls on one connection must leave threads for other clients
(the server caps calls per connection), and a ProduceBatch of a million empty messages
must not blow up memory (the server caps messages per batch).
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

import grpc
import pytest

from support import ROOT
from support.poll import eventually
from support.servers import ServerProcess, clean_env, integrity
from smq._proto import smq_pb2

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
                rss = memory(self.pid).get("VmRSS")
            except OSError:
                rss = None
            if rss is None:  # the process is gone (or a zombie)
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
    # After every test of the module, in whatever order they ran: the server stops
    # cleanly and leaves a sound file.
    code = None
    if proc.proc.poll() is None:
        REPORT["peak RSS (VmHWM)"] = memory(proc.proc.pid).get("VmHWM", 0) / 1024
        code = proc.terminate()
    proc.sampler.stop()
    proc.close()
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n[hostile] figures (memory in MiB of the module's server unless said):")
        for key, value in REPORT.items():
            print(f"[hostile]   {key}: {value:.1f}")
    log = proc.log()
    assert code == 0, f"the server exited {code}:\n{log[-3000:]}"
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert integrity(proc.db) == "ok"


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


def serves_normally(server, topic: str, count: int = 50) -> None:
    """A fresh client creates, produces, consumes and reads back, all within deadlines."""
    stub = server.stub(own_connection=True)
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

def test_garbage_bytes_and_half_open_http2_connections(server):
    rng = random.Random(7)
    held = []
    for size in (1, 9, 24, 100, 4096, 65536, 300_000):  # random bytes, then hold the socket
        held.append(raw_connection(server, rng.randbytes(size)))
    for _ in range(5):  # random bytes, then close at once
        raw_connection(server, rng.randbytes(rng.randrange(1, 10_000))).close()
    held += [
        raw_connection(server, PREFACE),  # preface, then silence
        raw_connection(server, PREFACE[:10]),  # half a preface
        raw_connection(server, PREFACE + SETTINGS),
        raw_connection(server, PREFACE + SETTINGS + headers(1, "Produce")),  # HEADERS, then nothing
        raw_connection(server, PREFACE + SETTINGS + headers(1, "StreamProduce")),
        raw_connection(server, PREFACE + SETTINGS + headers(1, "StreamConsume")),
        raw_connection(server, PREFACE + SETTINGS + headers(1, "Produce", end_headers=False)),
        # a gRPC message announced as 1 MiB, of which 10 bytes come
        raw_connection(server, PREFACE + SETTINGS + headers(1, "Produce")
                       + data(1, b"\x00" + struct.pack(">I", MIB) + b"0123456789")),
        raw_connection(server, PREFACE + SETTINGS + frame(0x1, 0x4, 1, b"\xff" * 50)),  # bad HPACK
        raw_connection(server, PREFACE + rng.randbytes(2000)),  # preface, then garbage frames
    ]
    time.sleep(1)
    serves_normally(server, "while-held")
    for sock in held:
        sock.close()
    serves_normally(server, "after-closed")
    assert server.proc.poll() is None and "Traceback" not in server.log()


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
    (the open calls, the refusal's status code or None). Each on a topic of its own
    (`topic`-N, made with one message): at the cap, a connection's new stream on a topic
    it already streams would replace its oldest one there instead of being refused."""
    stub = server.stub(own_connection=True)
    opened = []
    for n in range(limit):
        own_topic = f"{topic}-{n}"
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=own_topic), timeout=DEADLINE)
        if stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=own_topic),
                              timeout=DEADLINE).topic.next_offset == 1:
            stub.Produce(smq_pb2.ProduceRequest(topic=own_topic, message=b"first"), timeout=DEADLINE)
        stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=own_topic, offset=1), timeout=120)
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
    """Retry until `wanted` streams open (slots are freed asynchronously): the streams
    opened, and the code that refused the next one."""
    def attempt():
        opened, code = open_streams_until_refused(server, topic)
        if len(opened) >= wanted:
            return opened, code
        cancel_all(opened)
        return None

    return eventually(attempt, timeout=timeout, interval=1,
                      message=f"fewer than {wanted} stream slots came free")


def test_clients_that_vanish_free_their_stream_slots(server, stub):
    """A client process holding 60 streams and a StreamProduce is killed (-9)."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="vanish"))
    client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, server.address], cwd=ROOT,
                              env=clean_env(PYTHONPATH=os.pathsep.join(
                                  filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
                              stdout=subprocess.PIPE, text=True)
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


def test_200_idle_streams_others_unaffected_and_the_cap_answers_resource_exhausted(server, stub):
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="idle"))
    stub.Produce(smq_pb2.ProduceRequest(topic="idle", message=b"hello"))
    idle_stubs = [server.stub(own_connection=True) for _ in range(10)]  # 10 connections of 20 streams
    idle = [idle_stubs[i % 10].StreamConsume(smq_pb2.ConsumeRequest(topic="idle", offset=1))
            for i in range(200)]
    try:
        for stream in idle:
            assert next(stream).message == b"hello"
        REPORT["RSS with 200 idle streams"] = memory(server.proc.pid)["VmRSS"] / 1024

        # Others work normally meanwhile: producers (unary, batch, stream) and a consumer.
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="busy"))
        errors: list[BaseException] = []
        consumed: list[int] = []

        def guarded(work):
            def run():
                try:
                    work()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
            return threading.Thread(target=run)

        def unary():
            producer = server.stub(own_connection=True)
            for _ in range(300):
                producer.Produce(smq_pb2.ProduceRequest(topic="busy", message=b"u"), timeout=DEADLINE)

        def batches():
            producer = server.stub(own_connection=True)
            for _ in range(30):
                producer.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="busy", messages=[b"b"] * 10),
                                      timeout=DEADLINE)

        def streamed():
            server.stub(own_connection=True).StreamProduce(
                iter([smq_pb2.ProduceRequest(topic="busy", message=b"s")] * 300), timeout=DEADLINE)

        def consumer():
            stream = server.stub(own_connection=True).StreamConsume(
                smq_pb2.ConsumeRequest(topic="busy", offset=1), timeout=120)
            for reply in stream:
                if reply.offset != -1:
                    consumed.append(reply.offset)
                if len(consumed) == 900:
                    break
            stream.cancel()

        threads = [guarded(work) for work in (unary, batches, streamed, consumer)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        REPORT["others' 900 messages took (s)"] = time.monotonic() - started
        assert not errors, errors
        assert consumed == list(range(1, 901))

        # The cap: 200 idle + 50 more open; the next stream (consume or produce) is refused.
        extra, code = wait_for_free_slots(server, "idle", MAX_STREAMS - 200)
        try:
            assert (len(extra), code) == (MAX_STREAMS - 200, grpc.StatusCode.RESOURCE_EXHAUSTED)
            REPORT["RSS with 250 open streams"] = memory(server.proc.pid)["VmRSS"] / 1024
            with pytest.raises(grpc.RpcError) as err:
                stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="busy", message=b"x")]),
                                   timeout=DEADLINE)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as err:
                next(stub.Subscribe(smq_pb2.SubscribeRequest(topic="idle"), timeout=DEADLINE))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Unary calls are not streams: they still work at the cap.
            assert stub.Produce(smq_pb2.ProduceRequest(topic="busy", message=b"at cap"),
                                timeout=DEADLINE).offset == 901
            assert stub.Consume(smq_pb2.ConsumeRequest(topic="busy", offset=901),
                                timeout=DEADLINE).message == b"at cap"
        finally:
            cancel_all(extra)
    finally:
        cancel_all(idle)
    opened, _ = wait_for_free_slots(server, "idle", MAX_STREAMS)
    cancel_all(opened)
    assert len(opened) == MAX_STREAMS  # every slot came back


def test_consumer_that_never_reads_keeps_server_memory_bounded(server, stub):
    """A StreamConsume whose iterator is never advanced while 100 MiB go to its topic
    (the issue asks for 50: twice that makes the bound plainer). gRPC flow control
    stops the server's sender; memory must not grow with the data."""
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="flood"))
    stalled = server.stub(own_connection=True).StreamConsume(smq_pb2.ConsumeRequest(topic="flood", offset=1),
                                                  timeout=300)
    time.sleep(1)
    baseline = server.sampler.reset()
    big = [bytes([i % 256]) * (256 * 1024) for i in range(8)]
    produced = 0
    latencies = []
    reader_got = []

    def reader():  # another consumer of the same topic reads everything meanwhile
        stream = server.stub(own_connection=True).StreamConsume(smq_pb2.ConsumeRequest(topic="flood", offset=1),
                                                     timeout=300)
        for reply in stream:
            if reply.offset != -1:
                reader_got.append(reply.offset)
            if len(reader_got) == 400:
                break
        stream.cancel()

    thread = threading.Thread(target=reader)
    thread.start()
    other = server.stub(own_connection=True)
    other.CreateTopic(smq_pb2.CreateTopicRequest(topic="bystander"))
    growth = []
    for half in range(2):
        for _ in range(25):
            stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="flood", messages=big), timeout=DEADLINE)
            produced += sum(map(len, big))
            started = time.monotonic()
            other.Produce(smq_pb2.ProduceRequest(topic="bystander", message=b"still here"),
                          timeout=DEADLINE)
            latencies.append(time.monotonic() - started)
        if half:
            thread.join(300)
        time.sleep(2)  # let the stalled sender fill whatever it can
        growth.append((server.sampler.peak - baseline) / 1024)
    REPORT["stalled consumer: produced"] = produced / MIB
    REPORT["stalled consumer: peak RSS growth at 50 MiB"] = growth[0]
    REPORT["stalled consumer: peak RSS growth at 100 MiB"] = growth[1]
    REPORT["bystander Produce max latency (s)"] = max(latencies)
    assert reader_got == list(range(1, 401))
    # Bounded: the second 50 MiB add little (4 to 12 MiB measured: allocator churn),
    # and the total stays well below what was produced. Buffering for the stalled
    # stream would add 50 MiB per 50 MiB.
    assert growth[1] - growth[0] < 30, f"RSS grew {growth} MiB after 50 and 100 MiB produced"
    assert growth[1] < 80, f"RSS grew {growth[1]:.0f} MiB while {produced / MIB:.0f} MiB were produced"

    # Nothing was lost for the slow one: it now reads all 400, in order, exactly.
    count = 0
    for reply in stalled:
        if reply.offset == -1:
            continue
        count += 1
        assert reply.offset == count and reply.message == big[(count - 1) % 8]
        if count == 400:
            break
    stalled.cancel()


def test_headers_only_stream_flood_does_not_starve_others(server):
    total = 8 + MAX_STREAMS + 4 * 8 + 10
    sock = raw_connection(server, PREFACE, SETTINGS,
                          b"".join(headers(1 + 2 * i, "Produce") for i in range(total)))
    try:
        time.sleep(2)
        server.stub(own_connection=True).Connect(smq_pb2.ConnectRequest(), timeout=10)
    finally:
        sock.close()

        def answers() -> bool:
            try:
                server.stub(own_connection=True).Connect(smq_pb2.ConnectRequest(), timeout=5)
                return True
            except grpc.RpcError:
                return False

        # The module's other tests use this server: it must answer again.
        eventually(answers, timeout=60, interval=0.5, message="the server did not answer again")


def test_produce_batch_of_a_million_empty_messages_keeps_memory_bounded(start_server):
    own = start_server()
    stub = own.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="tiny"))
    before = memory(own.proc.pid)["VmHWM"]
    try:
        stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="tiny", messages=[b""] * 1_000_000),
                          timeout=120)
    except grpc.RpcError as exc:  # refusing it is a fine answer
        assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    growth = (memory(own.proc.pid)["VmHWM"] - before) / 1024
    REPORT["own server: ProduceBatch of 1e6 empty messages, VmHWM growth"] = growth
    assert growth < 64, f"one 2 MB request grew the server's peak memory by {growth:.0f} MiB"


def test_zz_server_survived_with_data_intact(server, stub, canary):
    """Whatever ran before (this need not run last: the module's server fixture stops
    the server at the end and checks the exit code and the file again)."""
    reply = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="canary", start_offset=1, limit=1000))
    assert [(m.offset, m.message) for m in reply.messages] == list(enumerate(canary, 1))
    serves_normally(server, "at-the-end")
    REPORT["highest sampled VmRSS"] = server.sampler.overall / 1024
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert integrity(server.db) == "ok"
