"""The Forwarder in-process (smq/forward/engine.py) with a fake SMQ source and a fake
JetStream upstream, both in memory: what it sends, in which order, what it commits
and when, how it resumes and how it starts over after an upstream failure. No
processes, no sockets, no sleeps in the tests: they wait on what the fakes observe.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from smq.errors import AccessDenied, NotConnected, PublishFailed, TopicNotFound, Unavailable
from smq.forward import engine
from smq.forward.engine import Forwarder, Plan
from smq.forward.jetstream import PubAck, StreamState, subject_matches
from smq.forward.source import TopicOffsets
from smq.forward.tallies import SMQ_ERRORS, UPSTREAM_ERRORS, Tally

NODE = "edge"
PLAN = Plan(topics=("a", "b"), node=NODE, subject_prefix="smq", stream="SMQ_edge", window=8)
WAIT = 10.0  # seconds for anything the forwarder should do at once


@dataclasses.dataclass(frozen=True)
class Target:
    address: str = "smq.test:8097"


class FakeSource:
    """An SMQ server's topics in memory, read by one durable consumer."""

    def __init__(self, topics: dict[str, list[bytes]]) -> None:
        self.target = Target()
        self.messages = {name: list(payloads) for name, payloads in topics.items()}
        self.earliest = {name: 1 for name in topics}
        self.commits: dict[str, int] = {}
        self.commit_log: list[tuple[str, int]] = []
        self.changed = asyncio.Condition()
        self.errors = Tally(SMQ_ERRORS)

    async def produce(self, topic: str, *payloads: bytes) -> None:
        async with self.changed:
            self.messages[topic].extend(payloads)
            self.changed.notify_all()

    async def ping(self) -> None:
        pass

    async def offsets(self, topic: str) -> TopicOffsets | None:
        if topic not in self.messages:
            return None
        stored = self.messages[topic]
        earliest = self.earliest[topic] if len(stored) >= self.earliest[topic] else 0
        return TopicOffsets(earliest, len(stored) if earliest else 0, len(stored) + 1)

    async def committed(self, topic: str) -> int | None:
        if topic not in self.messages:
            raise TopicNotFound(topic)
        return self.commits.get(topic)

    async def commit(self, topic: str, offset: int) -> None:
        async with self.changed:
            self.commits[topic] = offset
            self.commit_log.append((topic, offset))
            self.changed.notify_all()

    async def pages(self, topic: str, offset: int,
                    page_size: int) -> AsyncIterator[list[tuple[int, bytes]]]:
        cursor = max(offset, self.earliest[topic])
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.messages[topic]) >= cursor)
                stored = self.messages[topic]
                last = min(len(stored), cursor + page_size - 1)
                page = [(o, stored[o - 1]) for o in range(cursor, last + 1)]
            cursor = page[-1][0] + 1
            yield page

    async def wait(self, condition: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(condition), WAIT)


@dataclasses.dataclass
class Options:
    servers: tuple[str, ...] = ("nats://nats.test:4222",)


class FakeJetStream:
    """One JetStream stream in memory, with the chain rule of smq.forward.jetstream: a
    publish is stored only right after its predecessor. `refuse` holds msg ids to
    refuse once (as a leader change or a full stream would)."""

    def __init__(self, subjects: tuple[str, ...] = ("smq.edge.>",)) -> None:
        self.options = Options()
        self.subjects = subjects
        self.stored: list[tuple[str, str, bytes]] = []  # (subject, msg id, payload)
        self.refuse: set[str] = set()
        self.sessions = 0
        self.connected = False
        self._chain_ok = False
        self.errors = Tally(UPSTREAM_ERRORS)

    @property
    def server(self) -> str:
        return "nats.test:4222"

    async def connect(self) -> None:
        self.connected = True

    async def create_stream(self, subjects, replicas: int, duplicate_window: float) -> bool:
        return False

    async def stream_state(self) -> StreamState:
        return StreamState(self.subjects, len(self.stored))

    async def last_msg_id(self, subject: str) -> str | None:
        ids = [msg_id for s, msg_id, _ in self.stored if s == subject]
        return ids[-1] if ids else None

    def begin_chain(self, last_seq: int) -> None:
        self.sessions += 1
        self._chain_ok = last_seq == len(self.stored)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[PubAck]:
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        if msg_id in self.refuse:
            self.refuse.discard(msg_id)
            self._chain_ok = False  # everything after it in this chain is refused too
        if not self._chain_ok:
            future.set_exception(PublishFailed("wrong last sequence"))
            future.exception()
            return future
        assert any(subject_matches(p, subject) for p in self.subjects), subject
        self.stored.append((subject, msg_id, payload))
        future.set_result(PubAck(len(self.stored), False))
        return future

    def forget(self, future: asyncio.Future[PubAck]) -> None:
        pass

    def ids(self) -> list[str]:
        return [msg_id for _, msg_id, _ in self.stored]


@pytest.fixture(autouse=True)
def quick_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own pauses (commit interval, backoff between sessions), short."""
    monkeypatch.setattr(engine, "COMMIT_INTERVAL", 0.01)
    monkeypatch.setattr(engine, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(engine, "BACKOFF_MAX", 0.05)


def forwarding(source: FakeSource, upstream: FakeJetStream, plan: Plan = PLAN,
               check: Callable[[Forwarder], Awaitable[None]] | None = None) -> Forwarder:
    """Run a Forwarder until `check(forwarder)` returns, then stop it (it commits what
    was acknowledged) and return it."""
    async def main() -> Forwarder:
        stop = asyncio.Event()
        ready: list[str] = []
        forwarder = Forwarder(plan, source, upstream, on_ready=ready.append)
        running = asyncio.create_task(forwarder.run(stop))
        try:
            if check is not None:
                await check(forwarder)
        finally:
            stop.set()
            await asyncio.wait_for(running, WAIT)
        forwarder.ready_lines = ready
        return forwarder

    return asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what the forwarder's own timers change (the fakes see no call for it)."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def ids(topic: str, offsets) -> list[str]:
    return [f"{NODE}/{topic}/{o}" for o in offsets]


def test_the_backlog_then_new_messages_exactly_once_in_order_then_committed():
    source = FakeSource({"a": [b"a%d" % i for i in range(1, 21)], "b": [b"b1"]})
    upstream = FakeJetStream()

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits == {"a": 20, "b": 1})
        await source.produce("b", b"b2", b"b3")
        await source.wait(lambda: source.commits.get("b") == 3)
        assert forwarder.health_problem() is None

    forwarder = forwarding(source, upstream, check=check)
    stored = upstream.stored
    assert [i for s, i, _ in stored if s == "smq.edge.a"] == ids("a", range(1, 21))
    assert [i for s, i, _ in stored if s == "smq.edge.b"] == ids("b", range(1, 4))
    assert [p for s, _, p in stored if s == "smq.edge.a"] == source.messages["a"]
    assert forwarder.forwarded == 23
    assert [(t.forwarded, t.acked, t.lag) for t in forwarder.topics] == [(20, 20, 0), (3, 3, 0)]
    assert forwarder.health_problem() == "shutting down"
    assert "backlog 21 (a 20, b 1)" in forwarder.ready_lines[0]
    # Commits only ever go forward, and never past what JetStream acknowledged.
    for topic in ("a", "b"):
        offsets = [o for t, o in source.commit_log if t == topic]
        assert offsets == sorted(offsets)


def test_resumes_after_what_jetstream_holds_without_sending_it_again():
    """A forwarder that died after JetStream's acks, before its commit."""
    source = FakeSource({"a": [b"1", b"2", b"3", b"4", b"5"], "b": []})
    source.commits["a"] = 1
    upstream = FakeJetStream()
    upstream.stored = [("smq.edge.a", i, b"") for i in ids("a", range(1, 4))]

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 5)

    forwarding(source, upstream, check=check)
    assert upstream.ids() == ids("a", range(1, 6))
    assert ("a", 3) in source.commit_log  # what JetStream held, committed before sending


def test_a_refused_publish_ends_the_session_and_the_next_goes_on_without_duplicates():
    source = FakeSource({"a": [b"m%d" % i for i in range(1, 31)], "b": []})
    upstream = FakeJetStream()
    upstream.refuse = set(ids("a", [12]))

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 30)

    forwarding(source, upstream, check=check)
    assert upstream.sessions >= 2
    assert upstream.ids() == ids("a", range(1, 31))


def test_start_from_latest_skips_what_is_stored_before_the_first_run():
    source = FakeSource({"a": [b"old"] * 5, "b": []})
    upstream = FakeJetStream()
    plan = dataclasses.replace(PLAN, start_from="latest")

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 5)
        await source.produce("a", b"new")
        await source.wait(lambda: source.commits.get("a") == 6)

    forwarding(source, upstream, plan, check=check)
    assert upstream.ids() == ids("a", [6])


def test_messages_deleted_before_they_were_sent_are_skipped_and_reported(caplog):
    source = FakeSource({"a": [b"1", b"2", b"3", b"4"], "b": []})
    source.commits["a"] = 1
    source.earliest["a"] = 3  # retention deleted offset 2 before it was forwarded
    upstream = FakeJetStream()

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 4)

    forwarding(source, upstream, check=check)
    assert upstream.ids() == ids("a", [3, 4])
    assert "offsets 2 to 2 of 'a' were deleted from SMQ before they were forwarded" in caplog.text


def test_a_stream_that_does_not_take_the_subjects_is_a_problem_not_a_crash():
    source = FakeSource({"a": [b"1"], "b": []})
    upstream = FakeJetStream(subjects=("other.>",))
    seen: list[str] = []

    async def check(forwarder: Forwarder) -> None:
        for _ in range(1000):  # a few sessions go by; each ends on the same problem
            seen.append(forwarder.problem)
            if upstream.sessions == 0 and "does not take subject" in forwarder.problem:
                assert forwarder.health_problem() == f"not forwarding: {forwarder.problem}"
                return
            await asyncio.sleep(0)  # let the forwarder's task run (no time passes)
        raise AssertionError(seen[-5:])

    forwarder = forwarding(source, upstream, check=check)
    assert upstream.stored == [] and source.commits == {}
    assert "smq.edge.a" in forwarder.problem and forwarder.status_line().startswith("not forwarding")
    assert upstream.errors.snapshot()["stream"] >= 1


def test_smq_unavailable_while_reading_reopens_where_it_stopped(monkeypatch):
    source = FakeSource({"a": [b"m%d" % i for i in range(1, 11)], "b": []})
    pages = source.pages
    failures = [Unavailable("the SMQ server went away")]

    async def flaky_pages(topic: str, offset: int, page_size: int):
        async for page in pages(topic, offset, min(page_size, 3)):
            yield page
            if topic == "a" and failures:
                raise failures.pop()

    monkeypatch.setattr(source, "pages", flaky_pages)
    upstream = FakeJetStream()

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 10)

    forwarding(source, upstream, check=check)
    assert not failures and upstream.ids() == ids("a", range(1, 11))
    assert upstream.sessions == 1  # an SMQ-side failure does not end the session


class DenyingSource(FakeSource):
    """A source whose server's access rules deny the topics in `denied` (every call)."""

    def __init__(self, topics: dict[str, list[bytes]], denied: set[str]) -> None:
        super().__init__(topics)
        self.denied = denied
        self.denials = 0

    def _check(self, topic: str, action: str) -> None:
        if topic in self.denied:
            self.denials += 1
            raise AccessDenied(f"could not {action} {topic!r} at smq.test:8097: "
                               f'PERMISSION_DENIED: identity "edge" may not consume from '
                               f'topic "{topic}" (acl file /etc/smq/acl.toml)')

    async def offsets(self, topic: str) -> TopicOffsets | None:
        self._check(topic, "describe topic")
        return await super().offsets(topic)

    async def pages(self, topic: str, offset: int, page_size: int):
        self._check(topic, "follow topic")
        async for page in super().pages(topic, offset, page_size):
            yield page


def test_a_denied_topic_waits_and_is_logged_once_while_the_others_go_on(monkeypatch, caplog):
    monkeypatch.setattr(engine, "DENIED_RETRY", 0.05)
    source = DenyingSource({"a": [b"a1", b"a2"], "b": [b"b1"]}, denied={"b"})
    upstream = FakeJetStream()

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 2)
        await asyncio.sleep(0.5)  # about ten tries of b
        assert "access denied to topic b" in forwarder.status_line()
        assert forwarder.health_problem().startswith("topic 'b': access denied: could not ")
        source.denied.clear()  # the server's rules were changed (and reloaded)
        await source.wait(lambda: source.commits.get("b") == 1)
        assert forwarder.health_problem() is None

    forwarder = forwarding(source, upstream, check=check)
    assert upstream.ids() == ids("a", [1, 2]) + ids("b", [1])
    assert 2 <= source.denials <= 20, source.denials  # retried, but not in a hot loop
    denied = [r for r in caplog.records if "may not consume from" in r.getMessage()]
    assert len(denied) == 1, [r.getMessage() for r in denied]
    assert "not forwarding 'b', trying again every 0.05 s" in denied[0].getMessage()
    assert upstream.sessions == 1 and forwarder.forwarded == 3


class UnreachableJetStream(FakeJetStream):
    """NATS that never answers (a device that boots offline)."""

    async def connect(self) -> None:
        self.errors.add("connect")
        raise NotConnected("cannot connect to NATS at nats://nats.test:4222: refused")


def test_while_nats_is_away_from_the_start_the_lag_counts_from_the_committed_offset():
    source = FakeSource({"a": [b"m"] * 10, "b": []})
    source.commits["a"] = 3
    upstream = UnreachableJetStream()
    plan = dataclasses.replace(PLAN, log_interval=0.01)  # status refreshes this often

    async def check(forwarder: Forwarder) -> None:
        a = forwarder.topics[0]
        await until(lambda: a.committed == 3 and a.latest == 10)
        assert (a.lag, a.backlog, a.forwarded) == (7, 7, 0)
        await source.produce("a", b"m", b"m")
        await until(lambda: a.lag == 9)
        assert "backlog 9 (a 9, b 0)" in forwarder.status_line()
        assert forwarder.health_problem() == (
            "not forwarding: cannot connect to NATS at nats://nats.test:4222: refused")
        assert upstream.errors.snapshot()["connect"] >= 1

    forwarding(source, upstream, plan, check=check)


class LateAcks(FakeJetStream):
    """Stores the messages in `late` without answering (their acknowledgement is lost
    with the session), and refuses `refuse_now` at once, as a message too large is."""

    def __init__(self, late: set[str], refuse_now: set[str]) -> None:
        super().__init__()
        self.late, self.refuse_now = late, refuse_now

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[PubAck]:
        if msg_id in self.refuse_now:
            self.refuse_now.discard(msg_id)
            raise PublishFailed(f"{msg_id} is too large")
        future = await super().publish(subject, payload, msg_id)
        return asyncio.get_running_loop().create_future() if msg_id in self.late else future


def test_messages_stored_whose_acknowledgement_came_too_late_are_counted_once():
    source = FakeSource({"a": [b"m%d" % i for i in range(1, 11)], "b": []})
    upstream = LateAcks(late=set(ids("a", [1, 2, 3])), refuse_now=set(ids("a", [4])))

    async def check(forwarder: Forwarder) -> None:
        await source.wait(lambda: source.commits.get("a") == 10)

    forwarder = forwarding(source, upstream, check=check)
    assert upstream.sessions == 2 and upstream.ids() == ids("a", range(1, 11))
    assert forwarder.forwarded == forwarder.topics[0].forwarded == 10
