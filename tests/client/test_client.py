"""smq.client against a real server: every method, batching, streams, lifecycle."""
from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import smq
from support import ROOT
from support.poll import eventually
from support.servers import ServerProcess, clean_env, module_server
from smq.client import Client, Message, TopicInfo

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "client", socket=True)
    yield proc
    proc.close()




def test_connect_ping_and_repr(client: Client) -> None:
    assert client.connect() is None
    assert 0 < client.ping() < 10
    assert repr(client).startswith("<Client 127.0.0.1:") and "plaintext" in repr(client)


def test_create_topic_is_idempotent_and_listed(client: Client, topic: str) -> None:
    client.create_topic(topic)
    client.produce(topic, b"x")
    client.create_topic(topic)  # pysmq programs call it on every start
    assert client.get_latest_offset(topic) == 1
    assert topic in [t.name for t in client.list_topics()]


def test_produce_returns_offsets_and_consume_reads_them(client: Client, topic: str) -> None:
    assert [client.produce(topic, f"m{i}".encode()) for i in range(1, 4)] == [1, 2, 3]
    assert client.produce(topic, "text is sent as UTF-8: é") == 4
    assert client.consume(topic, 2) == (b"m2", 2)
    message = client.consume(topic, 4)
    assert isinstance(message, Message) and message.payload == "text is sent as UTF-8: é".encode()
    assert client.consume_earliest(topic) == (b"m1", 1)
    assert client.consume_latest(topic).offset == 4
    assert (client.get_earliest_offset(topic), client.get_latest_offset(topic)) == (1, 4)
    with pytest.raises(TypeError, match="bytes or str"):
        client.produce(topic, 42)  # type: ignore[arg-type]


def test_delete_until_offset_and_describe(client: Client, topic: str) -> None:
    for i in range(5):
        client.produce(topic, b"x" * i)
    client.delete_until_offset(topic, 3)
    client.delete_until_offset(topic, 3)  # idempotent
    info = client.describe_topic(topic)
    assert isinstance(info, TopicInfo)
    assert (info.earliest_offset, info.latest_offset, info.message_count, info.next_offset) == (4, 5, 2, 6)
    assert info.stored_bytes == 3 + 4 and info.created_at > 1_600_000_000
    client.delete_until_offset(topic, 100)  # empties it; offsets go on
    info = client.describe_topic(topic)
    assert (info.earliest_offset, info.latest_offset, info.message_count) == (None, None, 0)
    assert client.produce(topic, b"y") == 6


def test_delete_topic(client: Client, topic: str) -> None:
    client.produce(topic, b"a")
    client.delete_topic(topic)
    assert topic not in [t.name for t in client.list_topics()]
    with pytest.raises(smq.NotFound):
        client.describe_topic(topic)
    client.create_topic(topic)
    assert client.produce(topic, b"b") == 2  # a re-created topic continues its offsets


def test_bulk_retrieve_is_inclusive_and_pages(client: Client, topic: str) -> None:
    client.produce_many(topic, [f"m{i}".encode() for i in range(1, 8)])
    page = client.bulk_retrieve(topic, 0, 3)
    assert [(m.message, m.offset) for m in page.messages] == [(b"m1", 1), (b"m2", 2), (b"m3", 3)]
    assert (page.count, page.next_offset) == (3, 4)
    page = client.bulk_retrieve(topic, page.next_offset, 100)
    assert [m.offset for m in page.messages] == [4, 5, 6, 7]


def test_stream_produce_works(client: Client, topic: str) -> None:
    assert client.stream_produce(topic, (f"s{i}".encode() for i in range(10))) == 10
    assert client.stream_produce(topic, []) == 0
    assert client.consume(topic, 10) == (b"s9", 10)


def test_stream_produce_reraises_the_iterables_error_after_appending_the_rest(
        client: Client, topic: str) -> None:
    def messages() -> Iterator[bytes]:
        yield b"a"
        yield b"b"
        raise ValueError("sensor unplugged")

    with pytest.raises(ValueError, match="sensor unplugged"):
        client.stream_produce(topic, messages())
    assert client.get_latest_offset(topic) == 2


def test_produce_many_splits_by_count(client: Client, topic: str) -> None:
    ranges = client.produce_many(topic, (b"x%d" % i for i in range(2500)), batch_size=1000)
    assert ranges == [range(1, 1001), range(1001, 2001), range(2001, 2501)]
    assert client.consume(topic, 2500) == (b"x2499", 2500)


def test_produce_many_splits_by_bytes_under_3_mib(client: Client, topic: str) -> None:
    payloads = [bytes([i]) * 1024**2 for i in range(5)]  # the server's maximum: 2 fit in 3 MiB
    ranges = client.produce_many(topic, payloads)
    assert [len(r) for r in ranges] == [2, 2, 1]
    assert [client.consume(topic, o).payload[:1] for o in (1, 3, 5)] == [b"\0", b"\2", b"\4"]
    # A message larger than the byte budget travels alone.
    ranges = client.produce_many(topic, [b"a" * 300, b"b" * 300, b"c"], max_batch_bytes=200)
    assert [len(r) for r in ranges] == [1, 1, 1]
    assert client.produce_many(topic, []) == []
    with pytest.raises(ValueError):
        client.produce_many(topic, [b"x"], batch_size=0)


def test_produce_many_failure_says_what_was_appended(client: Client, topic: str) -> None:
    messages = [b"ok"] * 3 + [b"x" * 2_000_000]  # the last batch is above the server's 1 MiB
    with pytest.raises(smq.ResourceExhausted) as caught:
        client.produce_many(topic, messages, batch_size=3)
    assert isinstance(caught.value, smq.SMQProduceError)
    assert "the 3 messages before it were appended" in str(caught.value)
    assert client.get_latest_offset(topic) == 3


def test_stream_consume_skips_heartbeats_and_follows(client: Client, topic: str) -> None:
    client.produce(topic, b"first")
    received: list[Message] = []
    stream = client.stream_consume(topic, 0)
    received.append(next(stream))
    time.sleep(0.7)  # several heartbeats (0.2 s) go by unseen
    client.produce(topic, b"second")
    received.append(next(stream))
    stream.close()  # cancels the call
    assert received == [(b"first", 1), (b"second", 2)]


def test_iter_messages_pages_then_follows(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"%d" % i for i in range(1, 26)])
    client.delete_until_offset(topic, 5)
    messages = client.iter_messages(topic, 0, page_size=7)
    first = list(itertools.islice(messages, 20))
    assert [m.offset for m in first] == list(range(6, 26))
    live = threading.Timer(0.3, client.produce, (topic, b"live"))
    live.start()
    assert next(messages) == (b"live", 26)
    live.join(10)  # its answer may come after the stream's: before the client closes
    messages.close()


def test_iter_messages_without_follow_ends_when_caught_up(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"%d" % i for i in range(1, 11)])
    assert [m.offset for m in client.iter_messages(topic, 4, follow=False, page_size=3)] == \
        list(range(4, 11))
    assert list(client.iter_messages(topic, 11, follow=False)) == []


def test_subscribe_yields_messages_then_follows(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"%d" % i for i in range(1, 2001)])
    messages = client.subscribe(topic, 1500, page_size=100)
    assert [m.offset for m in itertools.islice(messages, 501)] == list(range(1500, 2001))
    new = threading.Timer(0.5, client.produce, (topic, b"new"))  # after some heartbeats
    new.start()
    assert next(messages) == (b"new", 2001)
    new.join(10)
    messages.close()


def test_close_ends_running_iterators_and_refuses_reuse(server: ServerProcess, topic: str) -> None:
    client = Client("127.0.0.1", server.port)
    received: list[Message] = []
    done = threading.Event()

    def consume() -> None:
        received.extend(client.subscribe(topic))
        done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    client.produce(topic, b"one")
    eventually(lambda: received, timeout=10, interval=0.02)
    client.close()
    assert done.wait(10), "subscribe() did not end when the client was closed"
    assert received == [(b"one", 1)] and client.closed
    with pytest.raises(RuntimeError, match="closed"):
        client.produce(topic, b"x")
    client.close()  # twice is fine


def test_unix_socket_target(server: ServerProcess, topic: str) -> None:
    with Client(unix_socket=server.socket) as local:
        assert local.target == f"unix:{server.socket}"
        assert local.produce(topic, b"via socket") == 1
        assert local.consume_latest(topic) == (b"via socket", 1)


def test_injected_channel(server: ServerProcess, topic: str) -> None:
    with Client(channel=server.channel()) as client:
        assert client.produce(topic, b"x") == 1


def test_reads_are_retried_while_the_server_restarts(start_server, tmp_path: Path) -> None:
    first = start_server()
    with Client("127.0.0.1", first.port, timeout=30, retries=30) as client:
        client.create_topic("r")
        client.produce("r", b"kept")
        first.terminate()
        restarted: list[ServerProcess] = []
        timer = threading.Timer(0.5, lambda: restarted.append(start_server(port=str(first.port))))
        timer.start()
        try:
            assert client.consume("r", 1) == (b"kept", 1)  # retried with backoff until it is back
        finally:
            timer.join()
        with pytest.raises(smq.Unavailable):
            restarted[0].terminate()
            client.produce("r", b"writes are not retried")


def test_pysmq_positional_arguments_and_keyword_only_options(server: ServerProcess) -> None:
    with pytest.raises(TypeError):
        Client("127.0.0.1", server.port, None, 1024, 1024, 5.0)  # type: ignore[misc]
    with Client("127.0.0.1", server.port, None, 64, 64, timeout=5) as client:
        client.create_topic("positional", 5.0)  # pysmq's positional timeouts still work
        assert client.produce("positional", b"p", 5.0) == 1
        assert client.consume("positional", 1, 5.0) == (b"p", 1)
        assert client.bulk_retrieve("positional", 0, 10, 5.0).count == 1
        assert client.get_latest_offset("positional", None) == 1  # None: no deadline


def test_import_smq_does_not_load_grpc_and_exports_the_client() -> None:
    code = ("import sys, smq; assert 'grpc' not in sys.modules; "
            "from smq import Client; assert 'grpc' in sys.modules; print(Client.__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "smq.client.sync"


def test_public_surface_is_pinned() -> None:
    assert set(smq.__all__) == {
        "__version__", "Config", "Client", "AsyncClient", "Producer", "AsyncProducer",
        "SentMessage", "ClientTLSConfig", "Message", "TopicInfo", "TopicPolicy", "ConsumerInfo",
        "ServerInfo",
        "SMQError", "SMQException", "SMQConnectionError", "SMQAuthenticationError",
        "SMQProduceError", "SMQConsumeError", "SMQTopicCreationError", "SMQOffsetError",
        "SMQTimeoutError", "Unavailable", "Unauthenticated", "DeadlineExceeded",
        "InvalidArgument", "NotFound", "TopicEmpty", "OffsetOutOfRange", "PermissionDenied",
        "ResourceExhausted", "InternalError", "Cancelled", "UnknownError", "AlreadyExists",
        "Aborted", "Unimplemented", "DataLoss"}
    for name in smq.__all__:
        assert getattr(smq, name) is not None
    from smq import client as client_module
    for name in client_module.__all__:
        value = getattr(client_module, name)
        if callable(value):
            assert value.__doc__, f"{name} has no docstring"
    for name, method in vars(Client).items():
        if not name.startswith("_") and callable(method):
            assert method.__doc__, f"Client.{name} has no docstring"


def test_more_calls_at_once_than_the_server_takes_per_connection_all_succeed(
        client: Client, topic: str) -> None:
    """The server refuses an HTTP/2 stream past its per-connection limit (REFUSED_STREAM,
    never processed): the client sends such a call again, a produce too. 200 threads
    once lost about a quarter of their produces to it."""
    errors: list[BaseException] = []
    offsets: list[int] = []
    start = threading.Barrier(200)

    def produce() -> None:
        start.wait()
        for _ in range(2):
            try:
                offsets.append(client.produce(topic, b"crowd"))
            except Exception as exc:  # noqa: BLE001 (collected, asserted below)
                errors.append(exc)

    threads = [threading.Thread(target=produce) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(offsets) == list(range(1, 401))
