"""What the log knows of a topic (TopicState), and reading a database's topics and
messages on any connection: the topics as the server loads them, their counters
completed from the rows appended since they were saved (see storage.py), and every
stored message (for tests and forensics, without a server).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import apsw

from ..domain import TopicPolicy
from . import batches
from .formats import key_base, key_range


@dataclasses.dataclass
class TopicState:
    """What the log knows of one topic. `earliest` is None when nothing is stored."""

    id: int
    name: str
    next_offset: int
    earliest: int | None
    stored_bytes: int
    created_at: int = 0
    deleted: bool = False
    policy: TopicPolicy = dataclasses.field(default_factory=lambda: TopicPolicy())
    last_mark: int = 0  # unix second of the newest time mark
    min_committed: int | None = None  # lowest offset committed by a named consumer
    consumer_count: int | None = None  # named consumers; None: not counted yet (writer's own)
    # next_offset and stored_bytes as the topic row holds them, and whether they must be
    # saved in this transaction (a trim changed rows below the saved next_offset)
    saved: tuple[int, int] = (0, 0)
    must_save: bool = False
    key_base: int = 0  # its rows' keys are key_base + first offset (formats.key_base)

    def snapshot(self) -> TopicState:
        """A copy, for readers, of what the writer goes on changing (quicker than copy.copy)."""
        copied = object.__new__(TopicState)
        copied.__dict__.update(self.__dict__)
        return copied

    @property
    def unsaved(self) -> bool:
        return (self.next_offset, self.stored_bytes) != self.saved

    @property
    def latest(self) -> int | None:
        """Highest stored offset, or None when the topic is empty."""
        return None if self.earliest is None else self.next_offset - 1

    def lag_after(self, committed: int) -> int:
        """Stored messages after a consumer's committed offset (deleted ones are not owed)."""
        if self.earliest is None:
            return 0
        return max(self.next_offset - max(committed + 1, self.earliest), 0)

    @property
    def message_count(self) -> int:
        # Offsets are contiguous: trims only ever remove a prefix.
        return 0 if self.earliest is None else self.next_offset - self.earliest


def stored_messages(conn: apsw.Connection) -> list[tuple[str, int, bytes]]:
    """Every stored (topic name, offset, payload), by topic and offset: for looking into
    a database file (tests, forensics) without a server."""
    found: list[tuple[str, int, bytes]] = []
    topics: list[Any] = conn.execute(
        "SELECT name, slot FROM topics WHERE NOT deleted ORDER BY id"
    ).fetchall()
    for name, slot in topics:
        low, high = key_range(key_base(slot))
        rows = conn.execute(
            "SELECT key - ?1, last_offset, payloads, sizes FROM message_rows"
            " WHERE key BETWEEN ?1 AND ?2 ORDER BY key",
            (low, high),
        ).fetchall()
        found += [
            (name, offset, payload)
            for row in rows
            for offset, payload in batches.unpack(*cast(batches.Row, row))
        ]
    return found


def committed_topics(conn: apsw.Connection) -> dict[str, TopicState]:
    """Every live topic with its counters (as loaded: see _recover_counters) and policy,
    as committed; on any connection (tests and forensics too)."""
    sql = """SELECT id, name, next_offset, stored_bytes, created_at,
                    max_messages, max_bytes, max_age, on_full, keep_uncommitted, slot,
                    (SELECT max(marked_at) FROM time_marks WHERE topic_id = topics.id),
                    (SELECT min(committed_offset) FROM consumers WHERE topic_id = topics.id)
             FROM topics WHERE NOT deleted"""
    rows: list[Any] = cast(Any, conn.execute(sql).fetchall())  # SQLite values
    topics = {}
    for (
        tid,
        name,
        next_offset,
        stored_bytes,
        created_at,
        *policy,
        slot,
        last_mark,
        min_committed,
    ) in rows:
        if policy[4] is not None:
            policy[4] = bool(policy[4])
        topic = TopicState(
            tid,
            name,
            next_offset,
            None,
            stored_bytes,
            created_at,
            policy=TopicPolicy(*policy),
            last_mark=last_mark or 0,
            min_committed=min_committed,
            saved=(next_offset, stored_bytes),
            key_base=key_base(slot),
        )
        _recover_counters(conn, topic)
        topics[name] = topic
    return topics


def _recover_counters(conn: apsw.Connection, topic: TopicState) -> None:
    """Complete a topic's counters as loaded from its row with the rows appended since
    they were saved (at or after the saved next_offset), and find its earliest offset."""
    low, high = key_range(topic.key_base)
    earliest, tail_last, appended = cast(
        Any,
        conn.execute(
            "SELECT (SELECT min(key) - ?1 FROM message_rows WHERE key BETWEEN ?1 AND ?2),"
            " (SELECT last_offset FROM message_rows WHERE key BETWEEN ?1 AND ?2"
            "   ORDER BY key DESC LIMIT 1),"
            " (SELECT coalesce(sum(length(payloads)), 0) FROM message_rows"
            "   WHERE key BETWEEN ?1 + ?3 AND ?2)",
            (low, high, topic.next_offset),
        ).fetchall()[0],
    )
    topic.earliest = earliest
    if tail_last is not None and tail_last >= topic.next_offset:
        topic.next_offset = tail_last + 1
        topic.stored_bytes += appended
