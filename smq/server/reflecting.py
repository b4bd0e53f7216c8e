"""gRPC reflection served like SMQ's own methods: its streams take a --max-streams
place, its calls are counted, and a request too large to be a real one is refused
before it is parsed. Called by the threads that run calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..errors import InvalidArgument
from .service import QueueService
from .status import streaming_rpc
from .tallies import NO_CALL_STATS, CallStats, NoCallStats

MAX_REFLECTION_REQUEST = 64 * 1024  # a symbol or file name; real ones are far smaller
TOO_LARGE = object()  # stands in for a reflection request over MAX_REFLECTION_REQUEST


class Reflection(reflection.ReflectionServicer):
    """gRPC reflection whose streams take a --max-streams place like SMQ's own: an idle
    one holds a thread, and the unary calls' threads must stay theirs. Counted in
    `calls` like SMQ's methods."""

    def __init__(
        self,
        files: tuple[Any, ...],
        service_names: tuple[str, ...],
        service: QueueService,
        calls: CallStats | NoCallStats = NO_CALL_STATS,
    ) -> None:
        super().__init__(service_names, pool=_pool_of(files))
        self.service = service
        self.calls = calls

    @staticmethod
    def admit(rpc: str, request: Any, context: grpc.ServicerContext) -> None:
        """Reflection describes the schema, no topic: an accepted certificate is enough."""

    @staticmethod
    def request(data: bytes) -> Any:
        """The request, or TOO_LARGE for one too large to be a real one (a symbol or file
        name): refused unparsed, since parsing (and the error that echoes its name)
        made copies of megabytes that the memory budget does not see."""
        if len(data) > MAX_REFLECTION_REQUEST:
            return TOO_LARGE  # not None: gRPC takes None for a failed deserializer
        return reflection_pb2.ServerReflectionRequest.FromString(data)

    @streaming_rpc
    def ServerReflectionInfo(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        with self.service.stream_slot():
            yield from super().ServerReflectionInfo(_checked(request_iterator), context)


def _pool_of(files: tuple[Any, ...]) -> descriptor_pool.DescriptorPool:
    """One pool with these files (FileDescriptors): smq.proto is not in protobuf's
    default pool (see scripts/gen_proto.py), the health and reflection files are."""
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.AddSerializedFile(file.serialized_pb)
    return pool


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if request is TOO_LARGE:
            raise InvalidArgument(
                f"a reflection request is at most {MAX_REFLECTION_REQUEST // 1024} KiB"
            )
        yield request
