"""Named consumers' committed offsets in the database (the consumers table): the writer
thread stores and deletes them inside its transaction, any thread reads them through the
reader pool. Part of storage.Storage (a mixin, with storage.py's connections).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import apsw

if TYPE_CHECKING:
    from .topic_state import TopicState


class ConsumerOffsets:
    """Storage's methods on the consumers table."""

    _writer: apsw.Connection
    _reader: Callable[[str], contextlib.AbstractContextManager[apsw.Connection]]

    def update_committed(self, consumer: str, topic: TopicState, offset: int) -> bool:
        """Store the committed offset of a consumer the topic has (writer thread).
        False if it has no such consumer (insert_consumer adds one)."""
        updated = self._writer.execute(
            "UPDATE consumers SET committed_offset = ?, updated_at = ?"
            " WHERE name = ? AND topic_id = ? RETURNING 1",
            (offset, int(time.time()), consumer, topic.id),
        ).fetchall()
        if updated:
            self._refresh_min_committed(topic)
        return bool(updated)

    def insert_consumer(self, consumer: str, topic: TopicState, offset: int) -> None:
        """Add a named consumer to the topic with its committed offset (writer thread)."""
        self._writer.execute(
            "INSERT INTO consumers (name, topic_id, committed_offset, updated_at)"
            " VALUES (?, ?, ?, ?)",
            (consumer, topic.id, offset, int(time.time())),
        )
        if topic.consumer_count is not None:
            topic.consumer_count += 1
        self._refresh_min_committed(topic)

    def consumer_count(self, topic: TopicState) -> int:
        """How many named consumers the topic has (writer thread): counted once, then kept
        by insert_consumer and delete_consumer (a reload after a rollback counts again)."""
        if topic.consumer_count is None:
            topic.consumer_count = self._writer.execute(
                "SELECT count(*) FROM consumers WHERE topic_id = ?", (topic.id,)
            ).get
        return topic.consumer_count

    def delete_consumer(self, consumer: str, topics: Iterable[TopicState]) -> int:
        """Forget the consumer's offsets on these topics (writer thread). Returns how many."""
        deleted = 0
        for topic in topics:
            found = len(
                self._writer.execute(
                    "DELETE FROM consumers WHERE name = ? AND topic_id = ? RETURNING 1",
                    (consumer, topic.id),
                ).fetchall()
            )
            if found and topic.consumer_count is not None:
                topic.consumer_count -= found
            deleted += found
            self._refresh_min_committed(topic)
        return deleted

    def _refresh_min_committed(self, topic: TopicState) -> None:
        topic.min_committed = self._writer.execute(
            "SELECT min(committed_offset) FROM consumers WHERE topic_id = ?", (topic.id,)
        ).get

    def committed_offset(self, consumer: str, topic_id: int) -> int | None:
        with self._reader("read committed offset") as conn:
            return conn.execute(
                "SELECT committed_offset FROM consumers WHERE name = ? AND topic_id = ?",
                (consumer, topic_id),
            ).get

    def consumers(self) -> list[tuple[str, int, int, int]]:
        """Every (consumer, topic id, committed offset, updated at), by consumer and topic."""
        with self._reader("list consumers") as conn:
            return cast(
                Any,
                conn.execute(
                    "SELECT name, topic_id, committed_offset, updated_at"
                    " FROM consumers ORDER BY name, topic_id"
                ).fetchall(),
            )

    def offsets_of(
        self, topic_ids: list[int], limit: int
    ) -> tuple[list[tuple[str, int, int]], int]:
        """At most `limit` (consumer, topic id, committed offset) of these topics, by topic
        and consumer, and how many there are in all (for the metrics: bounded rows read
        into memory, whatever the number of consumers)."""
        marks = ",".join("?" * len(topic_ids))
        with self._reader("list consumers") as conn:
            rows = conn.execute(
                f"SELECT name, topic_id, committed_offset FROM consumers"
                f" WHERE topic_id IN ({marks}) ORDER BY topic_id, name LIMIT ?",
                (*topic_ids, limit),
            ).fetchall()
            total = conn.execute("SELECT count(*) FROM consumers").get
        return cast(Any, rows), cast(int, total)
