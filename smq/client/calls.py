"""The plumbing under every Client call: the channel's lifecycle, deadlines, retries of
idempotent calls while the server is UNAVAILABLE, list pages, streams that cancel when
left, and the translation of gRPC errors into `smq.errors` classes (with a probe of the
server's address when no connection could be made: smq.client.probe).

Used from any thread: the stub is grpc's, which is thread-safe; `close()` may race a
call, which then fails as on a closed channel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import grpc

from .._proto import smq_pb2_grpc
from ..errors import SMQError
from ..retry import backoff
from .probe import Diagnosis, diagnose
from .rpcs import Listing, Rpc
from .transport import Op, connect_failed, error_for, refused_stream
from .types import DEFAULT_LIST_PAGE_SIZE, ClientTLSConfig, Timeout, _UseClientDefault

log = logging.getLogger("smq.client")

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # seconds; doubled per attempt, with jitter
R = TypeVar("R")


def budget_of(timeout: Timeout, default: float | None) -> float | None:
    """A call's `timeout=` in seconds: the client's `default` unless the call gave one."""
    return default if isinstance(timeout, _UseClientDefault) else timeout


def deadline_of(budget: float | None) -> float | None:
    return None if budget is None else time.monotonic() + budget


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def retry_delay(
    code: grpc.StatusCode, idempotent: bool, attempt: int, retries: int, until: float | None
) -> float | None:
    """Seconds to wait before attempt `attempt + 1` of a call that failed with `code`;
    None if it must not be retried: only idempotent calls, only while the server is
    UNAVAILABLE, at most `retries` times, and only if the wait ends before `until` (the
    deadline, or sooner)."""
    if not idempotent or code != grpc.StatusCode.UNAVAILABLE or attempt >= retries:
        return None
    delay = backoff(attempt, BACKOFF_FIRST, BACKOFF_MAX)
    if until is not None and time.monotonic() + delay >= until:
        return None
    return delay


PROBE_TIMEOUT = 2.0  # seconds at most for the probe of an address that cannot be reached


class Calls:
    """A channel to one server and the way calls go over it (Client's base)."""

    timeout: float | None
    retries: int
    tls: bool
    target: str
    _tls_config: ClientTLSConfig | None  # what the probe connects with
    _server_hostname: str | None
    _channel: grpc.Channel | None
    _stub: smq_pb2_grpc.SuhaibMessageQueueStub

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._channel is None else ("mTLS" if self.tls else "plaintext")
        return f"<Client {self.target} ({state})>"

    def close(self) -> None:
        """Close the connection; running iterators end. Safe to call more than once."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    @property
    def closed(self) -> bool:
        return self._channel is None

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stream(self, method: str, request: Any) -> Iterator[Any]:
        """A server-streaming call, cancelled when the block ends (frees the server's slot)."""
        call = getattr(self._stub_or_raise(), method)(request)
        try:
            yield call
        finally:
            call.cancel()

    def _stub_or_raise(self) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        if self._channel is None:
            raise RuntimeError("this Client is closed; create a new one")
        return self._stub

    def _run(self, rpc: Rpc[R], timeout: Timeout) -> R:
        """One unary call of `smq.client.rpcs`, its answer read."""
        return rpc.read(self._call(rpc.method, rpc.request, timeout, rpc.op, rpc.idempotent))

    def _list(self, listing: Listing[R], timeout: Timeout) -> list[R]:
        """Every entry of a paged list call, first page to last: each page's token asks
        for the next one. A server from before paging ignores the page fields and answers
        the whole list, with no token: one page. `timeout` applies per page."""
        request = listing.request
        request.page_size = DEFAULT_LIST_PAGE_SIZE
        entries: list[R] = []
        while True:
            response = self._call(listing.method, request, timeout, listing.op, idempotent=True)
            entries.extend(listing.items(response))
            if not response.next_page_token:
                return entries
            request.page_token = response.next_page_token

    def _timeout_of(self, timeout: Timeout) -> float | None:
        return budget_of(timeout, self.timeout)

    def _call(
        self,
        method: str,
        request: Any,
        timeout: Timeout,
        op: Op,
        idempotent: bool = False,
        retry_for: float | None = None,
    ) -> Any:
        """One unary (or client-streaming) call: deadline, retries, error translation.

        An idempotent call is retried while the server is UNAVAILABLE, within the timeout
        (and `retry_for` seconds, if given), unless a probe finds a lasting cause (a
        certificate refused: trying again cannot help)."""
        call = getattr(self._stub_or_raise(), method)
        budget = self._timeout_of(timeout)
        deadline = deadline_of(budget)
        give_up = (
            deadline
            if retry_for is None
            else min(deadline or math.inf, time.monotonic() + retry_for)
        )
        attempt = 0
        while True:
            try:
                return call(request, timeout=remaining(deadline))
            except grpc.RpcError as exc:
                diagnosis = self._diagnose(exc, deadline)
                if diagnosis is not None and diagnosis.lasting:
                    raise self._translated(exc, op, budget, diagnosis) from exc
                # A refused stream was never processed: any call may go again (not a
                # client-streaming one, whose iterator has been read).
                refused = refused_stream(exc) and not isinstance(request, Iterator)
                delay = retry_delay(
                    exc.code(), idempotent or refused, attempt, self.retries, give_up
                )
                if delay is None or self.closed:
                    raise self._translated(exc, op, budget, diagnosis) from exc
                attempt += 1
                log.debug("%s: unavailable, retry %d in %.2f s", op.action, attempt, delay)
                time.sleep(delay)

    def _diagnose(self, exc: grpc.RpcError, deadline: float | None = None) -> Diagnosis | None:
        """Why no connection could be made, if that is how `exc` failed (probe.py)."""
        if self.closed or not connect_failed(exc) or self.target.startswith("("):  # a channel given
            return None
        seconds = PROBE_TIMEOUT
        if deadline is not None:
            seconds = min(seconds, max(deadline - time.monotonic(), 0.5))
        return diagnose(
            self.target, self._tls_config, server_hostname=self._server_hostname, timeout=seconds
        )

    def _error(self, exc: grpc.RpcError, op: Op, timeout: float | None) -> SMQError:
        """The error to raise for `exc` (after a probe if no connection could be made)."""
        return self._translated(exc, op, timeout, self._diagnose(exc))

    def _translated(
        self, exc: grpc.RpcError, op: Op, timeout: float | None, diagnosis: Diagnosis | None
    ) -> SMQError:
        return error_for(
            exc, op, target=self.target, tls=self.tls, timeout=timeout, diagnosis=diagnosis
        )
