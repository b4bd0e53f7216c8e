"""SMQ errors to gRPC statuses, in one place: handlers wrapped by `rpc` or `streaming_rpc`
answer a raised SMQError with its status (`SMQError.code`) and text, anything else with
INTERNAL and a line in the log, never a traceback to the client. Called by the threads
that run calls.

The wrappers are also where every call is admitted: once its request is decoded, and
before the handler runs, the servicer's `admit(rpc name, request, context)` raises if
the caller may not make it (the access rules, smq/server/access.py), and counted: the
servicer's `calls` (tallies.CallStats) learns when each one begins and how it ends.
Being here, no handler can be added without them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..errors import REASON_KEY, SMQError
from .handlers import decoded, release

log = logging.getLogger(__name__)

# An SMQError's `code` -> status (on the server, `code` is always the class's name).
STATUS_OF: dict[str | grpc.StatusCode, grpc.StatusCode] = {c.name: c for c in grpc.StatusCode}


def status_name(exc: BaseException, context: grpc.ServicerContext) -> str:
    """The status `_abort` answers exc with, by name (for the metrics)."""
    if isinstance(exc, SMQError):
        return STATUS_OF[exc.code].name
    return "CANCELLED" if not context.is_active() else "INTERNAL"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Answer the call with the status for exc (never a traceback to the client)."""
    if isinstance(exc, SMQError):
        if exc.code == "INTERNAL":
            log.error("%s", exc)
        if exc.reason:
            context.set_trailing_metadata(((REASON_KEY, exc.reason),))
        context.abort(STATUS_OF[exc.code], str(exc))
    if not context.is_active():
        # The client went away, or shutdown cancelled the call: nobody to answer. End the
        # call all the same, or grpc tries to send the handler's None as the reply and
        # logs a traceback.
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    log.exception("unexpected error")  # noqa: LOG004 (called only in except blocks)
    context.abort(grpc.StatusCode.INTERNAL, "internal server error (see the server log)")


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map SMQ errors raised by a unary or client-streaming handler to statuses."""

    name = method.__name__

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        started, code = self.calls.begin(name), "OK"
        try:
            message = decoded(request)
            self.admit(name, message, context)
            return method(self, message, context)
        except Exception as exc:
            code = status_name(exc, context)
            _abort(context, exc)
        finally:
            release(request)  # the handler is done with it
            if code == "OK" and not context.is_active():  # the client left (StreamProduce)
                code = "CANCELLED"
            self.calls.end(name, code, started)

    return handler


def streaming_rpc(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """The same for server-streaming handlers (generators): a denied stream ends before
    its first reply."""
    name = method.__name__

    @functools.wraps(method)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started, code = self.calls.begin(name), "OK"
        try:
            message = decoded(request)
            release(request)  # a small request: not held for the whole stream
            self.admit(name, message, context)
            yield from method(self, message, context)
        except GeneratorExit:  # gRPC closed the stream: the client went away
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = status_name(exc, context)
            _abort(context, exc)
        finally:
            if code == "OK" and not context.is_active():  # it ended because the client left
                code = "CANCELLED"
            self.calls.end(name, code, started)

    return handler
