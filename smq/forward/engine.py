"""The forwarding engine of `smq forward`: SMQ topics in, one JetStream stream out.

    SMQ server ── Subscribe(topic, from resume point) ─► reader (one per topic)
                                                            │  bounded queue
                                                            ▼
    JetStream ◄── chained publishes, at most `window` unacknowledged ── publisher
        │ PubAck (in order)
        ▼
    acker: topic.acked = offset ──► committer: CommitOffset(consumer, topic, acked)

A *session* is one run of that pipeline over one chain (see smq.forward.jetstream). It starts
by asking both sides where each topic stands: the consumer's committed offset in SMQ
and the last offset JetStream holds (the id of the subject's last message). It resumes
after the larger of the two, so messages that JetStream stored but whose commit was
lost are not sent again, and the backlog is read from SMQ at once, whether or not new
messages arrive. Any NATS-side failure (no acknowledgement in time, a refusal, a lost
connection) ends the session; the next one starts over after a backoff. SMQ-side
failures only make a reader reopen its stream where it stopped; a topic SMQ's access
rules deny (its --acl-file) is tried every DENIED_RETRY seconds while the others go on.

The offset is committed in SMQ only after JetStream acknowledged the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from ..errors import (
    JetStreamError,
    NotFound,
    PermissionDenied,
    PublishFailed,
    SMQError,
    StreamMissing,
)
from ..retry import backoff
from .jetstream import JetStream, pattern_within, subject_matches
from .pacing import InFlight, RateLimit
from .plan import ForwardedTopic, Plan
from .source import SmqSource

log = logging.getLogger("smq.forward")

COMMIT_INTERVAL = 0.5  # seconds: acknowledged offsets are committed at least this often
STATUS_INTERVAL = 5.0  # seconds between status line updates (sd_notify STATUS=)
TOPIC_POLL = 2.0  # seconds between looks for a topic that does not exist yet
# Seconds between tries of a topic the SMQ server's access rules deny: long, since only
# an operator changes them (then SIGHUP), and short enough that forwarding resumes soon.
DENIED_RETRY = 30.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0  # seconds between sessions: doubling, with jitter
MAX_PAGE = 1000  # messages per Subscribe page
MAX_INFLIGHT_BYTES = 16 * 1024**2  # payload bytes in flight, at most (one message may exceed it)


class Forwarder:
    """Forwards `plan.topics` from `source` to `upstream` until `run`'s stop event is set.

    `on_ready(status)` is called once, when both sides answered and the stream was
    found; `on_status(status)` after each status refresh (every STATUS_INTERVAL)."""

    def __init__(
        self,
        plan: Plan,
        source: SmqSource,
        upstream: JetStream,
        *,
        on_ready: Callable[[str], None] = lambda status: None,
        on_status: Callable[[str], None] = lambda status: None,
    ) -> None:
        self.plan = plan
        self.source = source
        self.upstream = upstream
        self.topics = [ForwardedTopic(t, plan.subject(t), plan.id_prefix(t)) for t in plan.topics]
        self._on_ready = on_ready
        self._on_status = on_status
        self._ready = False
        self._rate = RateLimit(plan.rate_limit)
        self._commit_now = asyncio.Event()
        self._stop = asyncio.Event()
        self.forwarded = 0
        self.problem = "starting"  # why it is not forwarding ("" while it is)
        self._warned: set[str] = set()

    # -- the outer loop ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; then wait for the messages in flight, commit
        what JetStream acknowledged and return."""
        self._stop = stop
        reporter = asyncio.create_task(self._report())
        failures = 0
        last_error = ""
        try:
            while not stop.is_set():
                forwarded_before = self.forwarded
                try:
                    await self._session()
                except SMQError as exc:  # either side
                    self.problem = str(exc)
                    if self.forwarded > forwarded_before:
                        failures = 0
                    delay = backoff(failures, BACKOFF_FIRST, BACKOFF_MAX)
                    failures += 1
                    level = logging.DEBUG if str(exc) == last_error else logging.WARNING
                    log.log(level, "%s; starting again in %.1f s", exc, delay)
                    last_error = str(exc)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def _session(self) -> None:
        plan, upstream = self.plan, self.upstream
        if self.problem == "starting":
            self.problem = f"connecting to SMQ at {self.source.target.address}"
        await self.source.ping()
        if not upstream.connected:
            self.problem = f"connecting to NATS at {', '.join(upstream.options.servers)}"
        await upstream.connect()
        if not upstream.connected:
            await upstream.wait_connected()
        if plan.create_stream and await upstream.create_stream(
            [plan.subjects], plan.replicas, plan.duplicate_window
        ):
            log.info(
                "created JetStream stream %r for %s (replicas %d, duplicate window %g s)",
                plan.stream,
                plan.subjects,
                plan.replicas,
                plan.duplicate_window,
            )
        stream = await upstream.stream_state()
        self._check_stream(stream.subjects)
        upstream.begin_chain(stream.last_seq)
        self.problem = ""
        if not self._ready:
            await self._refresh_latest(with_committed=True)
            self._ready = True
            log.info(
                "forwarding %s from SMQ at %s to JetStream stream %r at %s as %s",
                ", ".join(plan.topics),
                self.source.target.address,
                plan.stream,
                upstream.server,
                plan.subjects[:-2] + ".<topic>",
            )
            self._on_ready(self.status_line())

        queue: asyncio.Queue[tuple[ForwardedTopic, int, bytes]] = asyncio.Queue(maxsize=plan.window)
        inflight: asyncio.Queue[tuple[ForwardedTopic, int, asyncio.Future, float, int] | None] = (
            asyncio.Queue()
        )
        slots = InFlight(plan.window, MAX_INFLIGHT_BYTES)
        readers = [asyncio.create_task(self._read(topic, queue)) for topic in self.topics]
        publisher = asyncio.create_task(self._publish(queue, inflight, slots))
        acker = asyncio.create_task(self._acknowledge(inflight, slots))
        committer = asyncio.create_task(self._commit_loop())
        stopping = asyncio.create_task(self._stop.wait())
        working = [*readers, publisher, acker, committer]
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait([*working, stopping], return_when=asyncio.FIRST_COMPLETED)
            failure = next(
                (
                    task.exception()
                    for task in done
                    if task is not stopping and task.exception() is not None
                ),
                None,
            )
            await _cancel(*readers, publisher)
            if failure is None:  # stopping: let what is in flight be acknowledged
                inflight.put_nowait(None)
                try:
                    await acker
                except (JetStreamError, asyncio.CancelledError) as exc:
                    log.warning("stopping: %s", exc)
        finally:
            await _cancel(*working, stopping)
            await self._commit_acked(final=True)
        if failure is not None:
            raise failure

    def _check_stream(self, patterns: Sequence[str]) -> None:
        for topic in self.topics:
            if not any(subject_matches(p, topic.subject) for p in patterns):
                self.upstream.errors.add("stream")
                raise StreamMissing(
                    f"JetStream stream {self.plan.stream!r} does not take subject "
                    f"{topic.subject!r} (its subjects: {', '.join(patterns)})"
                )
        shared = [p for p in patterns if not pattern_within(p, self.plan.subjects)]
        if shared:
            self._warn_once(
                "shared",
                "stream %r also takes %s: other publishers there break "
                "this forwarder's chain, and it then has to start again; give each "
                "node a stream of its own (subjects %s)",
                self.plan.stream,
                ", ".join(shared),
                self.plan.subjects,
            )

    # -- per topic: where to start, and reading -------------------------------------------

    async def _read(
        self, topic: ForwardedTopic, queue: asyncio.Queue[tuple[ForwardedTopic, int, bytes]]
    ) -> None:
        cursor, contiguous = await self._resume_point(topic)
        topic.state = "forwarding"
        failures = 0
        while True:
            try:
                async for page in self.source.pages(
                    topic.name, cursor, min(self.plan.window, MAX_PAGE)
                ):
                    failures = 0
                    if topic.state != "forwarding":
                        log.info("reading %r again from offset %d", topic.name, cursor)
                        topic.state = "forwarding"
                    for offset, payload in page:
                        if offset < cursor:
                            continue
                        if offset > cursor and contiguous:
                            log.warning(
                                "offsets %d to %d of %r were deleted from SMQ before they "
                                "were forwarded (set keep_uncommitted on the topic to "
                                "prevent this)",
                                cursor,
                                offset - 1,
                                topic.name,
                            )
                        contiguous = True
                        topic.latest = max(topic.latest, offset)
                        await queue.put((topic, offset, payload))
                        cursor = offset + 1
            except PermissionDenied as exc:
                await self._denied(topic, exc)
            except SMQError as exc:
                if isinstance(exc, NotFound):
                    raise  # the topic was deleted: the next session waits for it
                delay = backoff(failures, BACKOFF_FIRST, BACKOFF_MAX)
                failures += 1
                if topic.state == "forwarding":
                    log.warning("%s; reading again from offset %d", exc, cursor)
                topic.state = f"SMQ unavailable: {exc}"
                await asyncio.sleep(delay)

    async def _denied(self, topic: ForwardedTopic, exc: PermissionDenied) -> None:
        """Wait DENIED_RETRY before the next try; said once per different denial."""
        state = f"access denied: {exc}"
        if topic.state != state:
            log.warning(
                "%s; not forwarding %r, trying again every %g s", exc, topic.name, DENIED_RETRY
            )
        topic.state = state
        await asyncio.sleep(DENIED_RETRY)

    async def _resume_point(self, topic: ForwardedTopic) -> tuple[int, bool]:
        """The first offset to send, and whether offsets before it were accounted for.
        Waits while the topic does not exist or SMQ does not answer."""
        failures = 0
        while True:
            try:
                offsets = await self.source.offsets(topic.name)
                if offsets is None:
                    topic.state = "waiting for the topic to be created"
                    self._warn_once(
                        f"missing {topic.name}",
                        "topic %r does not exist in SMQ yet; waiting for it",
                        topic.name,
                    )
                    await asyncio.sleep(TOPIC_POLL)
                    continue
                committed = await self.source.committed(topic.name)
                break
            except PermissionDenied as exc:
                await self._denied(topic, exc)
            except SMQError as exc:
                topic.state = f"SMQ unavailable: {exc}"
                await asyncio.sleep(backoff(failures, BACKOFF_FIRST, BACKOFF_MAX))
                failures += 1
        topic.earliest, topic.latest = offsets.earliest, offsets.latest
        last_id = await self.upstream.last_msg_id(topic.subject)
        stored = topic.offset_of(last_id)
        if last_id and stored is None:
            self._warn_once(
                f"foreign {topic.name}",
                "the last message on %r has id %r, not "
                "one of this forwarder's: resuming from the committed offset",
                topic.subject,
                last_id,
            )
        if stored is not None and stored >= offsets.next_offset:
            log.error(
                "JetStream holds offset %d of %r but SMQ's next offset is %d: was the SMQ "
                "database replaced, or does another node use the name %r? Offsets up to "
                "%d are not forwarded again",
                stored,
                topic.name,
                offsets.next_offset,
                self.plan.node,
                stored,
            )
        elif stored is not None and stored > (committed or 0):
            # Stored upstream, but the commit did not happen (a crash, a lost connection).
            log.info(
                "JetStream already holds %r up to offset %d (committed: %s): committing it, "
                "not sending it again",
                topic.name,
                stored,
                committed if committed is not None else "none",
            )
            await self._commit(topic, stored)
            committed = stored
        topic.committed = committed
        if stored is not None and topic.sent > topic.acked:
            # Published by this run's last session, stored, but acknowledged too late
            # for it (it had ended): forwarded all the same.
            late = max(min(stored, topic.sent) - topic.acked, 0)
            topic.forwarded += late
            self.forwarded += late
        if committed is None and stored is None:
            if self.plan.start_from == "latest":
                if offsets.latest:
                    await self._commit(topic, offsets.latest)
                return offsets.next_offset, False
            return 1, False
        topic.acked = max(committed or 0, stored or 0)
        return topic.acked + 1, True

    # -- publishing, acknowledging, committing ------------------------------------------------

    async def _publish(
        self,
        queue: asyncio.Queue[tuple[ForwardedTopic, int, bytes]],
        inflight: asyncio.Queue,
        slots: InFlight,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            topic, offset, payload = await queue.get()
            await slots.acquire(len(payload))
            await self._rate.acquire()
            future = await self.upstream.publish(
                topic.subject, payload, topic.id_prefix + str(offset)
            )
            topic.sent = offset
            inflight.put_nowait(
                (topic, offset, future, loop.time() + self.plan.ack_timeout, len(payload))
            )

    async def _acknowledge(self, inflight: asyncio.Queue, slots: InFlight) -> None:
        """Waits for each acknowledgement, in publishing order."""
        while True:
            item = await inflight.get()
            if item is None:
                return
            topic, offset, future, deadline, size = item
            try:
                async with asyncio.timeout_at(deadline):
                    await future
            except TimeoutError:
                self.upstream.forget(future)
                raise PublishFailed(
                    f"no acknowledgement from JetStream for "
                    f"{topic.id_prefix}{offset} within {self.plan.ack_timeout:g} s"
                ) from None
            except PublishFailed as exc:
                raise PublishFailed(f"{topic.id_prefix}{offset}: {exc}", exc.err_code) from None
            finally:
                slots.release(size)
            topic.acked = offset
            topic.forwarded += 1
            self.forwarded += 1
            if offset - (topic.committed or 0) >= self.plan.window:
                self._commit_now.set()

    async def _commit_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COMMIT_INTERVAL):
                    await self._commit_now.wait()
            self._commit_now.clear()
            await self._commit_acked()

    async def _commit_acked(self, final: bool = False) -> None:
        """Commit every topic's acknowledged offset that SMQ does not have yet. A failure
        is logged: the offsets stay in memory and go with the next commit."""
        for topic in self.topics:
            if topic.acked > (topic.committed or 0):
                try:
                    await self._commit(topic, topic.acked)
                except SMQError as exc:
                    level = logging.WARNING if final else logging.DEBUG
                    log.log(level, "%s (committing again later)", exc)
                    if final:
                        return

    async def _commit(self, topic: ForwardedTopic, offset: int) -> None:
        await self.source.commit(topic.name, offset)
        topic.committed = offset

    # -- status -----------------------------------------------------------------------

    def status_line(self) -> str:
        topics = ", ".join(f"{t.name} {t.backlog}" for t in self.topics)
        total = sum(t.backlog for t in self.topics)
        head = (
            f"forwarding to {self.plan.stream} at {self.upstream.server}"
            if not self.problem
            else f"not forwarding: {self.problem}"
        )
        waiting = [t.name for t in self.topics if t.state.startswith("waiting")]
        denied = [t.name for t in self.topics if t.state.startswith("access denied")]
        tail = f"; waiting for topic {', '.join(waiting)}" if waiting else ""
        tail += f"; access denied to topic {', '.join(denied)}" if denied else ""
        return f"{head}; backlog {total} ({topics}); forwarded {self.forwarded}{tail}"

    def health_problem(self) -> str | None:
        """None while forwarding works: a session runs, NATS is connected and SMQ serves
        every topic that exists; else why not, in one line (/healthz). Only reads: the
        metrics thread calls it."""
        if self._stop.is_set():
            return "shutting down"
        if self.problem:
            return " ".join(f"not forwarding: {self.problem}".split())
        if not self.upstream.connected:
            return "not connected to NATS (reconnecting)"
        for topic in self.topics:
            if topic.state.startswith(("SMQ unavailable", "access denied")):
                return " ".join(f"topic {topic.name!r}: {topic.state}".split())
        return None

    async def _report(self) -> None:
        loop = asyncio.get_running_loop()
        next_log = loop.time() + self.plan.log_interval
        interval = min(STATUS_INTERVAL, self.plan.log_interval)
        while True:
            await asyncio.sleep(interval)
            await self._refresh_latest()
            line = self.status_line()
            self._on_status(line)
            if loop.time() >= next_log:
                log.info("%s", line)
                next_log = loop.time() + self.plan.log_interval

    async def _refresh_latest(self, with_committed: bool = False) -> None:
        for topic in self.topics:
            try:
                offsets = await self.source.offsets(topic.name)
                # Also before the first session (NATS away since the start): the backlog
                # counts from the committed offset, not from the earliest one.
                if offsets is not None and (with_committed or topic.committed is None):
                    committed = await self.source.committed(topic.name)
                    if with_committed or topic.committed is None:  # no commit meanwhile
                        topic.committed = committed
            except PermissionDenied:
                continue  # this topic only (its reader says why)
            except SMQError:
                return  # SMQ is away: keep what we know
            if offsets is not None:
                topic.earliest, topic.latest = offsets.earliest, offsets.latest

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


async def _cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
