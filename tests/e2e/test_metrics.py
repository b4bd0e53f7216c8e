"""The server's metrics port on a real server process: exact values after known traffic,
the bound on topic labels, /healthz, refused settings, and clients that abuse the port."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from smq import __version__
from smq._proto import smq_pb2
from support.poll import eventually
from support.scrape import get, label_values, metrics_port, scrape, value
from support.servers import (
    ServerProcess,
    assert_one_line_refusal,
    free_port,
    make_topic,
    module_server,
    start_and_fail,
)

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = module_server(tmp_path_factory, "metrics", "--metrics-port", "0",
                         "--metrics-max-topics", "4", "--health-check-interval", "0.5")
    proc.metrics = metrics_port(proc.log())
    yield proc
    proc.close()


def test_counts_are_exact_after_known_traffic(server):
    stub = server.stub()
    make_topic(stub, "exact", 7)  # 7 unary Produce calls
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="exact", messages=[b"b"] * 30))
    last = stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic="exact", message=b"s")] * 5))
    assert last.offset == 42
    stub.Consume(smq_pb2.ConsumeRequest(topic="exact", offset=3))
    page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="exact", start_offset=1, limit=10))
    assert len(page.messages) == 10
    stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic="exact", offset=40))
    assert [next(stream).offset for _ in range(3)] == [40, 41, 42]
    stream.cancel()
    stub.CommitOffset(smq_pb2.CommitOffsetRequest(topic="exact", consumer="app", offset=30))
    with pytest.raises(grpc.RpcError):
        stub.Consume(smq_pb2.ConsumeRequest(topic="no-such-topic", offset=1))

    def settled() -> bool:  # the stream's end is counted once gRPC has closed it
        samples = scrape(server.metrics)
        return value(samples, "smq_open_streams", method="StreamConsume") == 0
    eventually(settled, timeout=10)
    samples = scrape(server.metrics)
    assert value(samples, "smq_topic_produced_messages_total", topic="exact") == 42
    assert value(samples, "smq_topic_stored_messages", topic="exact") == 42
    assert value(samples, "smq_topic_stored_bytes", topic="exact") == 7 * 2 + 30 + 5
    assert value(samples, "smq_topic_earliest_offset", topic="exact") == 1
    assert value(samples, "smq_topic_latest_offset", topic="exact") == 42
    assert value(samples, "smq_topic_delivered_messages_total", topic="exact") == 1 + 10 + 3
    assert value(samples, "smq_consumer_committed_offset", topic="exact", consumer="app") == 30
    assert value(samples, "smq_consumer_lag_messages", topic="exact", consumer="app") == 12
    assert value(samples, "smq_rpcs_total", method="Produce", code="OK") == 7
    assert value(samples, "smq_rpcs_total", method="ProduceBatch", code="OK") == 1
    assert value(samples, "smq_rpcs_total", method="StreamProduce", code="OK") == 1
    assert value(samples, "smq_rpcs_total", method="StreamConsume", code="CANCELLED") == 1, [k for k in samples if k[0] == "smq_rpcs_total"]
    assert value(samples, "smq_rpcs_total", method="Consume", code="NOT_FOUND") == 1
    assert value(samples, "smq_rpc_duration_seconds_count", method="Produce") == 7
    assert label_values(samples, "smq_build_info", "version") == {__version__}
    assert value(samples, "smq_liveness_check_passing") == 1
    assert value(samples, "process_open_fds") > 0
    # Each commit is counted once: the messages per commit add up to what was appended.
    assert value(samples, "smq_commit_messages_sum") >= 42
    # fsync is timed for commits that wrote: all of them here but the liveness checks'
    # (the commits of 14 writes: 7 + 1 + 1 + 1 topic, consumer commit... at least 10)
    assert 10 <= value(samples, "smq_fsync_duration_seconds_count") <= value(
        samples, "smq_commit_duration_seconds_count")


def test_produced_counter_grows_by_exactly_n_under_concurrency(server):
    stub = server.stub()
    make_topic(stub, "concurrent")
    before = value(scrape(server.metrics), "smq_topic_produced_messages_total", topic="concurrent")

    def produce(worker: int) -> None:
        for i in range(50):
            stub.Produce(smq_pb2.ProduceRequest(topic="concurrent", message=b"%d-%d" % (worker, i)))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(produce, range(8)))
    samples = scrape(server.metrics)
    assert value(samples, "smq_topic_produced_messages_total", topic="concurrent") == before + 400
    assert value(samples, "smq_topic_latest_offset", topic="concurrent") == 400


def test_retention_drops_are_counted(server):
    stub = server.stub()
    make_topic(stub, "retained")
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="retained", policy=smq_pb2.TopicPolicy(max_messages=5)))
    for i in range(20):
        stub.Produce(smq_pb2.ProduceRequest(topic="retained", message=b"r"))
    samples = scrape(server.metrics)
    assert value(samples, "smq_topic_retention_dropped_messages_total", topic="retained") == 15
    assert value(samples, "smq_topic_stored_messages", topic="retained") == 5
    assert value(samples, "smq_topic_earliest_offset", topic="retained") == 16


def test_topics_past_the_bound_are_summed_under_other(server):
    stub = server.stub()
    for n in range(8):
        make_topic(stub, f"many-{n}", 2)
    samples = scrape(server.metrics)
    labelled = label_values(samples, "smq_topic_stored_messages", "topic")
    assert len(labelled) == 5 and "~other" in labelled  # --metrics-max-topics 4, then ~other
    topics = stub.ListTopics(smq_pb2.ListTopicsRequest()).topics
    assert value(samples, "smq_topics") == len(topics)
    total = sum(t.message_count for t in topics)
    assert sum(value(samples, "smq_topic_stored_messages", topic=t) for t in labelled) == total
    assert value(samples, "smq_topic_earliest_offset", topic="~other") is None


def test_no_topic_moves_between_labels_and_other_never_goes_down(server):
    """Deleting a topic with its own label frees its place for a new topic, not for one
    under ~other; deleting one under ~other keeps what it counted in ~other's counters."""
    stub = server.stub()
    for n in range(6):
        make_topic(stub, f"sticky-{n}", 3)
    before = scrape(server.metrics)
    own = label_values(before, "smq_topic_stored_messages", "topic") - {"~other"}
    other = value(before, "smq_topic_produced_messages_total", topic="~other")
    under_other = {t.name for t in stub.ListTopics(smq_pb2.ListTopicsRequest()).topics} - own
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic=sorted(own)[0]))
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic=sorted(under_other)[0]))
    make_topic(stub, "sticky-new", 1)
    after = scrape(server.metrics)
    labelled = label_values(after, "smq_topic_stored_messages", "topic") - {"~other"}
    assert labelled == (own - {sorted(own)[0]}) | {"sticky-new"}
    assert value(after, "smq_topic_produced_messages_total", topic="~other") == other


def test_a_deleted_topic_takes_its_counts_along(server):
    stub = server.stub()
    make_topic(stub, "again", 4)
    stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic="again", start_offset=1, limit=10))
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="again"))
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="again"))
    stub.Produce(smq_pb2.ProduceRequest(topic="again", message=b"new"))
    samples = scrape(server.metrics)
    if "again" in label_values(samples, "smq_topic_stored_messages", "topic"):
        assert value(samples, "smq_topic_produced_messages_total", topic="again") == 1
        assert value(samples, "smq_topic_delivered_messages_total", topic="again") == 0


def test_a_stream_produce_the_client_cancels_is_counted_cancelled(server):
    """Counted once, as CANCELLED. gRPC may end the server's request iterator before it
    records the cancellation (the call then looks finished, OK: Bazel's parallel run saw
    it), so each try must count the call exactly once, and one of five must see it as
    CANCELLED."""
    stub = server.stub()
    make_topic(stub, "cancelled")

    def counts() -> tuple[int, int]:
        metrics = scrape(server.metrics)
        return tuple(value(metrics, "smq_rpcs_total", method="StreamProduce", code=code) or 0
                     for code in ("OK", "CANCELLED"))

    for _ in range(5):
        release = threading.Event()

        def requests():
            yield smq_pb2.ProduceRequest(topic="cancelled", message=b"first")
            release.wait(10)

        ok, cancelled = counts()
        call = stub.StreamProduce.future(requests())
        eventually(lambda: value(scrape(server.metrics), "smq_open_streams",
                                 method="StreamProduce") == 1, timeout=10)  # its handler runs
        call.cancel()
        release.set()
        eventually(lambda: sum(counts()) == ok + cancelled + 1, timeout=10,
                   message=lambda: [k for k in scrape(server.metrics) if "StreamProduce" in str(k)])
        if counts()[1] == cancelled + 1:
            return
    raise AssertionError(f"five cancelled streams, none counted CANCELLED: {counts()}")


def test_without_the_flag_there_is_no_metrics_port(tmp_path):
    proc = ServerProcess(["--dbpath", str(tmp_path / "q.db"), "--port", "0", "--bind",
                          "127.0.0.1"], tmp_path).wait_serving()
    try:
        assert "metrics" not in proc.log()
        listening = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
        inodes = {os.readlink(f"/proc/{proc.proc.pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{proc.proc.pid}/fd")}
        sockets = {i[len("socket:["):-1] for i in inodes if i.startswith("socket:[")}
        listeners = [line for line in listening.splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[9] in sockets]
        assert len(listeners) == 1, listeners  # the gRPC port only
    finally:
        proc.close()


def test_metrics_open_to_the_network_are_warned_about(tmp_path):
    proc = ServerProcess(["--dbpath", str(tmp_path / "q.db"), "--port", "0", "--bind",
                          "127.0.0.1", "--metrics-port", "0", "--metrics-bind", "0.0.0.0"],
                         tmp_path).wait_serving()
    try:
        warning = [line for line in proc.log().splitlines() if "serving metrics on" in line]
        assert len(warning) == 1 and "--metrics-bind 127.0.0.1" in warning[0], proc.log()
        assert f"0.0.0.0:{metrics_port(proc.log())} " in warning[0]  # the port it got
    finally:
        proc.close()


def test_healthz_answers_ok_while_the_liveness_check_passes(server):
    assert get(server.metrics, "/healthz") == (200, "ok\n")
    assert get(server.metrics, "/nowhere")[0] == 404


def test_a_taken_metrics_port_refuses_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "q.db"),
                                "--metrics-port", str(port))
    assert_one_line_refusal(result, f"127.0.0.1:{port}", "metrics")
    assert not (tmp_path / "q.db").exists()  # refused before the database was touched


@pytest.mark.parametrize("flags, words", [
    (["--metrics-port", "70000"], ["--metrics-port", "70000"]),
    (["--metrics-port", "0", "--metrics-bind", "not an address"], ["--metrics-bind"]),
    (["--metrics-port", "0", "--metrics-bind", "203.0.113.7"], ["203.0.113.7", "metrics"]),
    (["--metrics-max-topics", "0"], ["--metrics-max-topics"]),
])
def test_bad_metrics_settings_refuse_the_start(tmp_path, flags, words):
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "q.db"), *flags)
    assert_one_line_refusal(result, *words)


# -- abuse ------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Producer(threading.Thread):
    """Produces all along, recording each call's latency; fails the test if a call fails."""

    def __init__(self, server: ServerProcess, topic: str) -> None:
        super().__init__(daemon=True)
        self.stub, self.topic = server.stub(own_connection=True), topic
        self.latencies: list[float] = []
        self.errors: list[Exception] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                self.stub.Produce(smq_pb2.ProduceRequest(topic=self.topic, message=b"p"), timeout=10)
            except grpc.RpcError as exc:
                self.errors.append(exc)
                return
            self.latencies.append(time.monotonic() - started)

    def stop(self) -> list[float]:
        self.halt.set()
        self.join(15)
        assert not self.errors, self.errors
        return self.latencies


@pytest.fixture
def abused(tmp_path):
    proc = ServerProcess(["--dbpath", str(tmp_path / "q.db"), "--port", "0", "--bind",
                          "127.0.0.1", "--metrics-port", "0"], tmp_path).wait_serving()
    proc.metrics = metrics_port(proc.log())
    make_topic(proc.stub(), "work", 1)
    yield proc
    proc.close()


def test_slow_loris_and_garbage_leave_the_queue_serving_and_memory_bounded(abused):
    """500 connections that send nothing, 300 that send garbage and 50 that send an
    endless request head (10x, 6x and more the 50 scrapes of the issue): produce goes on,
    the server's memory and file descriptors stay bounded, and a real scrape gets through
    once they are gone."""
    pid = abused.proc.pid
    scrape(abused.metrics)
    rss_before, fds_before = _rss(pid), _fds(pid)
    producer = Producer(abused, "work")
    producer.start()
    held: list[socket.socket] = []
    try:
        for _ in range(500):
            held.append(socket.create_connection(("127.0.0.1", abused.metrics), timeout=5))
        for n in range(300):
            sock = socket.create_connection(("127.0.0.1", abused.metrics), timeout=5)
            sock.sendall(os.urandom(512) if n % 2 else b"GARBAGE / HTTP/9\r\n\r\n")
            held.append(sock)
        endless = [socket.create_connection(("127.0.0.1", abused.metrics), timeout=5)
                   for _ in range(50)]
        for _ in range(20):  # 20 x 50 x 4 KiB of header lines that never end
            for sock in endless:
                try:
                    sock.sendall(b"X-Filler: " + b"a" * 4096 + b"\r\n")
                except OSError:
                    pass  # the server gave up on it: what it should do
        time.sleep(1)
        assert _fds(pid) <= fds_before + 32 + 8  # at most MAX_CONNECTIONS open at once
        assert _rss(pid) - rss_before < 30 * 1024**2
    finally:
        for sock in held + endless:
            sock.close()
    latencies = producer.stop()
    assert len(latencies) > 20
    assert max(latencies) < 5.0
    eventually(lambda: value(scrape(abused.metrics), "smq_topic_stored_messages",
                             topic="work") == 1 + len(latencies), timeout=20)


def test_many_concurrent_scrapes_during_heavy_load(abused):
    """150 scrapes at once, three times over, while 4 producers write: every scrape that
    gets an answer is complete, produce never fails, memory stays bounded."""
    pid = abused.proc.pid
    rss_before = _rss(pid)
    producers = [Producer(abused, "work") for _ in range(4)]
    for producer in producers:
        producer.start()

    def one_scrape(_: int) -> str:
        try:
            status, body = get(abused.metrics, "/metrics", timeout=30)
        except (OSError, http.client.HTTPException):
            return "dropped"  # past MAX_CONNECTIONS some are dropped: allowed
        assert status == 200 and "smq_commits_total" in body and body.endswith("\n")
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(150) as pool:
        outcomes = [o for _ in range(3) for o in pool.map(one_scrape, range(150))]
    acked = sum(len(p.stop()) for p in producers)
    assert outcomes.count("ok") >= 32
    assert acked > 50
    assert _rss(pid) - rss_before < 40 * 1024**2
    samples = scrape(abused.metrics)
    assert value(samples, "smq_topic_produced_messages_total", topic="work") == 1 + acked



def test_readers_that_never_take_large_replies_hold_bounded_memory(tmp_path):
    """1,000 labelled topics with long names make a reply of over half a megabyte; 5 x 40 clients ask for it
    and never read: the server keeps at most a few renderings for them (the oldest
    readers are dropped), and a real scrape still gets through."""
    proc = ServerProcess(["--dbpath", str(tmp_path / "q.db"), "--port", "0", "--bind",
                          "127.0.0.1", "--metrics-port", "0", "--metrics-max-topics", "1000"],
                         tmp_path).wait_serving()
    try:
        port, stub = metrics_port(proc.log()), proc.stub()
        for n in range(1000):
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=f"{'long-name-' * 6}{n:05d}"))
        size = len(get(port, "/metrics")[1])
        assert size > 500_000
        rss_before = _rss(proc.proc.pid)
        readers = []
        for _ in range(5):
            for _ in range(40):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                readers.append(sock)
            time.sleep(0.5)
        grown = _rss(proc.proc.pid) - rss_before
        for sock in readers:
            sock.close()
        assert grown < 8 * size + 20 * 1024**2, (grown, size)
        status, body = get(port, "/metrics")
        assert status == 200 and len(body) > size - 1000
    finally:
        proc.close()
