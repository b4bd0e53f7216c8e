"""smq/server/pool.py under a real gRPC server: calls are taken in turn by connection, at most
`receive_slots` calls receive their request at once (half of them per connection),
and every thread is started up front.

The server here is grpc.server with a FairPool and a tiny service of its own (raw
bytes in and out), so that each test controls how long a call takes.
"""
from __future__ import annotations

import sys
import threading
import time

import grpc
import pytest

from support import ROOT
from smq.server.handlers import receiving
from smq.server.pool import FairPool

sys.path.insert(0, str(ROOT / "soak"))
from stalled import StalledConnection  # noqa: E402

SERVICE = "pooltest.Calls"


class Calls:
    """Handlers recording the order calls ran in."""

    def __init__(self) -> None:
        self.ran: list[bytes] = []
        self.lock = threading.Lock()

    def slow(self, request: bytes, context) -> bytes:
        with self.lock:
            self.ran.append(request)
        time.sleep(0.05)
        return request


def serve(pool: FairPool, calls: Calls) -> tuple[grpc.Server, int]:
    server = grpc.server(pool, maximum_concurrent_rpcs=200)
    handler = grpc.unary_unary_rpc_method_handler(receiving(calls.slow))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Slow": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def connection(port: int) -> grpc.UnaryUnaryMultiCallable:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=[("grpc.use_local_subchannel_pool", 1)])
    return channel.unary_unary(f"/{SERVICE}/Slow")


@pytest.fixture
def calls():
    return Calls()


def test_a_burst_from_one_connection_does_not_make_another_wait_for_all_of_it(calls):
    server, port = serve(FairPool(1, receive_slots=4), calls)
    try:
        burst, other = connection(port), connection(port)
        burst(b"warm-up", timeout=10)
        other(b"warm-up", timeout=10)
        calls.ran.clear()
        futures = [burst.future(b"burst-%d" % n, timeout=60) for n in range(30)]
        time.sleep(0.3)  # the burst is queued behind the one thread
        started = time.monotonic()
        assert other(b"other", timeout=60) == b"other"
        waited = time.monotonic() - started
        for future in futures:
            future.result()
    finally:
        server.stop(0)
    # In turn by connection: behind at most the call running and one of the burst's,
    # not behind the ~24 still queued (over a second in arrival order).
    assert calls.ran.index(b"other") <= calls.ran.index(b"burst-0") + 10
    assert waited < 0.6, f"waited {waited:.2f} s"


def test_requests_being_received_are_bounded_and_shared_between_connections(calls):
    server, port = serve(FairPool(8, receive_slots=2), calls)
    hostile = [StalledConnection("127.0.0.1", port) for _ in range(2)]
    try:
        time.sleep(0.2)
        for _ in range(5):  # calls whose request never comes: they hold receive slots
            hostile[0].call("Slow", None, service=SERVICE)
        time.sleep(0.3)
        # One connection holds at most half of the slots: others are still received.
        assert connection(port)(b"while one waits", timeout=5) == b"while one waits"
        hostile[1].call("Slow", None, service=SERVICE)
        time.sleep(0.3)
        # Both slots held: a new call waits for a slot, which a connection's end frees.
        pending = connection(port).future(b"waiting", timeout=30)
        time.sleep(0.5)
        assert not pending.done()
        hostile[1].close()
        assert pending.result() == b"waiting"
    finally:
        for conn in hostile:
            conn.close()
        server.stop(0)


def test_every_thread_is_started_up_front():
    def ours() -> int:
        return sum(t.name.startswith("pooltest_") for t in threading.enumerate())

    pool = FairPool(12, receive_slots=4, thread_name_prefix="pooltest")
    try:
        assert ours() == 12
        assert pool.submit(sum, [1, 2]).result(5) == 3
    finally:
        pool.shutdown()
    assert ours() == 0
