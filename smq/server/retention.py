"""Retention and the disk budget, as the writer applies them inside its transactions:
count, size and age limits per topic (TopicPolicy over the server's defaults), trims in
steps, the room left for new messages, and drop-oldest. A part of GroupCommitWriter
(a mixin), called under its commit lock only.
"""

from __future__ import annotations

import logging
import time

from ..domain import TopicPolicy
from ..errors import SMQError, StorageFull
from ..logs import Throttled
from .clock import MessageClock
from .storage import Storage
from .topic_state import TopicState

log = logging.getLogger("smq.server.writer")

# A measured disk budget above ROOM_TRUSTED_ABOVE is trusted for ROOM_SECONDS (see
# reserve_space): far more than the files (WAL included) can grow in that time.
ROOM_SECONDS = 0.1
ROOM_TRUSTED_ABOVE = 256 * 1024**2
DROPPED_LOG_SECONDS = 60  # what drop-oldest dropped is logged at most this often
ROW_OVERHEAD = 64  # bytes a stored message costs beyond its payload (keys, page slack)
MARK_OVERHEAD = 48  # and a time mark, the first message of a topic in a second


class Retention:
    """The writer's retention and disk-budget state and methods."""

    storage: Storage
    clock: MessageClock
    defaults: TopicPolicy
    topics: dict[str, TopicState]
    touched: set[str]

    def _init_retention(self) -> None:
        self._room: int | None = None  # the disk budget left, see reserve_space
        self._room_measured = 0.0
        self._first_written: dict[str, int] = {}  # per topic, the first offset of this transaction
        self._dropped: dict[
            str, int
        ] = {}  # messages drop-oldest trimmed, per topic, not yet logged
        self._retained_out: dict[str, int] = {}  # what retention trimmed in this transaction
        self._dropped_logged = float("-inf")
        self._upkeep_logged = Throttled(log)

    def policy_of(self, topic: TopicState) -> TopicPolicy:
        return topic.policy.over(self.defaults)

    def trim(self, topic: TopicState, until: int) -> int:
        """Trim inside the current transaction and remember to give the space back."""
        count = self.storage.trim(topic, until)
        if count:
            self.touched.add(topic.name)
        return count

    def trim_step_end(self, topic: TopicState, until: int) -> int:
        """Where one step of a trim up to `until` ends (see Trim)."""
        if topic.earliest is None or until < topic.earliest:
            return until
        return min(until, self.storage.offset_freeing(topic, self.storage.trim_step))

    def retention_trim(self, topic: TopicState, until: int) -> int:
        """Trim for retention or the disk budget: like trim, but with keep_uncommitted it
        spares what a named consumer has not committed yet."""
        if self.policy_of(topic).keep_uncommitted and topic.min_committed is not None:
            until = min(until, topic.min_committed)
        count = self.trim(topic, until)
        if count:
            self._retained_out[topic.name] = self._retained_out.get(topic.name, 0) + count
        return count

    def append(self, topic: TopicState, payloads: list[bytes], size: int) -> int:
        """Append payloads (`size` bytes) to the topic within the disk budget (StorageFull
        if they do not fit). Returns the offset of the first."""
        new_mark = MARK_OVERHEAD if self.clock.now != topic.last_mark else 0
        self.reserve_space(size + ROW_OVERHEAD * len(payloads) + new_mark, topic)
        first = topic.next_offset
        self._first_written.setdefault(topic.name, first)
        self.storage.append(topic, payloads, size, self.clock.now)
        self.touched.add(topic.name)
        return first

    def reserve_space(self, size: int, topic: TopicState) -> None:
        """Raise StorageFull unless `size` more bytes fit the disk budget (the filesystem's
        free space above --min-free-space, and --max-db-size), measured at the start of
        every group once it is near and counted down within the group. While it is far
        (ROOM_TRUSTED_ABOVE), a measure is reused for ROOM_SECONDS across groups: a statfs
        and two pragmas per commit were a measurable part of a small one. At the budget,
        a drop-oldest topic makes room by trimming its own oldest messages."""
        now = time.monotonic()
        if self._room is None or (
            self._room >= ROOM_TRUSTED_ABOVE and now - self._room_measured >= ROOM_SECONDS
        ):
            self._measure_room()
        assert self._room is not None  # measured just above
        if size > self._room and self.policy_of(topic).on_full == "drop-oldest":
            self._drop_oldest(topic, size)
        if size > self._room:
            raise StorageFull(
                "disk budget reached: free space or --max-db-size exhausted; "
                "trim or delete messages, or raise the limits"
            )
        self._room -= size

    def _measure_room(self) -> None:
        self._room = self.storage.free_space()
        self._room_measured = time.monotonic()

    def _drop_oldest(self, topic: TopicState, size: int) -> None:
        """Trim the topic's oldest messages in this transaction until `size` bytes fit,
        measuring again after each trim (freed pages are reusable at once). Only
        messages committed before this transaction: none is dropped in the commit that
        acknowledges it. If that is not enough, every trim is undone (a savepoint), and
        the caller refuses the write having dropped nothing."""
        assert self._room is not None  # reserve_space measured it
        committed_until = self._first_written.get(topic.name, topic.next_offset) - 1
        before, dropped_before = topic.snapshot(), dict(self._dropped)
        retained_out_before = dict(self._retained_out)
        with self.storage.savepoint() as undo:
            while (
                size > self._room
                and topic.earliest is not None
                and topic.earliest <= committed_until
            ):
                until = min(self.storage.offset_freeing(topic, size - self._room), committed_until)
                dropped = self.retention_trim(topic, until)
                if not dropped:
                    break  # keep_uncommitted spares the rest
                self._dropped[topic.name] = self._dropped.get(topic.name, 0) + dropped
                self._measure_room()
            if size > self._room:
                undo()
                topic.__dict__.update(before.__dict__)
                self._dropped = dropped_before
                self._retained_out = retained_out_before
                self._measure_room()

    def _enforce_retention(self) -> None:
        """Trim the topics this group grew beyond their max_messages / max_bytes."""
        for name in list(self.touched):
            topic = self.topics.get(name)
            if topic is None or topic.earliest is None:
                continue
            policy = self.policy_of(topic)
            until = 0
            if policy.max_messages and topic.message_count > policy.max_messages:
                until = topic.next_offset - 1 - policy.max_messages
            if policy.max_bytes and topic.stored_bytes > policy.max_bytes:
                until = max(
                    until, self.storage.offset_freeing(topic, topic.stored_bytes - policy.max_bytes)
                )
            if until:
                self.retention_trim(topic, until)

    def _limit_wal(self) -> None:
        """After a commit (which stands, whatever happens here): keep the WAL to its share."""
        try:
            self.storage.limit_wal()
        except SMQError as exc:
            self._upkeep_logged.log(logging.WARNING, "could not checkpoint the WAL: %s", exc)

    def _report_dropped(self) -> None:
        """Log what drop-oldest dropped, at most once a minute (at a full budget, it
        drops at every write)."""
        now = time.monotonic()
        if self._dropped and now - self._dropped_logged >= DROPPED_LOG_SECONDS:
            log.warning(
                "disk budget reached: dropped the oldest messages of drop-oldest topics "
                "to make room (%s; logged at most every %ds)",
                ", ".join(f"{n} of {t!r}" for t, n in sorted(self._dropped.items())),
                DROPPED_LOG_SECONDS,
            )
            self._dropped.clear()
            self._dropped_logged = now
