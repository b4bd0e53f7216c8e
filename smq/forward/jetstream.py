"""NATS JetStream, the upstream of `smq forward`. The only module that imports nats-py.

Publishing is a *chain*: every message names the one before it, so that JetStream
stores a message only directly after its predecessor, and a lost or refused message
stops the rest of the window instead of leaving a hole that a retry would fill out of
order (a stream leader that changes mid-window drops some messages and stores later
ones). A chain starts with an anchor on the stream's last sequence
(`Nats-Expected-Last-Sequence`), then each message expects the previous one's id
(`Nats-Expected-Last-Msg-Id`). Every message also carries its own `Nats-Msg-Id`, so
that a message that is sent again within the stream's duplicate window is stored once.

What the stream holds of this forwarder is therefore, per subject, a gap-free run of
offsets; `last_msg_id(subject)` reads where it ends (the id of the subject's last
message), which is where forwarding resumes.

Failures raise smq.errors' JetStreamError: NotConnected, StreamMissing, PublishFailed;
each one is also counted in `JetStream.errors` by kind (tallies.UPSTREAM_ERRORS), as
is each loss of an established connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any

from ..errors import JetStreamError, MissingDependency, NotConnected, PublishFailed, StreamMissing
from .tallies import UPSTREAM_ERRORS, Tally

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install nats-py (a dependency of smq; the PEX carries it)"
CONNECT_TIMEOUT = 5.0  # seconds per server for a connection attempt
API_TIMEOUT = 5.0  # seconds for a JetStream API request (stream info, get message)
RECONNECT_WAIT = 1.0  # seconds between reconnect attempts to the same server
PENDING_BYTES = 8 * 1024**2  # what nats-py may buffer while it reconnects
ERR_STREAM_NOT_FOUND = 10059
ERR_NO_MESSAGE = 10037


def import_nats() -> Any:
    """The nats package, or MissingDependency with a one-line hint."""
    try:
        import nats
        import nats.js.api  # the stream config classes
    except ImportError as exc:
        raise MissingDependency(
            f"forwarding to NATS needs nats-py, which is not installed: {INSTALL_HINT}"
        ) from exc
    return nats


@dataclasses.dataclass(frozen=True)
class NatsOptions:
    """How to reach NATS: servers and credentials. Empty strings mean "not used"."""

    servers: tuple[str, ...]
    creds: str = ""  # a .creds file (JWT and NKey seed; needs the nkeys package)
    user: str = ""
    password: str = ""
    token: str = ""
    ca: str = ""  # CA to verify the servers with (else the system's)
    cert: str = ""  # client certificate and key, for servers that verify clients
    key: str = ""
    name: str = "smq-forward"

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert) or any(s.startswith("tls://") for s in self.servers)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            context.load_cert_chain(self.cert, self.key or None)
        return context


@dataclasses.dataclass(frozen=True)
class PubAck:
    seq: int
    duplicate: bool


@dataclasses.dataclass(frozen=True)
class StreamState:
    subjects: tuple[str, ...]
    last_seq: int


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(want) == len(have)


def pattern_within(pattern: str, namespace: str) -> bool:
    """Whether every subject `pattern` matches lies under `namespace` (`a.b.>`)."""
    base = namespace[:-2]  # without ".>"
    return pattern.startswith(base + ".") and not any(
        token in ("*", ">") for token in base.split(".")
    )


class JetStream:
    """One NATS connection, publishing to one stream. Not thread-safe: use it from
    the event loop that called `connect()`."""

    def __init__(self, options: NatsOptions, stream: str) -> None:
        self.options = options
        self.stream = stream
        self._nats = import_nats()
        self._nc: Any = None
        self._inbox = ""
        self._tokens = itertools.count(1)
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._expect_seq: int | None = None
        self._last_id: str | None = None
        self._closing = False
        self._last_error: str | None = None
        self.errors = Tally(UPSTREAM_ERRORS)

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the first server that answers; nats-py reconnects by itself after
        that, forever. Raises JetStreamError (one line) if no server answers now."""
        if self._nc is not None:
            return
        options = self.options
        kwargs: dict[str, Any] = dict(
            servers=list(options.servers),
            name=options.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            connect_timeout=CONNECT_TIMEOUT,
            ping_interval=10,
            max_outstanding_pings=2,
            pending_size=PENDING_BYTES,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        if options.tls:
            kwargs["tls"] = options.tls_context()
        if options.creds:
            kwargs["user_credentials"] = options.creds
        if options.user:
            kwargs.update(user=options.user, password=options.password)
        if options.token:
            kwargs["token"] = options.token
        # With unlimited reconnects nats-py also retries the first connection forever:
        # bound it, and tell why it failed (its error callback saw each attempt fail).
        nc = self._nats.NATS()
        self._last_error = None
        budget = (CONNECT_TIMEOUT + RECONNECT_WAIT) * len(options.servers) + 1
        try:
            await asyncio.wait_for(nc.connect(**kwargs), budget)
        except Exception as exc:  # nats-py raises many kinds; all mean "not now"
            with contextlib.suppress(Exception):
                await nc.close()
            reason = (
                self._last_error
                if isinstance(exc, TimeoutError) and self._last_error
                else describe(exc)
            )
            self.errors.add("connect")
            raise NotConnected(
                f"cannot connect to NATS at {', '.join(options.servers)}: {reason}"
            ) from exc
        self._inbox = nc.new_inbox()
        await nc.subscribe(self._inbox + ".*", cb=self._on_reply)
        self._nc = nc
        log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def wait_connected(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` for nats-py to be connected again (after `connect()`, it
        reconnects by itself); NotConnected if it is not."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await asyncio.sleep(0.05)
        if not self.connected:
            self.errors.add("connect")
            raise NotConnected("waiting for the connection to NATS to come back")

    @property
    def server(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return url.netloc if url is not None else "-"

    async def close(self) -> None:
        self._closing = True
        nc, self._nc = self._nc, None
        self._fail_pending(NotConnected("the NATS connection was closed"))
        if nc is not None:
            try:
                await nc.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing the NATS connection: %s", describe(exc))

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = describe(exc)
        log.debug("NATS: %s", self._last_error)

    async def _on_disconnected(self) -> None:
        if self._closing or self._nc is None:  # closing, or a first connection that failed
            return
        self.errors.add("disconnect")
        log.warning("disconnected from NATS; reconnecting")
        self._fail_pending(NotConnected("disconnected from NATS before the acknowledgement"))

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS at %s", self.server)

    def _require(self) -> Any:
        if self._nc is None or not self._nc.is_connected:
            raise NotConnected("not connected to NATS")
        return self._nc

    # -- the stream ---------------------------------------------------------------------

    async def stream_state(self) -> StreamState:
        """The stream's subjects and last sequence. Raises StreamMissing."""
        js = self._require().jetstream(timeout=API_TIMEOUT)
        try:
            info = await js.stream_info(self.stream)
        except Exception as exc:
            self.errors.add("stream")
            if getattr(exc, "err_code", None) == ERR_STREAM_NOT_FOUND:
                raise StreamMissing(
                    f"JetStream stream {self.stream!r} does not exist "
                    "(create it, or pass --create-stream)"
                ) from exc
            raise JetStreamError(f"cannot read stream {self.stream!r}: {describe(exc)}") from exc
        config = info.config
        return StreamState(tuple(config.subjects or ()), info.state.last_seq)

    async def create_stream(
        self, subjects: Sequence[str], replicas: int, duplicate_window: float
    ) -> bool:
        """Create the stream (file storage); True if created, False if it existed."""
        api = self._nats.js.api
        js = self._require().jetstream(timeout=API_TIMEOUT)
        config = api.StreamConfig(
            name=self.stream,
            subjects=list(subjects),
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=duplicate_window,
        )
        try:
            await js.stream_info(self.stream)
            return False
        except Exception as exc:
            if getattr(exc, "err_code", None) != ERR_STREAM_NOT_FOUND:
                self.errors.add("stream")
                raise JetStreamError(
                    f"cannot read stream {self.stream!r}: {describe(exc)}"
                ) from exc
        try:
            await js.add_stream(config)
        except Exception as exc:
            self.errors.add("stream")
            raise JetStreamError(f"cannot create stream {self.stream!r}: {describe(exc)}") from exc
        return True

    async def last_msg_id(self, subject: str) -> str | None:
        """The Nats-Msg-Id of the subject's last message in the stream (None: no message,
        or one without an id)."""
        js = self._require().jetstream(timeout=API_TIMEOUT)
        try:
            message = await js.get_last_msg(self.stream, subject)
        except Exception as exc:
            if getattr(exc, "err_code", None) == ERR_NO_MESSAGE:
                return None
            self.errors.add("stream")
            raise JetStreamError(
                f"cannot read the last message of {subject!r}: {describe(exc)}"
            ) from exc
        return (message.headers or {}).get("Nats-Msg-Id")

    # -- publishing ---------------------------------------------------------------------

    def begin_chain(self, last_seq: int) -> None:
        """Start a new chain: the next message is stored only if the stream's last
        sequence is still `last_seq`; each one after it only right after its predecessor."""
        self._fail_pending(PublishFailed("a new chain started before the acknowledgement"))
        self._expect_seq = last_seq
        self._last_id = None

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[PubAck]:
        """Send one message of the chain; the future gives its PubAck, or PublishFailed /
        NotConnected. Messages go out in call order."""
        nc = self._require()
        headers = {"Nats-Msg-Id": msg_id, "Nats-Expected-Stream": self.stream}
        if self._last_id is not None:
            headers["Nats-Expected-Last-Msg-Id"] = self._last_id
        elif self._expect_seq is not None:
            headers["Nats-Expected-Last-Sequence"] = str(self._expect_seq)
        else:
            raise RuntimeError("begin_chain() first")
        size = len(payload) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
        if size > nc.max_payload:
            self.errors.add("publish")
            raise PublishFailed(
                f"{msg_id} is {len(payload)} bytes, more than the NATS server "
                f"takes (max_payload {nc.max_payload}): raise max_payload on the "
                "NATS servers; this topic cannot go on until then"
            )
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await nc.publish(subject, payload, reply=f"{self._inbox}.{token}", headers=headers)
        except Exception as exc:
            self._pending.pop(token, None)
            self._last_id = None
            self._expect_seq = None  # the chain is broken: the caller must begin anew
            raise NotConnected(f"cannot publish to NATS: {describe(exc)}") from exc
        self._last_id = msg_id
        return future

    def forget(self, future: asyncio.Future[PubAck]) -> None:
        """Stop waiting for `future`: its acknowledgement timed out (counted so)."""
        self.errors.add("ack_timeout")
        for token, pending in list(self._pending.items()):
            if pending is future:
                del self._pending[token]

    async def _on_reply(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.pop(token, None)
        if future is None or future.done():
            return
        status = (msg.headers or {}).get("Status")
        try:
            future.set_result(_acknowledgement(status, msg.data, self.stream))
        except PublishFailed as exc:
            self.errors.add("publish")
            _fail(future, exc)

    def _fail_pending(self, error: JetStreamError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                _fail(future, error)


def _acknowledgement(status: str | None, data: bytes, stream: str) -> PubAck:
    """The PubAck in JetStream's answer to a publish; PublishFailed if it is none."""
    if status == "503":
        raise PublishFailed(f"no stream answered (no JetStream leader for {stream!r} right now?)")
    try:
        reply = json.loads(data)
    except ValueError:
        raise PublishFailed(f"unreadable acknowledgement {data[:80]!r}") from None
    error = reply.get("error")
    if error:
        raise PublishFailed(
            f"JetStream refused the message: {error.get('description', error)}",
            error.get("err_code"),
        )
    seq = int(reply.get("seq") or 0)
    duplicate = bool(reply.get("duplicate"))
    if duplicate and seq == 0:
        # A NATS 2.9 cluster answers so for an id it has only staged: not a proof.
        raise PublishFailed("JetStream reported a duplicate it has not stored yet")
    return PubAck(seq, duplicate)


def _fail(future: asyncio.Future, error: JetStreamError) -> None:
    """Fail `future`; nobody may wait for it any more (its session ended), and that
    is no error to report."""
    future.set_exception(error)
    future.exception()  # marks it retrieved; awaiting it still raises


def describe(exc: BaseException) -> str:
    """One line for an exception from nats-py (many of its messages are empty)."""
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[len("nats: ") :]
    name = type(exc).__name__
    text = re.sub(r"\s+", " ", text)
    return f"{name}: {text}" if text and name not in text else (text or name)
