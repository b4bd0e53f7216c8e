"""How requests and replies cross into gRPC: the method handlers SMQ registers.

Requests: each method's deserializer never raises (a request that is not valid protobuf
becomes an UndecodableRequest, answered INVALID_ARGUMENT instead of gRPC's INTERNAL),
and charges the memory budget before it parses, when only the raw length is known: a
request that does not fit becomes a RefusedRequest, answered RESOURCE_EXHAUSTED, and
the bytes are dropped at once. Deserializers run on gRPC's polling thread, which serves
every call: they never wait.

Replies: a handler may return bytes it encoded itself (smq/server/encoding.py), or yield them
wrapped in Encoded; the serializer passes them through, so that gRPC holds no second
Python copy of a page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .._proto import smq_pb2
from ..errors import InvalidArgument, Overloaded
from .budget import REQUEST_COPIES, Charge, MemoryBudget
from .pool import RECEIVES_REQUEST, request_arrived


class UndecodableRequest:
    """Stands in for a request that is not valid protobuf (e.g. a topic that is not
    UTF-8), so that it is answered INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class RefusedRequest:
    """Stands in for a request that did not fit the memory budget when it arrived."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ChargedRequest:
    """A request's bytes with the budget charged for them, parsed by `message()` in the
    handler's thread rather than by the deserializer on gRPC's polling thread, which
    serves every call (parsing 4 MB requests there delayed everyone's calls). The charge
    is released by `release(request)` once the handler is done with it, or when gRPC
    drops the request unread."""

    __slots__ = ("_data", "_parse", "charge")

    def __init__(self, data: bytes, parse: Callable[[bytes], Any], charge: Charge) -> None:
        self._data: bytes | None = data
        self._parse = parse
        self.charge = charge

    def message(self) -> Any:
        """The parsed request (once: the bytes go); raises InvalidArgument if malformed."""
        data, self._data = self._data, None
        try:
            return self._parse(data or b"")
        except DecodeError as exc:
            raise InvalidArgument(f"malformed request: {exc}") from None


class Encoded:
    """A stream's reply, already encoded, handed to gRPC once: the serializer takes the
    bytes out. gRPC's loop keeps the last reply while it asks the handler for the next
    one (which may wait long for new messages); it keeps this empty shell, not the page."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data

    def take(self) -> bytes:
        data, self.data = self.data, None
        return data if data is not None else b""


def decoded(request: Any) -> Any:
    """The request message; raises for one that could not be decoded or was refused."""
    if isinstance(request, ChargedRequest):
        return request.message()
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument(f"malformed request: {request.error}")
    if isinstance(request, RefusedRequest):
        raise Overloaded(request.reason)
    return request


def release(request: Any) -> None:
    """Release the budget charged for a request (nothing for one that was not charged)."""
    if isinstance(request, ChargedRequest):
        request.charge.release()


def charge(request: Any) -> Charge | None:
    """The charge of a request, to hand on (a StreamProduce message's, until committed)."""
    return request.charge if isinstance(request, ChargedRequest) else None


def deserializer(
    parse: Callable[[bytes], Any], budget: MemoryBudget | None
) -> Callable[[bytes], Any]:
    """Runs on gRPC's polling thread: with a budget, charges and leaves the parsing to
    the handler's thread; without, parses at once."""

    def parse_at_once(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return UndecodableRequest(exc)

    if budget is None:
        return parse_at_once

    def charge_and_keep(data: bytes) -> Any:
        taken = budget.take_request(len(data))
        if taken is None:
            return RefusedRequest(budget.refusal(REQUEST_COPIES * len(data)))
        return ChargedRequest(data, parse, taken)

    return charge_and_keep


def serializer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def pass_bytes_through(reply: Any) -> bytes:
        if isinstance(reply, bytes):
            return reply
        if isinstance(reply, Encoded):
            return reply.take()
        return serialize(reply)

    return pass_bytes_through


def receiving(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A handler of a method with one request, which gRPC receives in the pool's thread
    before it runs the handler: marked for the pool, which bounds such receives, and
    telling it when the request is in."""

    def handle(request: Any, context: Any) -> Any:
        request_arrived()
        return behavior(request, context)

    setattr(handle, RECEIVES_REQUEST, True)
    return handle


def lenient_handler(
    servicer: Any, service_name: str = "SuhaibMessageQueue", budget: MemoryBudget | None = None
) -> grpc.GenericRpcHandler:
    """The service's method handlers, as the generated add_*_to_server builds them, but
    with the deserializers and serializers above (requests charged to `budget`, if any)."""
    service = smq_pb2.DESCRIPTOR.services_by_name[service_name]
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        make = kinds[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name)
        handlers[method.name] = make(
            behavior if method.client_streaming else receiving(behavior),
            request_deserializer=deserializer(
                getattr(smq_pb2, method.input_type.name).FromString, budget
            ),
            response_serializer=serializer(
                getattr(smq_pb2, method.output_type.name).SerializeToString
            ),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
