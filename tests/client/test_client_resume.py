"""iter_messages and subscribe follow a topic across a server restart: no gap, no duplicate."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from smq.client import Client, Message
from smq.retry import backoff
from support.poll import eventually

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


@pytest.mark.parametrize("method", ["iter_messages", "subscribe"])
def test_follows_across_a_server_restart_without_gap_or_duplicate(
        start_server, tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "smq.db"
    server = start_server("--heartbeat-interval", "0.2", db=db)
    port = server.port
    payloads = [b"m%d" % i for i in range(1, 401)]
    received: list[Message] = []
    caplog.set_level(logging.WARNING, logger="smq.client")

    with Client("127.0.0.1", port) as client:
        client.create_topic("r")
        client.produce_many("r", payloads[:100])
        stream = getattr(client, method)("r", 0)

        def consume() -> None:
            for message in stream:
                received.append(message)
                if len(received) == len(payloads):
                    break

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        # caught up, now following live
        eventually(lambda: len(received) >= 100, timeout=30, interval=0.02)
        client.produce_many("r", payloads[100:200], batch_size=10)
        server.terminate()  # mid-stream: some of 101..200 may not be delivered yet
        server = start_server("--heartbeat-interval", "0.2", db=db, port=str(port))
        client.connect()  # retried until the channel is back (produce is never retried)
        for start in range(200, 400, 50):
            client.produce_many("r", payloads[start:start + 50])
        consumer.join(timeout=60)
        assert not consumer.is_alive(), f"stuck after {len(received)} messages"

    assert [m.offset for m in received] == list(range(1, 401))
    assert [m.payload for m in received] == payloads
    assert any("reconnecting" in r.getMessage() for r in caplog.records)


def test_iter_messages_starts_when_the_server_comes_up(start_server, tmp_path: Path) -> None:
    """A follower started before its server waits for it, then reads from the start."""
    first = start_server(db=tmp_path / "smq.db")
    port = first.port
    with Client("127.0.0.1", port) as client:
        client.create_topic("late")
        client.produce("late", b"before")
        first.terminate()
        stream = client.iter_messages("late", 0)
        threading.Timer(0.5, lambda: start_server(db=tmp_path / "smq.db", port=str(port))).start()
        assert next(stream) == (b"before", 1)
        stream.close()


def test_backoff_doubles_to_its_cap_and_stays_there_however_long_it_retries() -> None:
    # Iterators and the forwarder retry forever: after 1,024 failures 2**n used to
    # overflow a float and end them with a traceback.
    for attempt, full in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (1023, 2.0), (1024, 2.0), (10**9, 2.0)]:
        assert full * 0.5 <= backoff(attempt, 0.1, 2.0) <= full

