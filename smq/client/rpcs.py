"""Every unary call of the client as data: which RPC, the request, the `Op` its errors
name, whether it may be retried, and how its answer reads. `smq.client.Client` and
`smq.client.AsyncClient` both run these, so a call sends, retries and fails alike in
either (one source for each request and each error message).

    rpc = rpcs.produce(topic, b"x")
    offset = rpc.read(stub_call(rpc.request))   # what Client.produce returns
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .._proto import smq_pb2
from ..domain import TopicPolicy
from ..errors import (
    SMQConnectionError,
    SMQConsumeError,
    SMQOffsetError,
    SMQProduceError,
    SMQTopicCreationError,
)
from .transport import Op
from .types import ConsumerInfo, Message, ServerInfo, TopicInfo, whole_seconds

R = TypeVar("R")


def _offset(response: Any) -> int:
    return int(response.offset)


def _nothing(response: Any) -> None:
    return None


def _itself(response: Any) -> Any:
    return response


@dataclasses.dataclass(frozen=True)
class Rpc(Generic[R]):
    """One unary call: `method` of the stub with `request`; `read` turns the answer into
    what the client method returns. Only `idempotent` calls are retried."""

    method: str
    request: Any
    op: Op
    read: Callable[[Any], R]
    idempotent: bool = False


@dataclasses.dataclass(frozen=True)
class Listing(Generic[R]):
    """A paged list call: every page is `method` with `request` (its page token set);
    `items` reads one page's entries."""

    method: str
    request: Any
    op: Op
    items: Callable[[Any], list[R]]


# -- server ----------------------------------------------------------------------------


def connect(target: str) -> Rpc[None]:
    op = Op(f"connect to {target}", SMQConnectionError)
    return Rpc("Connect", smq_pb2.ConnectRequest(), op, _nothing, idempotent=True)


def server_info() -> Rpc[ServerInfo]:
    op = Op("get the server's info", None)
    return Rpc("GetServerInfo", smq_pb2.GetServerInfoRequest(), op, ServerInfo.from_proto, True)


# -- offsets -----------------------------------------------------------------------------


def earliest_offset(topic: str) -> Rpc[int]:
    op = Op(f"get the earliest offset of {topic!r}", SMQOffsetError, topic)
    request = smq_pb2.GetEarliestOffsetRequest(topic=topic)
    return Rpc("GetEarliestOffset", request, op, _offset, idempotent=True)


def latest_offset(topic: str) -> Rpc[int]:
    op = Op(f"get the latest offset of {topic!r}", SMQOffsetError, topic)
    request = smq_pb2.GetLatestOffsetRequest(topic=topic)
    return Rpc("GetLatestOffset", request, op, _offset, idempotent=True)


def delete_until_offset(topic: str, offset: int) -> Rpc[None]:
    op = Op(f"delete messages of {topic!r} up to offset {offset}", SMQOffsetError, topic)
    request = smq_pb2.DeleteUntilOffsetRequest(topic=topic, offset=offset)
    return Rpc("DeleteUntilOffset", request, op, _nothing, idempotent=True)


# -- producing ---------------------------------------------------------------------------


def produce(topic: str, message: bytes) -> Rpc[int]:
    """Never retried: a lost answer may hide a stored message."""
    op = Op(f"produce to {topic!r}", SMQProduceError, topic)
    return Rpc("Produce", smq_pb2.ProduceRequest(topic=topic, message=message), op, _offset)


def produce_batch(topic: str, batch: list[bytes], appended: int = 0) -> Rpc[range]:
    """One ProduceBatch; `appended`: how many messages the batches before it appended
    (the error message says so). Never retried."""
    action = f"produce a batch of {len(batch)} messages to {topic!r}"
    if appended:
        action += f" (the {appended} messages before it were appended)"
    request = smq_pb2.ProduceBatchRequest(topic=topic, messages=batch)
    return Rpc(
        "ProduceBatch",
        request,
        Op(action, SMQProduceError, topic),
        lambda response: range(response.first_offset, response.last_offset + 1),
    )


def stream_produce_op(topic: str) -> Op:
    return Op(f"stream-produce to {topic!r}", SMQProduceError, topic)


# -- consuming ---------------------------------------------------------------------------


def consume(topic: str, offset: int, wrap_all: bool = False) -> Rpc[Message]:
    """`wrap_all`: as part of consume_earliest/latest (pysmq wraps every error there)."""
    op = Op(f"consume offset {offset} of {topic!r}", SMQConsumeError, topic, wrap_all)
    request = smq_pb2.ConsumeRequest(topic=topic, offset=offset)
    return Rpc(
        "Consume",
        request,
        op,
        lambda response: Message(response.message, response.offset),
        idempotent=True,
    )


def end_offset(topic: str, which: str) -> Rpc[int]:
    """The first step of consume_earliest / consume_latest (`which`: either word)."""
    method = "GetEarliestOffset" if which == "earliest" else "GetLatestOffset"
    request = getattr(smq_pb2, f"{method}Request")(topic=topic)
    op = Op(f"consume the {which} message of {topic!r}", SMQConsumeError, topic, wrap_all=True)
    return Rpc(method, request, op, _offset, idempotent=True)


#: How often consume_earliest / consume_latest look again when the message they found
#: was trimmed before they could read it.
END_LOOKUPS_AGAIN = 2


def bulk_retrieve(topic: str, start_offset: int, limit: int) -> Rpc[Any]:
    op = Op(f"retrieve messages of {topic!r}", SMQConsumeError, topic)
    request = smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=start_offset, limit=limit)
    return Rpc("BulkRetrieve", request, op, _itself, idempotent=True)


def stream_consume_op(topic: str) -> Op:
    return Op(f"stream messages of {topic!r}", SMQConsumeError, topic)


def iter_messages_op(topic: str) -> Op:
    return Op(f"read messages of {topic!r}", SMQConsumeError, topic)


def subscribe_op(topic: str) -> Op:
    return Op(f"subscribe to {topic!r}", SMQConsumeError, topic)


# -- topics ------------------------------------------------------------------------------


def create_topic(topic: str) -> Rpc[bool | None]:
    op = Op(f"create topic {topic!r}", SMQTopicCreationError, topic)
    return Rpc(
        "CreateTopic",
        smq_pb2.CreateTopicRequest(topic=topic),
        op,
        lambda response: response.created if response.HasField("created") else None,
        idempotent=True,
    )


def list_topics() -> Listing[TopicInfo]:
    return Listing(
        "ListTopics",
        smq_pb2.ListTopicsRequest(),
        Op("list topics", None),
        lambda page: [TopicInfo.from_proto(t) for t in page.topics],
    )


def describe_topic(topic: str) -> Rpc[TopicInfo]:
    return Rpc(
        "DescribeTopic",
        smq_pb2.DescribeTopicRequest(topic=topic),
        Op(f"describe topic {topic!r}", None, topic),
        lambda response: TopicInfo.from_proto(response.topic),
        idempotent=True,
    )


def delete_topic(topic: str) -> Rpc[None]:
    op = Op(f"delete topic {topic!r}", None, topic)
    return Rpc("DeleteTopic", smq_pb2.DeleteTopicRequest(topic=topic), op, _nothing)


def get_topic_policy(topic: str) -> Rpc[tuple[TopicPolicy, TopicPolicy]]:
    return Rpc(
        "GetTopicPolicy",
        smq_pb2.GetTopicPolicyRequest(topic=topic),
        Op(f"get the policy of topic {topic!r}", None, topic),
        lambda response: (
            TopicPolicy.from_proto(response.overrides),
            TopicPolicy.from_proto(response.effective),
        ),
        idempotent=True,
    )


def set_topic_policy(
    topic: str,
    max_messages: int | None,
    max_bytes: int | None,
    max_age: float | None,
    on_full: str | None,
    keep_uncommitted: bool | None,
) -> Rpc[TopicPolicy]:
    """Replaces the overrides: safe to retry. Raises ValueError for a bad max_age."""
    policy = TopicPolicy(
        max_messages, max_bytes, whole_seconds(max_age, "max_age"), on_full, keep_uncommitted
    )
    request = smq_pb2.SetTopicPolicyRequest(
        topic=topic, policy=smq_pb2.TopicPolicy(**policy.to_proto_fields())
    )
    return Rpc(
        "SetTopicPolicy",
        request,
        Op(f"set the policy of topic {topic!r}", None, topic),
        lambda response: TopicPolicy.from_proto(response.effective),
        idempotent=True,
    )


# -- durable named consumers -------------------------------------------------------------


def commit_offset(consumer: str, topic: str, offset: int) -> Rpc[None]:
    op = Op(f"commit offset {offset} of {topic!r} for consumer {consumer!r}", None, topic)
    request = smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=offset)
    return Rpc("CommitOffset", request, op, _nothing, idempotent=True)


def committed_offset(consumer: str, topic: str) -> Rpc[int]:
    op = Op(f"get the committed offset of consumer {consumer!r} on {topic!r}", None, topic)
    request = smq_pb2.GetCommittedOffsetRequest(consumer=consumer, topic=topic)
    return Rpc("GetCommittedOffset", request, op, _offset, idempotent=True)


def list_consumers(topic: str | None, consumer: str | None) -> Listing[ConsumerInfo]:
    return Listing(
        "ListConsumers",
        smq_pb2.ListConsumersRequest(topic=topic or "", consumer=consumer or ""),
        Op("list consumers", None, topic),
        lambda page: [ConsumerInfo.from_proto(c) for c in page.consumers],
    )


def delete_consumer(consumer: str, topic: str | None) -> Rpc[None]:
    """Not retried."""
    where = f" on {topic!r}" if topic else ""
    op = Op(f"delete consumer {consumer!r}{where}", None, topic)
    request = smq_pb2.DeleteConsumerRequest(consumer=consumer, topic=topic or "")
    return Rpc("DeleteConsumer", request, op, _nothing)
