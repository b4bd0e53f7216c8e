"""The values `smq.client` takes and returns, and its defaults. No grpc here.

Import them from `smq.client` (or `smq`), which re-exports every public name:

    Message(payload, offset)        a stored message (a tuple, as in pysmq)
    TopicInfo                       describe_topic / list_topics
    TopicPolicy                     get_topic_policy / set_topic_policy (smq.domain's)
    ConsumerInfo                    list_consumers
    ServerInfo                      server_info
    ClientTLSConfig, ClientConfig   pysmq's TLS files and defaults
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final, NamedTuple

from ..domain import HEARTBEAT_OFFSET

if TYPE_CHECKING:
    from .._proto import smq_pb2

DEFAULT_TIMEOUT: Final = 10.0  # seconds, for every unary call
DEFAULT_RETRIES: Final = 6  # extra attempts of idempotent calls on UNAVAILABLE
DEFAULT_MAX_MESSAGE_SIZE_MB: Final = 1024  # pysmq's default, both directions
DEFAULT_PAGE_SIZE: Final = 1000  # messages per BulkRetrieve / Subscribe page
DEFAULT_LIST_PAGE_SIZE: Final = (
    10_000  # per ListTopics / ListConsumers page (the server may send fewer)
)
DEFAULT_BATCH_SIZE: Final = 1000  # messages per ProduceBatch request
DEFAULT_BATCH_BYTES: Final = 3 * 1024**2  # payload bytes per ProduceBatch request
SMQ_SPECIAL_OFFSET_HEARTBEAT: Final = HEARTBEAT_OFFSET  # pysmq's name for it
_MESSAGE_OVERHEAD = 8  # protobuf framing per message in a batch, at most


class _UseClientDefault:
    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: The default of every `timeout=` argument: use the Client's `timeout`.
USE_CLIENT_DEFAULT: Final = _UseClientDefault()
Timeout = float | None | _UseClientDefault


@dataclasses.dataclass(frozen=True)
class ClientTLSConfig:
    """Files for mutual TLS, all PEM: the client's certificate and private key, and
    the CA that signed the server's certificate (pysmq's class, same fields)."""

    cert_file: str
    key_file: str
    ca_file: str


class ClientConfig:
    """pysmq's defaults, kept for programs that import them. Changing them has no
    effect (as in pysmq): pass `timeout=` to `Client` instead."""

    DEFAULT_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_TOPIC_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_DELETE_TIMEOUT = DEFAULT_TIMEOUT
    DEFAULT_MAX_MESSAGE_SIZE_MB = DEFAULT_MAX_MESSAGE_SIZE_MB


class Message(NamedTuple):
    """A stored message. A tuple, so `payload, offset = message` works as in pysmq."""

    payload: bytes
    offset: int


@dataclasses.dataclass(frozen=True)
class TopicInfo:
    """What the server knows of a topic. Offsets are None while it stores no message."""

    name: str
    earliest_offset: int | None
    latest_offset: int | None
    message_count: int
    stored_bytes: int  # sum of payload sizes
    next_offset: int  # the offset the next message will get
    created_at: int  # unix seconds

    @classmethod
    def from_proto(cls, info: smq_pb2.TopicInfo) -> TopicInfo:
        empty = info.message_count == 0
        return cls(
            name=info.name,
            earliest_offset=None if empty else info.earliest_offset,
            latest_offset=None if empty else info.latest_offset,
            message_count=info.message_count,
            stored_bytes=info.stored_bytes,
            next_offset=info.next_offset,
            created_at=info.created_at,
        )


@dataclasses.dataclass(frozen=True)
class ConsumerInfo:
    """A durable named consumer's position on one topic."""

    consumer: str
    topic: str
    committed_offset: int  # the last offset it has processed; it resumes at the next
    lag: int  # the topic's latest offset minus committed_offset (0 if none ahead)
    updated_at: int  # unix seconds of its last commit

    @classmethod
    def from_proto(cls, info: smq_pb2.ConsumerInfo) -> ConsumerInfo:
        return cls(
            consumer=info.consumer,
            topic=info.topic,
            committed_offset=info.committed_offset,
            lag=info.lag,
            updated_at=info.updated_at,
        )


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """A server's version, the settings that matter to clients, and counters since it
    started (`commits` are write transactions; with group commit one carries several
    write calls, `committed_writes`, and their `committed_messages`)."""

    version: str
    durability: str  # "full" or "normal"
    max_message_size: int  # bytes
    uptime: float  # seconds
    commits: int
    committed_writes: int
    committed_messages: int
    topics: int
    stored_messages: int
    stored_bytes: int  # sum of payload sizes

    @classmethod
    def from_proto(cls, info: smq_pb2.GetServerInfoResponse) -> ServerInfo:
        return cls(
            version=info.version,
            durability=info.durability,
            max_message_size=info.max_message_size,
            uptime=info.uptime_seconds,
            commits=info.commits,
            committed_writes=info.committed_writes,
            committed_messages=info.committed_messages,
            topics=info.topics,
            stored_messages=info.stored_messages,
            stored_bytes=info.stored_bytes,
        )


def whole_seconds(value: float | None, name: str) -> int | None:
    """A duration for the wire, which counts whole seconds."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"{name} must be a whole number of seconds, not {value!r}")
    return int(value)


Payload = bytes | bytearray | memoryview | str


def as_bytes(payload: Payload) -> bytes:
    """Messages are bytes; a str is sent as UTF-8."""
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"a message must be bytes or str, not {type(payload).__name__}")


def message_cost(payload: bytes) -> int:
    """What a message takes of a batch's `max_batch_bytes`: its payload and framing."""
    return len(payload) + _MESSAGE_OVERHEAD


def batch_full(count: int, size: int, cost: int, max_count: int, max_bytes: int) -> bool:
    """Whether a batch of `count` messages costing `size` has no room for one more of
    `cost`. An empty batch always has room: a message larger than max_bytes goes alone."""
    return count > 0 and (count >= max_count or size + cost > max_bytes)


def batches(messages: Iterable[Payload], max_count: int, max_bytes: int) -> Iterator[list[bytes]]:
    """Group messages into lists of at most max_count messages and max_bytes bytes
    (counting framing); a message larger than max_bytes forms a batch alone."""
    batch: list[bytes] = []
    size = 0
    for message in messages:
        payload = as_bytes(message)
        cost = message_cost(payload)
        if batch_full(len(batch), size, cost, max_count, max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(payload)
        size += cost
    if batch:
        yield batch
