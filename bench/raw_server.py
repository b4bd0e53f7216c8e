"""The benchmark's ceiling: `smq.SuhaibMessageQueue` over grpcio with no storage at all.

    python bench/raw_server.py --port 0 --bind 127.0.0.1     # logs "serving on HOST:PORT"

It answers the RPCs the benchmark calls with the same message shapes as SMQ, but keeps
only counters in memory: a topic is its next offset plus the last RAW_RECENT payloads
(an in-memory relay, so the latency phase sees real timestamps); an older offset reads
back the topic's last payload, which has the same size. Pages follow SMQ's caps
(messages and bytes), streams wait on a condition as SMQ's do.

Everything that shapes gRPC's cost is copied from smq/server.py's create_server: the
thread pool (workers + max streams), maximum_concurrent_rpcs and the message-size and
keepalive options. It imports apsw and opens an in-memory database, so its idle RSS is
the "bare grpcio + apsw server process" SMQ's is compared with; it deliberately imports
nothing of smq but the generated stubs (tests/e2e/test_bench.py checks the copied constants).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import signal
import sys
import threading

import apsw
import grpc

# The generated stubs only, imported as the top-level package `_proto` so that the
# smq package itself (its config, dotenv, ...) stays out of the baseline.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "smq"))
from _proto import smq_pb2, smq_pb2_grpc  # noqa: E402

# Copied from smq (server.py, service.py, config.py); tests/e2e/test_bench.py keeps them equal.
ENVELOPE_BYTES = 64 * 1024
MAX_BATCH_BYTES = 4 * 1024**2
QUEUED_CALLS_PER_WORKER = 4
PAGE_BYTES = 3 * 1024**2
DEFAULT_PAGE_MESSAGES = 100
MAX_PAGE_MESSAGES = 10_000
WORKERS = 8
MAX_STREAMS = 64
MAX_MESSAGE_SIZE = 1024**2

RAW_RECENT = 1_000  # payloads kept per topic for the relay (and no more: no storage)
HEARTBEAT = smq_pb2.ConsumeResponse(message=b"", offset=-1)


class Topic:
    """Counters and recent payloads of one topic; `changed` is notified on each append."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.next_offset = 1
        self.recent: collections.deque[bytes] = collections.deque(maxlen=RAW_RECENT)

    def append(self, payloads) -> tuple[int, int]:
        with self.lock:
            first = self.next_offset
            self.recent.extend(payloads)
            self.next_offset += len(payloads)
            self.changed.notify_all()
            return first, self.next_offset - 1

    def page(self, start: int, count: int) -> list[tuple[int, bytes]]:
        """Up to `count` (offset, payload) pairs from `start`, within PAGE_BYTES."""
        with self.lock:
            end = min(self.next_offset, start + count)
            if start >= end:
                return []
            recent = self.recent
            base = self.next_offset - len(recent)  # offset of recent[0]
            last = recent[-1]
            page = []
            size = 0
            for offset in range(start, end):
                payload = recent[offset - base] if offset >= base else last
                size += len(payload)
                if page and size > PAGE_BYTES:
                    break
                page.append((offset, payload))
            return page

    def wait(self, cursor: int, timeout: float, cancelled) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: self.next_offset > cursor or cancelled(), timeout)


class RawServicer(smq_pb2_grpc.SuhaibMessageQueueServicer):
    def __init__(self, heartbeat_interval: float) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.topics: dict[str, Topic] = {}
        self.lock = threading.Lock()

    def topic(self, name: str, context: grpc.ServicerContext) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"topic not found: {name}")
        return topic

    def Connect(self, request, context):
        return smq_pb2.ConnectResponse()

    def CreateTopic(self, request, context):
        with self.lock:
            self.topics.setdefault(request.topic, Topic())
        return smq_pb2.CreateTopicResponse()

    def GetLatestOffset(self, request, context):
        return smq_pb2.GetLatestOffsetResponse(offset=self.topic(request.topic, context).next_offset - 1)

    def GetServerInfo(self, request, context):
        return smq_pb2.GetServerInfoResponse(version="raw", durability="none")

    def Produce(self, request, context):
        return smq_pb2.ProduceResponse(
            offset=self.topic(request.topic, context).append((request.message,))[1])

    def StreamProduce(self, request_iterator, context):
        last = 0
        for request in request_iterator:
            last = self.topic(request.topic, context).append((request.message,))[1]
        return smq_pb2.ProduceResponse(offset=last)

    def ProduceBatch(self, request, context):
        messages = list(request.messages)
        if not messages:
            return smq_pb2.ProduceBatchResponse()
        first, last = self.topic(request.topic, context).append(messages)
        return smq_pb2.ProduceBatchResponse(first_offset=first, last_offset=last)

    def BulkRetrieve(self, request, context):
        topic = self.topic(request.topic, context)
        count = DEFAULT_PAGE_MESSAGES if request.limit <= 0 else min(request.limit, MAX_PAGE_MESSAGES)
        page = topic.page(max(request.start_offset, 1), count)
        return smq_pb2.BulkRetrieveResponse(
            messages=[smq_pb2.RetrievedMessage(message=p, offset=o) for o, p in page],
            count=len(page), next_offset=page[-1][0] + 1 if page else request.start_offset)

    def _pages(self, topic: Topic, cursor: int, count: int, context):
        """Pages from cursor on, then each append; [] after an idle heartbeat interval."""
        cancelled = threading.Event()

        def cancel() -> None:
            cancelled.set()
            with topic.lock:
                topic.changed.notify_all()

        context.add_callback(cancel)
        while not cancelled.is_set():
            page = topic.page(cursor, count)
            if page:
                cursor = page[-1][0] + 1
                yield page, cursor
            elif not topic.wait(cursor, self.heartbeat_interval, cancelled.is_set):
                yield [], cursor

    def StreamConsume(self, request, context):
        topic = self.topic(request.topic, context)
        for page, _ in self._pages(topic, max(request.offset, 1), MAX_PAGE_MESSAGES, context):
            if not page:
                yield HEARTBEAT
            for offset, payload in page:
                yield smq_pb2.ConsumeResponse(message=payload, offset=offset)

    def Subscribe(self, request, context):
        topic = self.topic(request.topic, context)
        size = MAX_PAGE_MESSAGES if request.max_messages <= 0 else min(request.max_messages,
                                                                        MAX_PAGE_MESSAGES)
        for page, cursor in self._pages(topic, max(request.offset, 1), size, context):
            yield smq_pb2.SubscribeResponse(
                messages=[smq_pb2.RetrievedMessage(message=p, offset=o) for o, p in page],
                next_offset=cursor)


def create_server(bind: str, port: int, workers: int, max_streams: int, max_message_size: int,
                  heartbeat_interval: float) -> tuple[grpc.Server, int]:
    threads = workers + max_streams
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raw-rpc"),
        maximum_concurrent_rpcs=threads + QUEUED_CALLS_PER_WORKER * workers,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length",
             max(max_message_size, MAX_BATCH_BYTES) + ENVELOPE_BYTES),
            ("grpc.max_send_message_length", max(max_message_size, PAGE_BYTES) + ENVELOPE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ])
    smq_pb2_grpc.add_SuhaibMessageQueueServicer_to_server(RawServicer(heartbeat_interval), server)
    return server, server.add_insecure_port(f"{bind}:{port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--max-streams", type=int, default=MAX_STREAMS)
    parser.add_argument("--max-message-size", type=int, default=MAX_MESSAGE_SIZE)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    args = parser.parse_args()
    database = apsw.Connection(":memory:")  # the "+ apsw" of the baseline
    database.execute("CREATE TABLE t (x)")
    server, port = create_server(args.bind, args.port, args.workers, args.max_streams,
                                 args.max_message_size, args.heartbeat_interval)
    if not port:
        print(f"raw: cannot listen on {args.bind}:{args.port}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"INFO raw: serving on {args.bind}:{port}", file=sys.stderr, flush=True)
    while not stop.wait(3600):
        pass
    server.stop(1).wait()
    database.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
