"""How requests and replies cross into gRPC: the method handlers SMQ registers.

Requests: each method's deserializer never raises: a request that is not valid
protobuf becomes an UndecodableRequest, answered INVALID_ARGUMENT instead of gRPC's
INTERNAL.

Replies: a handler may return bytes it encoded itself (smq/encoding.py), or yield them
wrapped in Encoded; the serializer passes them through, so that gRPC holds no second
Python copy of a page.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ._proto import smq_pb2
from .errors import InvalidArgument


class UndecodableRequest:
    """Stands in for a request that is not valid protobuf (e.g. a topic that is not
    UTF-8), so that it is answered INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


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
    """The request message; raises InvalidArgument for one that could not be decoded."""
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument(f"malformed request: {request.error}")
    return request


def deserializer(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_at_once(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return UndecodableRequest(exc)
    return parse_at_once


def serializer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def pass_bytes_through(reply: Any) -> bytes:
        if isinstance(reply, bytes):
            return reply
        if isinstance(reply, Encoded):
            return reply.take()
        return serialize(reply)
    return pass_bytes_through


def lenient_handler(servicer: Any, service_name: str = "SuhaibMessageQueue") -> grpc.GenericRpcHandler:
    """The service's method handlers, as the generated add_*_to_server builds them, but
    with the deserializers and serializers above."""
    service = smq_pb2.DESCRIPTOR.services_by_name[service_name]
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {}
    for method in service.methods:
        make = kinds[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserializer(getattr(smq_pb2, method.input_type.name).FromString),
            response_serializer=serializer(getattr(smq_pb2, method.output_type.name).SerializeToString))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
