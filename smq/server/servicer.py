"""The SuhaibMessageQueue service over QueueService: each method unpacks the request,
calls the service and packs the reply (errors: status.py; memory: budget.py). Called by
the threads that run calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc

from .. import __version__
from .._proto import smq_pb2, smq_pb2_grpc
from ..domain import HEARTBEAT_OFFSET, TopicPolicy
from ..errors import Overloaded, ResourceExhausted
from . import encoding
from .access import Gate, is_local
from .budget import REPLY_COPIES, CallMemory, MemoryBudget, Writes, held_page_cost
from .handlers import Encoded, charge, decoded
from .lists import Listing, PageRequest, page_of
from .ops import Caller
from .service import (
    PAGE_BYTES,
    STREAM_PAGE_BYTES,
    STREAM_PAGE_MESSAGES,
    ConsumerState,
    Follower,
    QueueService,
    page_messages,
)
from .status import rpc, streaming_rpc
from .tallies import NO_CALL_STATS, CallStats, NoCallStats, NoTally, Tally
from .topic_state import TopicState

SERVICE_NAME = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"].full_name
HEARTBEAT = smq_pb2.ConsumeResponse(message=b"", offset=HEARTBEAT_OFFSET).SerializeToString()
MAX_BATCH_BYTES = 4 * 1024**2  # a ProduceBatch request may carry this much even with small messages
MAX_BATCH_MESSAGES = 10_000  # and at most this many messages (a million empty ones is a weapon)
# List answers are built one at a time: building one holds every listed entry as Python
# objects (~600 bytes each: 50,000 consumers took ~30 MiB), which the budget cannot see
# beforehand; 40 at once took the server past its unit's MemoryMax. Others wait this long.
LIST_BUILDS = 1
LIST_WAIT_SECONDS = 10.0


class Servicer(smq_pb2_grpc.SuhaibMessageQueueServicer):
    """SuhaibMessageQueue over QueueService."""

    def __init__(
        self,
        service: QueueService,
        heartbeat_interval: float,
        durability: str,
        send_limit: int,
        budget: MemoryBudget,
        gate: Gate | None = None,
        calls: CallStats | NoCallStats = NO_CALL_STATS,
        delivered: Tally | None = None,
    ) -> None:
        """`calls` and `delivered` count for the metrics: calls by method and status
        (status.py's wrappers), messages handed to readers by topic."""
        self.service = service
        self.calls = calls
        self.delivered = delivered if delivered is not None else NoTally()
        self.gate = gate or Gate(None)  # None: no ACL file, every call admitted
        self.budget = budget
        self.heartbeat_interval = heartbeat_interval
        self.durability = durability
        self.send_limit = send_limit  # list pages fit it (see list_pages)
        self.started = time.monotonic()
        self._list_builds = threading.BoundedSemaphore(LIST_BUILDS)

    def admit(self, rpc: str, request: Any, context: grpc.ServicerContext) -> None:
        """Called by the wrappers (status.py) before each handler: raises AccessDenied
        if the access rules deny the call."""
        self.gate.admit(rpc, request, context)

    @rpc
    def Connect(
        self, request: smq_pb2.ConnectRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ConnectResponse:
        return smq_pb2.ConnectResponse()

    @rpc
    def CreateTopic(
        self, request: smq_pb2.CreateTopicRequest, context: grpc.ServicerContext
    ) -> smq_pb2.CreateTopicResponse:
        self.service.check_may_write(is_local(context))
        return smq_pb2.CreateTopicResponse(created=self.service.create_topic(request.topic))

    @rpc
    def GetEarliestOffset(
        self, request: smq_pb2.GetEarliestOffsetRequest, context: grpc.ServicerContext
    ) -> smq_pb2.GetEarliestOffsetResponse:
        return smq_pb2.GetEarliestOffsetResponse(offset=self.service.earliest_offset(request.topic))

    @rpc
    def GetLatestOffset(
        self, request: smq_pb2.GetLatestOffsetRequest, context: grpc.ServicerContext
    ) -> smq_pb2.GetLatestOffsetResponse:
        return smq_pb2.GetLatestOffsetResponse(offset=self.service.latest_offset(request.topic))

    @rpc
    def Produce(
        self, request: smq_pb2.ProduceRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ProduceResponse:
        self.service.check_may_write(is_local(context))
        offset = self.service.produce(request.topic, request.message, source=caller(context))
        return smq_pb2.ProduceResponse(offset=offset)

    @rpc
    def StreamProduce(
        self, request_iterator: Iterator[smq_pb2.ProduceRequest], context: grpc.ServicerContext
    ) -> smq_pb2.ProduceResponse:
        self.service.check_may_write(is_local(context))
        allowed = self.gate.stream_check("StreamProduce", context)
        with self.service.stream_slot(), Writes() as writes:
            last = self.service.produce_stream(
                _messages(request_iterator, writes, allowed), committed=writes.committed
            )
        return smq_pb2.ProduceResponse(offset=last)

    @rpc
    def Consume(
        self, request: smq_pb2.ConsumeRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ConsumeResponse:
        payload = self.service.consume(request.topic, request.offset)
        self.delivered.add(request.topic, 1)
        return smq_pb2.ConsumeResponse(message=payload, offset=request.offset)

    @streaming_rpc
    def StreamConsume(
        self, request: smq_pb2.ConsumeRequest, context: grpc.ServicerContext
    ) -> Iterator[smq_pb2.ConsumeResponse]:
        allowed = self.gate.stream_check("StreamConsume", context)
        with self._consumer_slot(context, request.topic), self._reply_memory(context) as memory:
            follower = self._follow(
                context,
                request.topic,
                request.offset,
                memory,
                STREAM_PAGE_MESSAGES,
                STREAM_PAGE_BYTES,
            )
            while not follower.cancelled:
                yield from self._consume_replies(
                    follower,
                    memory,
                    lambda: allowed(request.topic),
                    lambda sent: self.delivered.add(request.topic, sent),
                )

    @staticmethod
    def _consume_replies(
        follower: Follower,
        memory: CallMemory,
        still_allowed: Callable[[], None],
        delivered: Callable[[int], None],
    ) -> Iterator[Any]:
        """A heartbeat, or the next page's messages one by one: the page stays alive in
        this generator only, charged until its last message is taken. `still_allowed()`
        raises if the access rules, reloaded while the page was awaited, deny it now;
        `delivered(n)` learns how many of its messages were handed to gRPC."""
        page = follower.next_page()
        if page is not None:
            still_allowed()
        if page == []:
            yield HEARTBEAT
        if not page:
            return
        memory.hold(held_page_cost(page))
        sent = 0
        try:
            for offset, payload in page:
                memory.sending()
                sent += 1  # handed to gRPC (counted even if the client leaves before it is sent)
                yield Encoded(encoding.consume_response(offset, payload))
                memory.sent()
        finally:
            delivered(sent)
        memory.taken()

    def _consumer_slot(
        self, context: grpc.ServicerContext, topic: str
    ) -> AbstractContextManager[None]:
        """A stream place owned by this connection and topic (see QueueService.stream_slot).
        Unix-socket callers all share one peer name, so none of them is ever evicted.
        A stream for a missing topic fails here, before it could end another one."""
        self.service.describe(topic)
        peer = context.peer()
        owner = None if peer.startswith("unix:") else (peer, topic)
        return self.service.stream_slot(owner, context.cancel)

    def _reply_memory(self, context: grpc.ServicerContext) -> CallMemory:
        """The call's share of the memory budget, released when the call ends (whatever
        ends it), or when the `with` block of a stream's handler does."""
        peer = context.peer()
        memory = self.budget.open_call(None if peer.startswith("unix:") else peer, context.cancel)
        if not context.add_callback(memory.close):
            memory.close()  # the call already ended
        return memory

    def _follow(
        self,
        context: grpc.ServicerContext,
        topic: str,
        offset: int,
        memory: CallMemory,
        page_messages: int = 0,
        page_bytes: int = PAGE_BYTES,
    ) -> Follower:
        """A follower that the end of the call (cancel, deadline, disconnect) wakes and ends,
        reading pages as large as the memory budget lets this call build."""
        follower = self.service.follow(
            topic, offset, self.heartbeat_interval, page_messages, page_bytes, memory
        )
        if not context.add_callback(follower.cancel):
            follower.cancel()  # the call already ended: nothing would wake it later
        return follower

    @rpc
    def DeleteUntilOffset(
        self, request: smq_pb2.DeleteUntilOffsetRequest, context: grpc.ServicerContext
    ) -> smq_pb2.DeleteUntilOffsetResponse:
        self.service.check_may_write(is_local(context))
        self.service.trim(request.topic, request.offset)
        return smq_pb2.DeleteUntilOffsetResponse()

    @rpc
    def ProduceBatch(
        self, request: smq_pb2.ProduceBatchRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ProduceBatchResponse:
        self.service.check_may_write(is_local(context))
        if len(request.messages) > MAX_BATCH_MESSAGES:  # before a Python object per message
            raise ResourceExhausted(
                f"a batch holds at most {MAX_BATCH_MESSAGES} messages, "
                f"not {len(request.messages)}: split it"
            )
        first, last = self.service.produce_batch(
            request.topic, list(request.messages), source=caller(context)
        )
        return smq_pb2.ProduceBatchResponse(first_offset=first, last_offset=last)

    @streaming_rpc
    def Subscribe(
        self, request: smq_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[Encoded]:
        allowed = self.gate.stream_check("Subscribe", context)
        with self._consumer_slot(context, request.topic), self._reply_memory(context) as memory:
            follower = self._follow(
                context, request.topic, request.offset, memory, request.max_messages
            )
            while True:
                reply = self._subscribe_reply(follower, memory)
                if reply is None:
                    return
                allowed(request.topic)  # the rules may have been reloaded while it waited
                self.delivered.add(request.topic, reply[1])  # handed to gRPC, as above
                yield reply[0]
                memory.taken()

    @staticmethod
    def _subscribe_reply(follower: Follower, memory: CallMemory) -> tuple[Encoded, int] | None:
        """The next page as an encoded SubscribeResponse, charged until the client takes
        it, and how many messages it holds; None once the stream is cancelled. The page
        itself dies here."""
        page = follower.next_page()
        if page is None:
            return None
        reply = encoding.subscribe_response(page, follower.cursor)
        memory.hold(REPLY_COPIES * len(reply))
        return Encoded(reply), len(page)

    @rpc
    def ListTopics(
        self, request: smq_pb2.ListTopicsRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ListTopicsResponse:
        visible = self.gate.topic_filter("ListTopics", context)
        with self._building_list(context) as memory:
            topics = self.service.topics()
            if visible is not None:
                topics = [topic for topic in topics if visible(topic.name)]
            page = page_of(TOPICS, topics, page_request(request), self.send_limit)
            reply = smq_pb2.ListTopicsResponse(
                topics=page.messages, next_page_token=page.next_token
            )
            memory.hold(REPLY_COPIES * reply.ByteSize())  # until the client takes it
        return reply

    @rpc
    def DescribeTopic(
        self, request: smq_pb2.DescribeTopicRequest, context: grpc.ServicerContext
    ) -> smq_pb2.DescribeTopicResponse:
        return smq_pb2.DescribeTopicResponse(topic=topic_info(self.service.describe(request.topic)))

    @rpc
    def DeleteTopic(
        self, request: smq_pb2.DeleteTopicRequest, context: grpc.ServicerContext
    ) -> smq_pb2.DeleteTopicResponse:
        self.service.check_may_write(is_local(context))
        self.service.delete_topic(request.topic)
        return smq_pb2.DeleteTopicResponse()

    @rpc
    def SetTopicPolicy(
        self, request: smq_pb2.SetTopicPolicyRequest, context: grpc.ServicerContext
    ) -> smq_pb2.TopicPolicyResponse:
        self.service.check_may_write(is_local(context))
        return policy_reply(
            *self.service.set_policy(request.topic, TopicPolicy.from_proto(request.policy))
        )

    @rpc
    def GetTopicPolicy(
        self, request: smq_pb2.GetTopicPolicyRequest, context: grpc.ServicerContext
    ) -> smq_pb2.TopicPolicyResponse:
        return policy_reply(*self.service.policy(request.topic))

    @rpc
    def CommitOffset(
        self, request: smq_pb2.CommitOffsetRequest, context: grpc.ServicerContext
    ) -> smq_pb2.CommitOffsetResponse:
        self.service.commit_offset(request.consumer, request.topic, request.offset)
        return smq_pb2.CommitOffsetResponse()

    @rpc
    def GetCommittedOffset(
        self, request: smq_pb2.GetCommittedOffsetRequest, context: grpc.ServicerContext
    ) -> smq_pb2.GetCommittedOffsetResponse:
        return smq_pb2.GetCommittedOffsetResponse(
            offset=self.service.committed_offset(request.consumer, request.topic)
        )

    @rpc
    def ListConsumers(
        self, request: smq_pb2.ListConsumersRequest, context: grpc.ServicerContext
    ) -> smq_pb2.ListConsumersResponse:
        visible = self.gate.topic_filter("ListConsumers", context)
        with self._building_list(context) as memory:
            consumers = self.service.consumers(request.topic, request.consumer)
            if visible is not None:
                consumers = [entry for entry in consumers if visible(entry.topic)]
            page = page_of(CONSUMERS, consumers, page_request(request), self.send_limit)
            reply = smq_pb2.ListConsumersResponse(
                consumers=page.messages, next_page_token=page.next_token
            )
            memory.hold(REPLY_COPIES * reply.ByteSize())  # until the client takes it
        return reply

    @contextlib.contextmanager
    def _building_list(self, context: grpc.ServicerContext) -> Iterator[CallMemory]:
        """This call's turn to build a list answer (LIST_BUILDS), and its share of the
        memory budget for the answer, held until the client takes it."""
        memory = self._reply_memory(context)
        if not self._list_builds.acquire(timeout=LIST_WAIT_SECONDS):
            raise Overloaded(
                f"other list calls have been building their answers for {LIST_WAIT_SECONDS:.0f} s; "
                "retry later"
            )
        try:
            yield memory
        finally:
            self._list_builds.release()

    @rpc
    def DeleteConsumer(
        self, request: smq_pb2.DeleteConsumerRequest, context: grpc.ServicerContext
    ) -> smq_pb2.DeleteConsumerResponse:
        self.service.check_may_write(is_local(context))
        self.service.delete_consumer(request.consumer, request.topic)
        return smq_pb2.DeleteConsumerResponse()

    @rpc
    def GetServerInfo(
        self, request: smq_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> smq_pb2.GetServerInfoResponse:
        return smq_pb2.GetServerInfoResponse(
            version=__version__,
            durability=self.durability,
            max_message_size=self.service.limits.max_message_size,
            uptime_seconds=time.monotonic() - self.started,
            **dataclasses.asdict(self.service.totals()),
        )

    @rpc
    def BulkRetrieve(
        self, request: smq_pb2.BulkRetrieveRequest, context: grpc.ServicerContext
    ) -> bytes:  # encoded
        memory = self._reply_memory(context)
        max_bytes, count = memory.take_page(PAGE_BYTES, page_messages(request.limit))
        reply = self._bulk_retrieve_reply(request, count, max_bytes)
        memory.hold(REPLY_COPIES * len(reply))  # until the call ends: the client took it
        return reply

    def _bulk_retrieve_reply(self, request: Any, count: int, max_bytes: int) -> bytes:
        """The page, encoded as a BulkRetrieveResponse; the page itself dies here."""
        page = self.service.read(request.topic, request.start_offset, count, max_bytes)
        self.delivered.add(request.topic, len(page.messages))
        return encoding.bulk_retrieve_response(page.messages, page.next_offset)


def caller(context: grpc.ServicerContext) -> Caller:
    """A unary write's source: its connection, and whether the call still waits. The
    deadline is read off the clock: the call's cancellation reaches is_active() only
    once gRPC's thread has handled it, and the caller may have sent its next write.
    Monotonic from here: a board's clock stepped by NTP must not end calls."""
    ends = time.monotonic() + context.time_remaining()

    def waits() -> bool:
        return time.monotonic() < ends and context.is_active()

    return Caller(context.peer(), waits)


def _messages(
    requests: Iterator[Any], writes: Writes, allowed: Callable[[str], None]
) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of each StreamProduce request; each one's budget charge goes to
    `writes`, to be released once it is committed. `allowed(topic)` raises for a topic
    the caller may not produce to: the stream ends there, before that message."""
    for request in requests:
        message = decoded(request)
        taken = charge(request)
        if taken is not None:
            writes.add(taken)
        allowed(message.topic)
        item = (message.topic, message.message)
        del request, message  # the parsed request, a second copy of the payload, goes now
        yield item


def topic_info(topic: TopicState) -> smq_pb2.TopicInfo:
    return smq_pb2.TopicInfo(
        name=topic.name,
        earliest_offset=topic.earliest or 0,
        latest_offset=topic.latest or 0,
        message_count=topic.message_count,
        stored_bytes=topic.stored_bytes,
        next_offset=topic.next_offset,
        created_at=topic.created_at,
    )


def consumer_info(consumer: ConsumerState) -> smq_pb2.ConsumerInfo:
    return smq_pb2.ConsumerInfo(
        consumer=consumer.consumer,
        topic=consumer.topic,
        committed_offset=consumer.committed_offset,
        lag=consumer.lag,
        updated_at=consumer.updated_at,
    )


TOPICS = Listing("topics", 1, lambda t: (t.name,), topic_info)
CONSUMERS = Listing("consumer offsets", 2, lambda c: (c.consumer, c.topic), consumer_info)


def page_request(request: smq_pb2.ListTopicsRequest | smq_pb2.ListConsumersRequest) -> PageRequest:
    return PageRequest(request.page_size, request.page_token)


def policy_reply(overrides: TopicPolicy, effective: TopicPolicy) -> smq_pb2.TopicPolicyResponse:
    return smq_pb2.TopicPolicyResponse(
        overrides=smq_pb2.TopicPolicy(**overrides.to_proto_fields()),
        effective=smq_pb2.TopicPolicy(**effective.to_proto_fields()),
    )
