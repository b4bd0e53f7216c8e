"""Group commit: one write transaction at a time, many writes per transaction.

Callers (gRPC threads) submit WriteOps and wait. The writer thread takes the ops
queued (up to a size cap; small ones before large ones: write_lanes.py), applies
them all in one transaction, commits once (one fsync in full durability), and only
then releases every caller. While one commit is being fsynced, new ops pile up and
form the next group: the more concurrent writers, the more each commit carries.

Two refinements, both about the hand-off between callers and the writer thread:

- A lone writer commits its own op (`execute`): with nothing queued, no commit
  running and the last group a single op, waking the writer thread and being woken
  by it again costs more than the commit itself (two thread switches, each a GIL
  hand-off). The commit lock keeps transactions one at a time either way.
- A group waits briefly for the writers that are on their way: when N ops were about
  at the last commit (its own and those that queued up during it: N callers that
  each send their next write as soon as they are answered), the next group waits
  for N ops, up to twice a commit's time (1 to 2 ms), instead of committing the
  first arrival alone and the others one commit later. A lone writer never waits,
  and a wrong guess costs one wait: the next group expects what actually came.

If a group fails in storage (disk full, I/O error), nothing of it was committed;
its ops are retried one per transaction so that one bad op cannot fail the others.

At the disk budget, an Append to a drop-oldest topic trims that topic's oldest
messages in its own transaction, just enough for it to fit: the write and what it
dropped commit together, or neither does (a refused write has dropped nothing).

The writer owns the working topic counters (next offset, earliest, bytes). After each
commit it hands copies of the topics it changed to `on_commit`, which is how the
rest of the server learns what readers may now see.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..domain import TopicPolicy
from ..errors import DeadlineExceeded, SMQError, StorageFailure, StorageFull, Unavailable
from ..logs import Throttled
from .clock import MessageClock, describe_shift
from .ops import STREAM_SECONDS, Barrier, Caller, EnforceAge, WriteOp
from .retention import ROOM_TRUSTED_ABOVE, Retention
from .storage import Storage
from .tallies import CommitStats
from .topic_state import TopicState
from .write_lanes import STOP, WriteLanes

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # periodic upkeep (_tick) runs at most this often
# Appends leave the topic rows alone (storage.py); their counters are saved this often,
# so that loading them adds at most this long's appends.
COUNTERS_SAVE_SECONDS = 60.0
# How long a group waits for the writers it expects: twice the recent commit time
# (fsync included), within these bounds. Measured with 2 and 4 unary producers.
GATHER_MIN_SECONDS = 0.001
GATHER_MAX_SECONDS = 0.002
GATHER_COMMITS = 2.0


class GroupCommitWriter(Retention):
    """The single writer thread. Submit ops with `submit`; `close` drains and stops.

    `topics` holds the live topics; `touched` and `deleted` collect what the current
    group changed, for `on_commit`.
    """

    def __init__(
        self,
        storage: Storage,
        on_commit: Callable[[list[TopicState]], None] = lambda topics: None,
        defaults: TopicPolicy = TopicPolicy(0, 0, 0, "reject", False),
        clock: MessageClock | None = None,
    ) -> None:
        self.storage = storage
        self.defaults = defaults
        self.clock = clock or MessageClock()
        self._init_retention()
        self._full_logged = Throttled(log)
        self.topics: dict[str, TopicState] = storage.reload_topics()
        self._start_clock()
        self.touched: set[str] = set()
        self.deleted: list[TopicState] = []
        self._topics_stale = False  # True while `topics` may be ahead of the database
        self._on_commit = on_commit
        self._lanes = WriteLanes()  # small writes before large ones: write_lanes.py
        self._closed = False
        self._commit_lock = threading.Lock()  # held while a group is applied and committed
        self._finished = False  # set by close() under the commit lock: no more commits
        self._expected = 1  # writers about at the last commit: the next group waits for them
        self._commit_seconds = 0.0  # moving average of one commit's duration
        self.commits = 0  # transactions committed, and the ops/messages they carried
        self.committed_ops = 0
        self.committed_messages = 0
        self.stats = CommitStats()  # for the metrics (tallies.py)
        self.disk_left: int | None = None  # the disk budget left, as the last tick measured it
        self._counters_saved_at = time.monotonic()
        # Each topic's next offset as last committed, by topic id: a reload after a failed
        # write never goes back from it, even if rows went missing (offsets are not reused).
        self._committed_next: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="smq-writer", daemon=True)
        self._thread.start()

    def committed_topics(self) -> list[TopicState]:
        """Copies of the topic counters as of start-up, for the service's first view."""
        return [t.snapshot() for t in self.topics.values()]

    def submit(self, op: WriteOp) -> WriteOp:
        """Queue op for the writer thread; `op.wait()` for its result."""
        if self._closed:
            raise Unavailable("server is shutting down")
        self._lanes.put(op)
        return op

    def execute(self, op: WriteOp, timeout: float | None = None) -> Any:
        """Apply op, wait until it is committed, return its result or raise its error.
        A lone writer (see the module's docstring) commits it in the calling thread."""
        if self._closed:
            raise Unavailable("server is shutting down")
        if (
            self._expected <= 1
            and self._lanes.empty()
            and self._commit_lock.acquire(blocking=False)
        ):
            try:
                if self._finished:
                    raise Unavailable("server is shutting down")
                _check_caller_waits(op)  # a write queued from now on commits after op
                self._commit_group([op])
            finally:
                self._commit_lock.release()
            return op.wait(0)
        _check_caller_waits(op)
        return self.submit(op).wait(timeout)

    def queue_depth(self) -> int:
        """Writes waiting for the writer (for the metrics)."""
        return self._lanes.depth()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Apply what is queued, then stop the thread (and wait for a caller's own commit)."""
        self._closed = True
        self._lanes.put(STOP)
        self._thread.join(timeout)
        if self._commit_lock.acquire(timeout=-1 if timeout is None else timeout):
            self._finished = True
            self._commit_lock.release()

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        while True:
            has_work = self._lanes.wait_for_work(TICK_SECONDS)
            if not has_work and self._lanes.stopping:
                self._save_counters_at_stop()
                return
            wait = self._lanes.leader().not_before - time.monotonic() if has_work else 0.0
            if wait > 0:  # a busy stream's next chunk: let it fill (StreamAppend)
                time.sleep(min(wait, STREAM_SECONDS))
            with self._commit_lock:
                if has_work:
                    # Gathered under the lock: what arrives while a caller commits its
                    # own op joins this group rather than the next.
                    self._commit_group(self._lanes.next_group(self._expected, self._gather_wait()))
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + TICK_SECONDS

    def _tick(self) -> None:
        """Periodic upkeep: age retention, saving message time's offset after a step of
        the wall clock, saving the topics' counters (COUNTERS_SAVE_SECONDS), and the disk
        budget left, for the metrics."""
        self._read_clock()
        try:
            self.disk_left = self.storage.free_space()
        except SMQError:
            self.disk_left = None
        if (
            self._clock_unsaved
            or any(self.policy_of(t).max_age for t in self.topics.values())
            or (self._counters_due() and any(t.unsaved for t in self.topics.values()))
        ):
            self._commit_group([EnforceAge()])

    def _save_counters_at_stop(self) -> None:
        """A clean stop saves the counters, so that the next start adds nothing up."""
        if any(t.unsaved for t in self.topics.values()):
            self._counters_saved_at = float("-inf")
            with self._commit_lock:
                self._commit_group([Barrier()])

    def _counters_due(self) -> bool:
        return time.monotonic() - self._counters_saved_at >= COUNTERS_SAVE_SECONDS

    def _start_clock(self) -> None:
        """Message time goes on from what the database kept (clock.py); saved by the first
        transaction, so that starting never writes (a full disk must not stop it)."""
        newest = max((t.last_mark for t in self.topics.values() if t.last_mark), default=None)
        for note in self.clock.start(self.storage.clock_state(), newest):
            log.warning("%s", note)
        self._clock_unsaved = True

    def _read_clock(self) -> None:
        """Fix message time for the next transaction; a step of the wall clock is logged
        once and its offset saved by the next transaction."""
        step = self.clock.tick()
        if step:
            log.warning(
                "the wall clock stepped %s: message time goes on without the step, so age "
                "retention counts each message's age from when it was written",
                describe_shift(step),
            )
            self._clock_unsaved = True

    def _gather_wait(self) -> float:
        """How long a group waits for the writers it expects (module docstring)."""
        wait = GATHER_COMMITS * self._commit_seconds
        return min(max(wait, GATHER_MIN_SECONDS), GATHER_MAX_SECONDS)

    def _commit_group(self, group: list[WriteOp]) -> None:
        """Apply and commit group (under the commit lock), then release its callers; ops
        left unfinished go on in transactions of their own."""
        while group:
            group = self._commit_once(group)

    def _commit_once(self, group: list[WriteOp]) -> list[WriteOp]:
        """Apply and commit group; release the callers of its finished ops and return
        the unfinished ones."""
        started = time.monotonic()
        unfinished: list[WriteOp] = []
        try:
            self._apply_in_one_transaction(group)
            self._commit_seconds += 0.25 * (time.monotonic() - started - self._commit_seconds)
            # The writers about: this group's, and those that queued up meanwhile.
            self._expected = len(group) + self._lanes.small_waiting()
            unfinished = [op for op in group if op.unfinished and op.error is None]
        except SMQError as exc:
            self._forget_uncommitted()
            if len(group) > 1:
                log.warning("group of %d writes failed (%s); retrying one by one", len(group), exc)
                for op in group:
                    self._commit_group([op])
                return []
            group[0].result, group[0].error = None, exc
            if isinstance(exc, StorageFull):  # a client writing into a full disk: once a minute
                self._full_logged.log(logging.WARNING, "write refused: %s", exc)
            else:
                log.error("write failed: %s", exc)
        except Exception as exc:  # a bug: fail the callers rather than hang them
            log.exception("unexpected error in the writer")
            self._forget_uncommitted()
            for op in group:
                op.result, op.error = None, StorageFailure(f"unexpected writer error: {exc}")
        self._publish()
        for op in group:
            if op in unfinished:
                op.unfinished = False
            else:
                op._finish()
        return unfinished

    def _apply_in_one_transaction(self, group: list[WriteOp]) -> None:
        started = time.monotonic()
        if self._room is not None and self._room < ROOM_TRUSTED_ABOVE:
            self._room = None
        if self._topics_stale:
            self._reload_topics()
        self._first_written.clear()
        self._retained_out.clear()
        dropped_before = dict(self._dropped)
        try:
            with self.storage.write_transaction():
                self._read_clock()
                clock_saved = self._clock_unsaved
                if clock_saved:
                    self.storage.save_clock_state(self.clock.state())
                for op in group:
                    op.error = None
                    op.apply(self)
                self._enforce_retention()
                save_all = self._counters_due()
                self.storage.save_counters(
                    self.topics.values()
                    if save_all
                    else (self.topics[n] for n in self.touched if n in self.topics),
                    every_change=save_all,
                )
        except BaseException:
            self._dropped = dropped_before  # rolled back: nothing was dropped
            raise
        if save_all:
            self._counters_saved_at = time.monotonic()
        for name in self.touched:
            if name in self.topics:
                topic = self.topics[name]
                self._committed_next[topic.id] = topic.next_offset
        for topic in self.deleted:  # its row keeps its next offset now
            self._committed_next.pop(topic.id, None)
        self._report_dropped()
        self._limit_wal()
        if clock_saved:
            self._clock_unsaved = False
        self.commits += 1
        self.committed_ops += len(group)
        self.committed_messages += sum(op.messages for op in group)
        self._count_commit(started)

    def _count_commit(self, started: float) -> None:
        """The committed transaction in the metrics: what it appended per topic (exactly:
        its topics' offsets moved by that much), what retention dropped, its times. It
        happened: a bug here is logged, never reported to its writers as a failure."""
        try:
            self._count_committed(started)
        except Exception:
            log.exception("could not count a commit in the metrics")

    def _count_committed(self, started: float) -> None:
        appended = {
            name: self.topics[name].next_offset - first
            for name, first in self._first_written.items()
            if name in self.topics
        }
        self.stats.committed(appended, self._retained_out, time.monotonic() - started)
        if self.storage.options.durability == "full" and self.storage.commit_wrote:
            self.stats.sync_seconds.observe(self.storage.commit_seconds)  # (only then an fsync)
        for topic in self.deleted:
            if topic.name not in self.topics:  # (not deleted and created again)
                self.stats.forget(topic.name)

    def _forget_uncommitted(self) -> None:
        """After a rollback: the database is the truth again. Every topic is published
        anew, since what was committed before the failure must not be lost from view.
        Never raises: if the database cannot be read either, the next group reloads the
        counters first (or fails)."""
        self.deleted.clear()
        self._topics_stale = True
        try:
            self._reload_topics()
            self.touched = set(self.topics)
        except SMQError as exc:
            self.touched.clear()
            log.error("cannot reload topic counters after a failed write: %s", exc)

    def _reload_topics(self) -> None:
        """The topic counters as committed (after a rollback). A topic never goes back
        from its next offset as last committed, even if rows went missing from the
        database meanwhile: offsets are not reused."""
        self.topics = self.storage.reload_topics()
        self._topics_stale = False
        for topic in self.topics.values():
            committed = self._committed_next.get(topic.id, 0)
            if committed > topic.next_offset:
                log.error(
                    "topic %r: the database lost messages before offset %d (its next "
                    "offset as committed); new messages go on from there",
                    topic.name,
                    committed,
                )
                topic.next_offset, topic.must_save = committed, True

    def _publish(self) -> None:
        if self.touched or self.deleted:
            changed = [self.topics[n].snapshot() for n in self.touched if n in self.topics]
            changed += [t.snapshot() for t in self.deleted if t.name not in self.topics]
            self.touched.clear()
            self.deleted.clear()
            self._on_commit(changed)


def _check_caller_waits(op: WriteOp) -> None:
    """A unary write whose caller gave up (its deadline passed or it cancelled, for
    example while the write waited for room in write_queue.py) is not written: the
    caller may have sent its next write already, which must not be overtaken."""
    if isinstance(op.source, Caller) and not op.source.waits():
        raise DeadlineExceeded("the call ended before its write was queued: nothing was written")
