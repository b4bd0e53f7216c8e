"""QueueService in-process (smq/server/service.py): WIRE.md's rules without gRPC, over a
real Storage on a temp file, with a message clock the test moves (no sleeps).

What the wire tests check through a server process, here at the level that decides
it: offsets, errors, pages, batches, trims, durable consumers, policies, follow, and
that what the service says exists is on disk after a restart.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from smq.domain import TopicPolicy
from smq.errors import (InvalidArgument, MessageTooLarge, NoCommittedOffset, NotFound,
                        OffsetNotFound, OffsetOutOfRange, PermissionDenied, TopicEmpty,
                        TopicNotFound, Unavailable)
from smq.server.clock import RELEASED, MessageClock
from smq.server.ops import EnforceAge
from smq.server.service import Limits, QueueService, page_messages
from smq.server.storage import Storage

DAY = 86400


class Clocks:
    """Wall and boot clocks the test moves together (time passing, no steps)."""

    def __init__(self) -> None:
        self.wall = float(RELEASED + 30 * DAY)
        self.boot = 1000.0

    def wait(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds

    def message_clock(self) -> MessageClock:
        return MessageClock(lambda: self.wall, lambda: self.boot, lambda: "boot-1")


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def open_service(tmp_path: Path, clocks: Clocks):
    """open_service(**limits) -> a QueueService on tmp_path/q.db (closed at the end);
    call it again after closing the first to reopen the same file."""
    opened: list[QueueService] = []

    def open_(**limits) -> QueueService:
        service = QueueService(Storage(str(tmp_path / "q.db")), Limits(**limits),
                               clock=clocks.message_clock())
        opened.append(service)
        return service

    yield open_
    for service in opened:
        if not service.closing:
            service.close()


@pytest.fixture
def service(open_service) -> QueueService:
    return open_service()


def test_offsets_start_at_one_and_go_on(service: QueueService):
    assert service.create_topic("t") is True
    assert service.create_topic("t") is False
    assert [service.produce("t", b"m%d" % i) for i in range(1, 4)] == [1, 2, 3]
    assert service.produce_batch("t", [b"a", b"b"]) == (4, 5)
    assert service.produce_batch("t", []) == (0, 0)
    assert (service.earliest_offset("t"), service.latest_offset("t")) == (1, 5)
    assert service.consume("t", 2) == b"m2"
    topic = service.describe("t")
    assert (topic.next_offset, topic.message_count, topic.stored_bytes) == (6, 5, 8)


def test_errors_are_wire_md_conditions(service: QueueService):
    with pytest.raises(TopicNotFound):
        service.produce("missing", b"x")
    with pytest.raises(InvalidArgument):
        service.create_topic("no spaces")
    service.create_topic("t")
    with pytest.raises(TopicEmpty):
        service.earliest_offset("t")
    with pytest.raises(TopicEmpty):
        service.latest_offset("t")
    service.produce("t", b"x")
    with pytest.raises(OffsetOutOfRange):
        service.consume("t", 2)
    with pytest.raises(OffsetNotFound):
        service.consume("t", 0)
    with pytest.raises(MessageTooLarge):
        service.produce("t", b"x" * (service.limits.max_message_size + 1))
    with pytest.raises(MessageTooLarge):
        service.produce_batch("t", [b"ok", b"x" * (service.limits.max_message_size + 1)])
    assert service.latest_offset("t") == 1  # the refused batch stored nothing


def test_remote_writes_can_be_refused_local_ones_never(open_service):
    service = open_service(allow_remote_writes=False)
    service.check_may_write(local=True)
    with pytest.raises(PermissionDenied):
        service.check_may_write(local=False)


def test_trim_deletes_a_prefix_and_offsets_go_on(service: QueueService):
    service.create_topic("t")
    service.produce_batch("t", [b"1", b"2", b"3", b"4"])
    assert service.trim("t", 0) == 0
    assert service.trim("t", 2) == 2
    assert service.earliest_offset("t") == 3
    with pytest.raises(OffsetNotFound, match="was deleted; the earliest is 3"):
        service.consume("t", 1)
    assert service.trim("t", 10) == 2
    with pytest.raises(TopicEmpty):
        service.earliest_offset("t")
    assert service.produce("t", b"5") == 5


def test_delete_topic_then_create_again_keeps_offsets_going(service: QueueService):
    service.create_topic("t")
    service.produce_batch("t", [b"a", b"b"])
    service.delete_topic("t")
    with pytest.raises(TopicNotFound):
        service.describe("t")
    assert service.create_topic("t") is True
    assert service.produce("t", b"c") == 3


def test_pages_by_count_and_by_encoded_size(service: QueueService):
    service.create_topic("t")
    service.produce_batch("t", [b"x" * 100] * 50)
    page = service.read("t", 0, 0)
    assert [o for o, _ in page.messages] == list(range(1, 51)) and page.next_offset == 51
    page = service.read("t", 10, 5)
    assert [o for o, _ in page.messages] == [10, 11, 12, 13, 14] and page.next_offset == 15
    small = service.read("t", 1, 50, max_bytes=1000)
    assert 1 <= len(small.messages) < 10  # each message costs more than its 100 bytes
    past = service.read("t", 60, 10)
    assert past.messages == [] and past.next_offset == 60
    assert page_messages(0) == 100 and page_messages(10**9) == 10_000


def test_stream_produce_commits_what_came_before_a_bad_message(service: QueueService):
    service.create_topic("a")
    service.create_topic("b")
    counted: list[int] = []
    # The last message's offset: "a" has 1 and 2, "b" has 1.
    assert service.produce_stream([("a", b"1"), ("b", b"2"), ("a", b"3")], counted.append) == 2
    assert sum(counted) == 3
    assert service.consume("a", 2) == b"3" and service.consume("b", 1) == b"2"
    with pytest.raises(TopicNotFound):
        service.produce_stream([("a", b"4"), ("missing", b"5")])
    assert service.latest_offset("a") == 3  # the message before the bad one is committed


def test_durable_consumers_commit_lag_and_delete(service: QueueService):
    service.create_topic("t")
    service.produce_batch("t", [b"1", b"2", b"3", b"4"])
    with pytest.raises(NoCommittedOffset):
        service.committed_offset("c", "t")
    service.commit_offset("c", "t", 1)
    assert service.committed_offset("c", "t") == 1
    with pytest.raises(OffsetOutOfRange):
        service.commit_offset("c", "t", 5)
    with pytest.raises(InvalidArgument):
        service.commit_offset("c", "t", -1)
    [state] = service.consumers()
    assert (state.consumer, state.topic, state.committed_offset, state.lag) == ("c", "t", 1, 3)
    assert service.delete_consumer("c", "t") == 1
    with pytest.raises(NotFound):
        service.delete_consumer("c", "t")


def test_at_most_max_consumers_per_topic(open_service):
    service = open_service(max_consumers_per_topic=2)
    service.create_topic("t")
    service.produce("t", b"x")
    service.commit_offset("one", "t", 1)
    service.commit_offset("two", "t", 1)
    with pytest.raises(Exception, match="2"):
        service.commit_offset("three", "t", 1)
    service.commit_offset("one", "t", 0)  # those it has may still move


def test_policy_overrides_over_the_defaults(open_service):
    service = open_service(topic_defaults=TopicPolicy(0, 0, 0, "reject", False))
    service.create_topic("t")
    own, effective = service.set_policy("t", TopicPolicy(max_messages=3))
    assert own.max_messages == 3 and own.on_full is None
    assert effective == TopicPolicy(3, 0, 0, "reject", False)
    with pytest.raises(InvalidArgument):
        service.set_policy("t", TopicPolicy(max_bytes=-1))
    with pytest.raises(InvalidArgument):
        service.set_policy("t", TopicPolicy(on_full="sometimes"))


def test_age_retention_follows_the_injected_clock(service: QueueService, clocks: Clocks):
    service.create_topic("t")
    service.set_policy("t", TopicPolicy(max_age=DAY))
    service.produce_batch("t", [b"old"] * 3)
    clocks.wait(DAY / 2)
    service.produce("t", b"new")
    clocks.wait(DAY / 2 - 1)
    service.writer.execute(EnforceAge())
    assert service.describe("t").message_count == 4  # the first three: a day less a second
    clocks.wait(2)
    service.writer.execute(EnforceAge())
    assert (service.earliest_offset("t"), service.latest_offset("t")) == (4, 4)
    clocks.wait(DAY)
    service.writer.execute(EnforceAge())
    with pytest.raises(TopicEmpty):
        service.earliest_offset("t")


def test_everything_acknowledged_is_there_after_a_restart(open_service, clocks: Clocks):
    first = open_service()
    first.create_topic("t")
    first.produce_batch("t", [b"a", b"b", b"c"])
    first.trim("t", 1)
    first.commit_offset("c", "t", 2)
    first.set_policy("t", TopicPolicy(max_messages=100))
    first.close()
    again = open_service()
    topic = again.describe("t")
    assert (topic.earliest, topic.next_offset) == (2, 4)
    assert [again.consume("t", o) for o in (2, 3)] == [b"b", b"c"]
    assert again.committed_offset("c", "t") == 2
    assert again.policy("t")[0].max_messages == 100
    assert again.produce("t", b"d") == 4


def test_totals_count_commits_and_what_is_stored(service: QueueService):
    service.create_topic("a")
    service.create_topic("b")
    service.produce_batch("a", [b"12", b"34"])
    service.produce("b", b"5")
    totals = service.totals()
    assert (totals.topics, totals.stored_messages, totals.stored_bytes) == (2, 3, 5)
    assert totals.committed_messages == 3 and totals.commits >= 3


def test_follow_pages_history_then_each_commit(service: QueueService):
    service.create_topic("t")
    service.produce_batch("t", [b"1", b"2"])
    follower = service.follow("t", 0, heartbeat=30)
    assert [o for o, _ in follower.next_page()] == [1, 2]
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(follower.next_page()))
    waiting.start()
    service.produce("t", b"3")  # the commit wakes the waiting follower at once
    waiting.join(10)
    assert not waiting.is_alive() and [o for o, _ in got[0]] == [3]


def test_shutdown_wakes_followers_with_unavailable(service: QueueService):
    service.create_topic("t")
    follower = service.follow("t", 1, heartbeat=30)
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            follower.next_page()
        except BaseException as exc:  # noqa: BLE001 - what the thread saw is the point
            errors.append(exc)

    waiting = threading.Thread(target=follow)
    waiting.start()
    service.begin_shutdown()
    waiting.join(10)
    assert not waiting.is_alive() and isinstance(errors[0], Unavailable)
    with pytest.raises(Unavailable):
        service.stream_slot()
