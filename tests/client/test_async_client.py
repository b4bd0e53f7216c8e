"""smq.AsyncClient and AsyncProducer against a real server: every method beside the sync
client's (results, typed errors, messages), concurrency over one channel, resuming,
named consumers, cancellation that frees the server's stream places, and batching.

Each test runs its coroutine with asyncio.run (no pytest plugin), through `run`, which
also checks that the coroutine leaves no task behind."""
from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from support.poll import eventually_async
from support.servers import ServerProcess, module_server

import smq
from smq.client import AsyncClient, AsyncProducer, Client, Message

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    proc = module_server(tmp_path_factory, "async-client")
    yield proc
    proc.close()


def run(main: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run(main()), failing if main leaves a task running."""
    async def checked() -> T:
        result = await main()
        await eventually_async(async_no_other_task, timeout=5, message="tasks left behind")
        return result
    return asyncio.run(checked())


async def async_no_other_task() -> bool:
    return not asyncio.all_tasks() - {asyncio.current_task()}


Step = Callable[[], Any] | tuple[Callable[[], Any], Callable[[Any], Any]]


def outcome(step: Step) -> tuple[str, Any]:
    """A step's result (read by its second callable, if any), or its error's class and text."""
    call, read = step if isinstance(step, tuple) else (step, lambda value: value)
    try:
        return "ok", read(call())
    except smq.SMQError as exc:
        return type(exc).__name__, (type(exc), str(exc))


async def async_outcome(step: Step) -> tuple[str, Any]:
    call, read = step if isinstance(step, tuple) else (step, lambda value: value)
    try:
        return "ok", read(await call())
    except smq.SMQError as exc:
        return type(exc).__name__, (type(exc), str(exc))


async def alist(iterator: AsyncIterator[T]) -> list[T]:
    return [item async for item in iterator]


# -- every method, beside the sync client ----------------------------------------------

def test_every_method_returns_and_raises_as_the_sync_client(server: ServerProcess,
                                                            client: Client) -> None:
    """The same calls on two topics, one per client: same results, same errors."""
    def script(c: Any, t: str) -> list[Step]:
        """Each step a callable (the sync client's result, or the async one's coroutine),
        or one and what to read of its result."""
        return [
            lambda: c.create_topic(t), lambda: c.create_topic(t),
            lambda: c.get_latest_offset(t), lambda: c.consume_latest(t),   # TopicEmpty
            lambda: c.produce(t, b"one"), lambda: c.produce(t, "two"),
            lambda: c.produce_many(t, [b"m%d" % i for i in range(5)], batch_size=2),
            lambda: c.stream_produce(t, [b"s1", b"s2"]),
            lambda: c.consume(t, 2), lambda: c.consume(t, 99), lambda: c.consume(t, 0),
            lambda: c.consume_earliest(t), lambda: c.consume_latest(t),
            lambda: c.get_earliest_offset(t), lambda: c.get_latest_offset(t),
            (lambda: c.bulk_retrieve(t, 2, 3), lambda r: list(r.messages)),
            lambda: c.delete_until_offset(t, 2), lambda: c.get_earliest_offset(t),
            (lambda: c.describe_topic(t), lambda i: dataclass_without(i, "name", "created_at")),
            lambda: c.set_topic_policy(t, max_messages=100, on_full="drop-oldest"),
            lambda: c.get_topic_policy(t),
            lambda: c.set_topic_policy(t, on_full="sideways"),              # InvalidArgument
            lambda: c.committed_offset("reader", t),                       # NotFound
            lambda: c.resume_offset("reader", t),
            lambda: c.commit_offset("reader", t, 5), lambda: c.committed_offset("reader", t),
            lambda: c.commit_offset("reader", t, 999),                     # OffsetOutOfRange
            lambda: c.resume_offset("reader", t),
            (lambda: c.list_consumers(t), lambda r: [(i.consumer, i.committed_offset, i.lag) for i in r]),
            lambda: c.delete_consumer("reader", t), lambda: c.delete_consumer("reader", t),
            (lambda: c.list_topics(), lambda r: t in [i.name for i in r]),
            lambda: c.produce(t + "-missing", b"x"), lambda: c.consume(t + "-missing", 1),
            lambda: c.produce_many(t + "-missing", [b"x"]),
            lambda: c.stream_produce(t + "-missing", [b"x"]),
            lambda: c.describe_topic(t + "-missing"), lambda: c.create_topic("bad name!"),
            lambda: c.bulk_retrieve(t + "-missing", 0, 10),
            lambda: c.resume_offset("reader", t + "-missing"),
            lambda: c.produce(t, b"x" * 2_000_000),                        # over 1 MiB
            lambda: c.delete_topic(t), lambda: c.delete_topic(t),
            lambda: c.connect(), (lambda: c.server_info(), lambda r: type(r).__name__),
        ]

    expected = [outcome(step) for step in script(client, "sync_twin")]

    async def main() -> list[tuple[str, Any]]:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            got = [await async_outcome(step) for step in script(aclient, "async_twin")]
            assert 0 < await aclient.ping() < 10
            assert repr(aclient).startswith("<AsyncClient 127.0.0.1:")
            return got

    got = run(main)
    assert [kind for kind, _ in got] == [kind for kind, _ in expected]
    for (kind, value), (_, want) in zip(got, expected):
        if kind == "ok":
            assert value == want
        else:  # the same class (status and pysmq class), the same message but the topic
            assert value[0] is want[0]
            assert value[1].replace("async_twin", "T") == want[1].replace("sync_twin", "T")
    assert {"TopicEmpty", "NotFound", "InvalidArgument", "OffsetOutOfRange",
            "ResourceExhausted"} <= {kind for kind, _ in got}


def dataclass_without(value: Any, *names: str) -> dict[str, Any]:
    return {k: v for k, v in vars(value).items() if k not in names}


def test_stream_produce_takes_an_async_iterable_and_reraises_its_error(
        server: ServerProcess, topic: str) -> None:
    async def messages() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0)
        yield b"b"
        raise ValueError("sensor unplugged")

    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            with pytest.raises(ValueError, match="sensor unplugged"):
                await aclient.stream_produce(topic, messages())
            assert await aclient.get_latest_offset(topic) == 2
            assert await aclient.stream_produce(topic, []) == 0

    run(main)


def test_200_concurrent_produces_over_one_channel(server: ServerProcess, topic: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            offsets = await asyncio.gather(
                *(aclient.produce(topic, b"p%d" % i) for i in range(200)))
            assert sorted(offsets) == list(range(1, 201))
            stored = await alist(aclient.iter_messages(topic, follow=False))
            assert sorted(m.payload for m in stored) == sorted(b"p%d" % i for i in range(200))

    run(main)


def test_streams_read_then_follow_and_skip_heartbeats(server: ServerProcess, topic: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            await aclient.produce_many(topic, [b"%d" % i for i in range(1, 26)])
            await aclient.delete_until_offset(topic, 5)
            assert [m.offset for m in await alist(
                aclient.iter_messages(topic, 0, follow=False, page_size=7))] == list(range(6, 26))
            for name in ("subscribe", "iter_messages", "stream_consume"):
                stream = getattr(aclient, name)(topic, 20)
                latest = await aclient.get_latest_offset(topic)
                assert [(await anext(stream)).offset for _ in range(20, latest + 1)] == \
                    list(range(20, latest + 1))
                waiting = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.5)  # heartbeats (0.2 s) go by unseen
                assert not waiting.done()
                offset = await aclient.produce(topic, name)
                assert await waiting == Message(name.encode(), offset)
                await stream.aclose()

    run(main)


# -- resuming and named consumers ------------------------------------------------------

@pytest.mark.parametrize("method", ["iter_messages", "subscribe"])
def test_follows_across_a_server_restart_without_gap_or_duplicate(
        start_server, tmp_path: Path, method: str) -> None:
    db = tmp_path / "smq.db"
    servers = [start_server("--heartbeat-interval", "0.2", db=db)]
    port = servers[0].port
    payloads = [b"m%d" % i for i in range(1, 301)]

    async def main() -> list[Message]:
        received: list[Message] = []
        async with AsyncClient("127.0.0.1", port) as aclient:
            await aclient.create_topic("r")
            await aclient.produce_many("r", payloads[:100])

            async def consume() -> None:
                async for message in getattr(aclient, method)("r", 0):
                    received.append(message)
                    if len(received) == len(payloads):
                        break

            consumer = asyncio.create_task(consume())
            await eventually_async(lambda: asyncio.sleep(0, len(received) >= 100), timeout=30)
            await aclient.produce_many("r", payloads[100:200], batch_size=10)
            await asyncio.to_thread(servers[0].terminate)  # mid-stream
            servers.append(await asyncio.to_thread(
                start_server, "--heartbeat-interval", "0.2", db=db, port=str(port)))
            await aclient.connect()  # retried until the channel is back
            await aclient.produce_many("r", payloads[200:])
            await asyncio.wait_for(consumer, 60)
        return received

    received = run(main)
    assert [m.offset for m in received] == list(range(1, 301))
    assert [m.payload for m in received] == payloads


@pytest.mark.parametrize("method", ["iter_messages", "subscribe"])
def test_named_consumer_commits_as_the_sync_client_does(
        server: ServerProcess, client: Client, method: str) -> None:
    """Page by page, once the loop asks for the message after a page; the next run
    starts after the commit. The sync client, step by step on a topic of its own
    filled alike, gives the same offsets and commits."""
    sync_topic, async_topic = f"consumer_{method}_sync", f"consumer_{method}_async"
    for name in (sync_topic, async_topic):
        client.create_topic(name)
        client.produce_many(name, [b"%d" % i for i in range(1, 8)], batch_size=3)

    def committed(topic: str) -> int | None:
        try:
            return client.committed_offset("reader", topic)
        except smq.NotFound:
            return None

    options = {"page_size": 3} if method == "iter_messages" else {}
    stream = getattr(client, method)(sync_topic, consumer="reader", **options)
    expected = [(next(stream).offset, committed(sync_topic)) for _ in range(7)]
    client.produce(sync_topic, b"8")
    expected.append((next(stream).offset, committed(sync_topic)))
    stream.close()
    assert expected[0] == (1, None) and expected[-1] == (8, 7)

    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            stream = getattr(aclient, method)(async_topic, consumer="reader", **options)
            got = [((await anext(stream)).offset, committed(async_topic)) for _ in range(7)]
            await aclient.produce(async_topic, b"8")
            got.append(((await anext(stream)).offset, committed(async_topic)))
            await stream.aclose()
            assert got == expected
            again = getattr(aclient, method)(async_topic, consumer="reader", **options)
            assert (await anext(again)).offset == 8  # after the commit of 7
            await again.aclose()

    run(main)


# -- cancellation: no call, task or stream place left behind ---------------------------

@pytest.fixture
def small_server(start_server) -> ServerProcess:
    """A server with 2 stream places, and topics a, b (for streams) and p, q (probes)."""
    proc = start_server("--heartbeat-interval", "0.2", "--max-streams", "2")
    with Client("127.0.0.1", proc.port) as sync:
        for name in "abpq":
            sync.create_topic(name)
            sync.produce(name, b"first")
    return proc


async def places_free(aclient: AsyncClient) -> bool:
    """Whether both stream places are free: two new streams open and read."""
    streams = [aclient.stream_consume(name, 0) for name in "pq"]
    try:
        for stream in streams:
            await anext(stream)
        return True
    except smq.ResourceExhausted:
        return False
    finally:
        for stream in streams:
            await stream.aclose()


async def hold_places(aclient: AsyncClient, method: str) -> list[asyncio.Task[None]]:
    """Two tasks, each in an `async for` blocked on a stream after its first message."""
    started: list[str] = []

    async def follow(name: str) -> None:
        async for _ in getattr(aclient, method)(name, 0):
            started.append(name)

    async def places_taken() -> bool:
        return len(started) == 2 and not await places_free(aclient)

    tasks = [asyncio.create_task(follow(name)) for name in "ab"]
    await eventually_async(places_taken)  # both streams open: the probe is refused
    return tasks


@pytest.mark.parametrize("method", ["subscribe", "stream_consume", "iter_messages"])
def test_cancelling_a_task_in_async_for_frees_its_stream_place(
        small_server: ServerProcess, method: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", small_server.port) as aclient:
            tasks = await hold_places(aclient, method)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with pytest.raises(asyncio.CancelledError):
                    await task
            await eventually_async(lambda: places_free(aclient))

    run(main)


@pytest.mark.parametrize("leave", ["break", "aclose", "close"])
def test_leaving_an_async_for_frees_its_stream_place(small_server: ServerProcess,
                                                      leave: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", small_server.port) as aclient:
            if leave == "break":
                for name in "ab":
                    async for _ in aclient.subscribe(name):
                        break
            elif leave == "aclose":
                streams = [aclient.stream_consume(name, 0) for name in "ab"]
                for stream in streams:
                    await anext(stream)
                assert not await places_free(aclient)
                for stream in streams:
                    await stream.aclose()
            else:  # close() ends running loops quietly, as the sync client's does
                other = AsyncClient("127.0.0.1", small_server.port)
                tasks = await hold_places(other, "subscribe")
                await other.close()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
            await eventually_async(lambda: places_free(aclient))

    run(main)


def test_cancelling_or_closing_during_a_unary_call(small_server: ServerProcess) -> None:
    """With the server stopped (SIGSTOP), a call waits for its 30 s deadline; cancelling
    its task ends it at once, and so does close() (smq.Cancelled, as in the sync client)."""
    async def main() -> None:
        async with AsyncClient("127.0.0.1", small_server.port, timeout=30) as aclient:
            await aclient.connect()
            small_server.stop_process()
            try:
                call = asyncio.create_task(aclient.produce("a", b"never"))
                await asyncio.sleep(0.2)
                assert not call.done()
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(call, 5)
                call = asyncio.create_task(aclient.get_latest_offset("a"))
                await asyncio.sleep(0.2)
                await aclient.close()
                with pytest.raises(smq.Cancelled, match="could not get the latest offset"):
                    await asyncio.wait_for(call, 5)
                with pytest.raises(RuntimeError, match="closed"):
                    await aclient.produce("a", b"x")
            finally:
                os.kill(small_server.proc.pid, signal.SIGCONT)
        async with AsyncClient("127.0.0.1", small_server.port) as fresh:
            await eventually_async(lambda: places_free(fresh))

    run(main)


def test_async_with_closes_the_channel(server: ServerProcess, topic: str) -> None:
    async def main() -> None:
        channel = grpc.aio.insecure_channel(server.address)
        async with AsyncClient(channel=channel) as aclient:
            assert await aclient.produce(topic, b"x") == 1
        assert aclient.closed and "closed" in repr(aclient)
        with pytest.raises(RuntimeError, match="closed"):
            await aclient.produce(topic, b"x")
        with pytest.raises(RuntimeError, match="closed"):
            await anext(aclient.subscribe(topic))
        with pytest.raises(Exception):  # grpc.aio refuses calls on a closed channel
            await channel.unary_unary("/smq.SuhaibMessageQueue/Connect")(b"")
        await aclient.close()  # twice is fine

    run(main)


# -- AsyncProducer ---------------------------------------------------------------------

def test_producer_keeps_each_topics_order_over_batches_in_flight(
        server: ServerProcess, client: Client) -> None:
    topics = [f"producer_order_{i}" for i in range(3)]
    for name in topics:
        client.create_topic(name)

    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            async with aclient.producer(batch_size=7, max_in_flight=2) as producer:
                assert isinstance(producer, AsyncProducer)
                futures = {name: [] for name in topics}
                for i in range(300):
                    name = topics[i % 3]
                    futures[name].append(await producer.send(name, b"%d" % i))
            # close() flushed: every future has its offset, in send order per topic
            for name in topics:
                assert [f.result() for f in futures[name]] == list(range(1, 101))
            for name in topics:
                stored = await alist(aclient.iter_messages(name, follow=False))
                assert [int(m.payload) for m in stored] == \
                    [i for i in range(300) if topics[i % 3] == name]
            with pytest.raises(RuntimeError, match="closed"):
                await producer.send(topics[0], b"late")

    run(main)


def test_producer_error_fails_exactly_its_batchs_futures(server: ServerProcess,
                                                          topic: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            producer = aclient.producer(max_batch_bytes=1_000_000)
            # "a" leaves at once; the rest gather behind it: [b], [big] alone, [c, d]
            sent = [await producer.send(topic, p) for p in (b"a", b"b", b"x" * 2_000_000,
                                                             b"c", b"d")]
            missing = await producer.send(topic + "-missing", b"m")
            await producer.flush()
            assert all(f.done() for f in [*sent, missing])
            with pytest.raises(smq.ResourceExhausted) as too_large:
                sent[2].result()
            assert isinstance(too_large.value, smq.SMQProduceError)
            with pytest.raises(smq.NotFound):
                missing.result()
            assert [sent[i].result() for i in (0, 1, 3, 4)] == [1, 2, 3, 4]
            await producer.close()

    run(main)


def test_producer_send_waits_while_max_pending_are_pending(server: ServerProcess,
                                                           topic: str) -> None:
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            producer = aclient.producer(linger=3600, max_pending=3)  # held until flushed
            futures = [await producer.send(topic, b"%d" % i) for i in range(3)]
            fourth = asyncio.create_task(producer.send(topic, b"3"))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not fourth.done() and producer.pending == 3
            await producer.flush()  # sends the three: room for the fourth
            future = await asyncio.wait_for(fourth, 10)
            assert [f.result() for f in futures] == [1, 2, 3]
            await producer.close()
            assert await future == 4 and producer.pending == 0

    run(main)


def test_producer_send_waits_while_max_pending_bytes_are_pending(server: ServerProcess,
                                                                 topic: str) -> None:
    """The hostile run: 400 sends of 1 MiB to a stopped server were all taken (RSS +403
    MiB); bytes are bounded too, as in the sync Producer."""
    async def main() -> None:
        async with AsyncClient("127.0.0.1", server.port) as aclient:
            producer = aclient.producer(linger=3600, max_pending_bytes=3 * 1024 * 100)
            futures = [await producer.send(topic, b"x" * 100 * 1024) for _ in range(2)]
            third = asyncio.create_task(producer.send(topic, b"y" * 100 * 1024))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not third.done() and producer.pending == 2
            await producer.flush()
            future = await asyncio.wait_for(third, 10)
            await producer.close()
            assert [f.result() for f in futures] == [1, 2] and await future == 3

    run(main)


def test_producer_lingers_to_batch_and_closing_the_client_fails_its_futures(
        start_server) -> None:
    server = start_server()  # its own: the commit counter below must see only this test
    topic = "linger"
    with Client("127.0.0.1", server.port) as sync:
        sync.create_topic(topic)

    async def main() -> None:
        aclient = AsyncClient("127.0.0.1", server.port)
        writes = (await aclient.server_info()).committed_writes
        producer = aclient.producer(linger=0.2)
        futures = [await producer.send(topic, b"%d" % i) for i in range(5)]
        assert [await f for f in futures] == [1, 2, 3, 4, 5]
        assert (await aclient.server_info()).committed_writes == writes + 1  # one batch
        late = await producer.send(topic, b"late")
        await aclient.close()
        await producer.close()
        with pytest.raises(RuntimeError, match="closed"):
            late.result()

    run(main)
