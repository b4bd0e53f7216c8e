"""Retention in-process (smq/server/retention.py through the writer): max_messages,
max_bytes and max_age trim the oldest, keep_uncommitted spares what a named consumer
has not committed, and at the disk budget (--max-db-size) a `reject` topic refuses
while a `drop-oldest` one makes room from its own committed messages. Real files in
tmp_path, the writer's clock driven by the test: no sleeps."""
from __future__ import annotations

from pathlib import Path

import pytest

from smq.domain import TopicPolicy
from smq.errors import StorageFull
from smq.server.clock import RELEASED, MessageClock
from smq.server.ops import Append, CommitOffset, CreateTopic, EnforceAge, SetPolicy
from smq.server.schema import StorageOptions
from smq.server.storage import Storage
from smq.server.writer import GroupCommitWriter

DAY = 86400
MIB = 1024**2


class Clock:
    def __init__(self) -> None:
        self.now = float(RELEASED + 10 * DAY)

    def message_clock(self) -> MessageClock:
        # Wall and boot clocks move together: time passes, the clock never steps.
        return MessageClock(lambda: self.now, lambda: self.now - RELEASED, lambda: "boot")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_writer(tmp_path: Path, clock: Clock):
    """open_writer(policy=..., max_db_size=...) -> a GroupCommitWriter on a fresh file."""
    writers: list[GroupCommitWriter] = []

    def open_(defaults: TopicPolicy = TopicPolicy(0, 0, 0, "reject", False),
              max_db_size: int = 0) -> GroupCommitWriter:
        path = tmp_path / f"q{len(writers)}.db"
        writer = GroupCommitWriter(Storage(str(path), StorageOptions(max_db_size=max_db_size)),
                                   defaults=defaults, clock=clock.message_clock())
        writers.append(writer)
        writer.execute(CreateTopic("t"))
        return writer

    yield open_
    for writer in writers:
        writer.close()
        writer.storage.close()


def produce(writer: GroupCommitWriter, *payloads: bytes, topic: str = "t") -> tuple[int, int]:
    return writer.execute(Append.to_topic(topic, list(payloads)))


def stored(writer: GroupCommitWriter, topic: str = "t") -> tuple[int | None, int, int]:
    """(earliest, message count, stored bytes)."""
    state = writer.topics[topic]
    return state.earliest, state.message_count, state.stored_bytes


def test_max_messages_keeps_the_newest(open_writer):
    writer = open_writer(TopicPolicy(3, 0, 0, "reject", False))
    for i in range(1, 6):
        produce(writer, b"m%d" % i)
    assert stored(writer) == (3, 3, 6)
    produce(writer, *[b"x"] * 10)  # one commit beyond the limit keeps its newest three
    assert stored(writer)[:2] == (13, 3)


def test_max_bytes_keeps_the_newest_that_fit(open_writer):
    writer = open_writer(TopicPolicy(0, 250, 0, "reject", False))
    for _ in range(5):
        produce(writer, b"x" * 100)
    assert stored(writer) == (4, 2, 200)


def test_a_topics_own_policy_overrides_the_defaults(open_writer):
    writer = open_writer(TopicPolicy(100, 0, 0, "reject", False))
    writer.execute(SetPolicy("t", TopicPolicy(max_messages=2)))
    produce(writer, b"1", b"2", b"3", b"4")
    assert stored(writer)[:2] == (3, 2)
    writer.execute(CreateTopic("other"))
    produce(writer, b"1", b"2", b"3", b"4", topic="other")
    assert stored(writer, "other")[:2] == (1, 4)


def test_max_age_by_message_time(open_writer, clock: Clock):
    writer = open_writer(TopicPolicy(0, 0, 3600, "reject", False))
    produce(writer, b"a", b"b")
    clock.now += 1800
    produce(writer, b"c")
    clock.now += 1800 - 1
    writer.execute(EnforceAge())
    assert stored(writer)[:2] == (1, 3)
    clock.now += 2
    writer.execute(EnforceAge())
    assert stored(writer)[:2] == (3, 1)
    clock.now += 1800
    writer.execute(EnforceAge())
    assert stored(writer) == (None, 0, 0)
    assert produce(writer, b"d") == (4, 4)  # offsets go on


def test_keep_uncommitted_spares_what_a_consumer_has_not_committed(open_writer):
    writer = open_writer(TopicPolicy(2, 0, 0, "reject", True))
    produce(writer, b"1")
    writer.execute(CommitOffset("c", "t", 1, 10))
    produce(writer, b"2", b"3", b"4", b"5")
    assert stored(writer)[:2] == (2, 4)  # only what "c" committed may go
    writer.execute(CommitOffset("c", "t", 4, 10))
    produce(writer, b"6")
    assert stored(writer)[:2] == (5, 2)


def fill_until_full(writer: GroupCommitWriter, payload: bytes, limit: int = 10_000) -> int:
    """Produce until the disk budget refuses; how many were acknowledged."""
    for count in range(limit):
        try:
            produce(writer, payload)
        except StorageFull:
            return count
    raise AssertionError(f"{limit} messages and the budget never refused")


def test_at_the_disk_budget_reject_refuses_and_keeps_everything(open_writer):
    writer = open_writer(TopicPolicy(0, 0, 0, "reject", False), max_db_size=2 * MIB)
    acknowledged = fill_until_full(writer, b"r" * 4096)
    assert acknowledged > 100
    assert stored(writer)[:2] == (1, acknowledged)  # nothing was dropped
    with pytest.raises(StorageFull):
        produce(writer, b"r" * 4096)


def test_at_the_disk_budget_drop_oldest_makes_room_from_its_own_oldest(open_writer):
    writer = open_writer(TopicPolicy(0, 0, 0, "drop-oldest", False), max_db_size=2 * MIB)
    for _ in range(200):  # 6 MiB, three times what fits: each new one drops old ones
        produce(writer, b"d" * 32 * 1024)
    earliest, count, _ = stored(writer)
    assert earliest > 1 and count > 20
    assert earliest + count - 1 == 200  # the newest are kept, offsets contiguous
    # A message larger than anything dropping could free is refused, dropping nothing.
    with pytest.raises(StorageFull):
        produce(writer, b"d" * (4 * MIB))
    assert stored(writer)[:2] == (earliest, count)


def test_drop_oldest_never_drops_what_the_same_commit_acknowledges(open_writer):
    """A batch larger than the budget is refused whole: it cannot make room by dropping
    its own messages."""
    writer = open_writer(TopicPolicy(0, 0, 0, "drop-oldest", False), max_db_size=2 * MIB)
    produce(writer, b"old")
    with pytest.raises(StorageFull):
        writer.execute(Append.to_topic("t", [b"n" * 4096] * 1000, atomic=True))
    assert stored(writer)[:2] == (1, 1)
