"""The Client's calls that look after the server's state rather than move messages:
topics (create, list, describe, delete), their retention and disk-full policies, and
the offsets named consumers committed. `smq.client.Client` has them all; they run in
the caller's thread, as every call does (see smq.client.calls).
"""

from __future__ import annotations

from .._proto import smq_pb2
from ..domain import TopicPolicy
from ..errors import NotFound, SMQTopicCreationError
from .calls import Calls
from .transport import Op
from .types import USE_CLIENT_DEFAULT, ConsumerInfo, Timeout, TopicInfo, whole_seconds


class Admin(Calls):
    """Topics, their policies and named consumers' offsets (mixed into Client)."""

    # -- topics ---------------------------------------------------------------------

    def create_topic(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool | None:
        """Create a topic; creating an existing one succeeds and changes nothing. Returns
        True if this call created it, False if it existed, None from a server too old to
        say (pysmq returned None).

        Raises SMQTopicCreationError: InvalidArgument (bad name), PermissionDenied."""
        response = self._call(
            "CreateTopic",
            smq_pb2.CreateTopicRequest(topic=topic),
            timeout,
            Op(f"create topic {topic!r}", SMQTopicCreationError, topic),
            idempotent=True,
        )
        return response.created if response.HasField("created") else None

    def list_topics(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[TopicInfo]:
        """Every topic, by name: asked for in pages of DEFAULT_LIST_PAGE_SIZE, so any
        number of topics can be listed (a server from before paging answers all at once).
        `timeout` applies per page."""
        pages = self._pages(
            "ListTopics", smq_pb2.ListTopicsRequest(), timeout, Op("list topics", None)
        )
        return [TopicInfo.from_proto(t) for page in pages for t in page.topics]

    def describe_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> TopicInfo:
        """Offsets, size and counters of one topic. Raises NotFound."""
        response = self._call(
            "DescribeTopic",
            smq_pb2.DescribeTopicRequest(topic=topic),
            timeout,
            Op(f"describe topic {topic!r}", None, topic),
            idempotent=True,
        )
        return TopicInfo.from_proto(response.topic)

    def delete_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete a topic and all its messages. Re-creating it continues its offsets.
        Raises NotFound, PermissionDenied (remote writes disabled)."""
        self._call(
            "DeleteTopic",
            smq_pb2.DeleteTopicRequest(topic=topic),
            timeout,
            Op(f"delete topic {topic!r}", None, topic),
        )

    def get_topic_policy(
        self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> tuple[TopicPolicy, TopicPolicy]:
        """The topic's retention and disk-full policy, as (overrides, effective): what the
        topic sets itself (None: the server's default), and what applies. Raises NotFound."""
        response = self._call(
            "GetTopicPolicy",
            smq_pb2.GetTopicPolicyRequest(topic=topic),
            timeout,
            Op(f"get the policy of topic {topic!r}", None, topic),
            idempotent=True,
        )
        return TopicPolicy.from_proto(response.overrides), TopicPolicy.from_proto(
            response.effective
        )

    def set_topic_policy(
        self,
        topic: str,
        *,
        max_messages: int | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
        on_full: str | None = None,
        keep_uncommitted: bool | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> TopicPolicy:
        """Set the topic's policy overrides (see `TopicPolicy`) and return the effective policy.

        This REPLACES the overrides: a field not given goes back to the server's default.
        To change one field, pass the others from `get_topic_policy(topic)[0]` too
        (`dataclasses.asdict(overrides) | {"max_age": 3600}`). Limits: 0 is no limit;
        `max_age` in whole seconds; `on_full` "reject" or "drop-oldest". Applies from the
        next commit on. Raises NotFound, InvalidArgument, PermissionDenied (remote writes
        disabled)."""
        policy = TopicPolicy(
            max_messages, max_bytes, whole_seconds(max_age, "max_age"), on_full, keep_uncommitted
        )
        request = smq_pb2.SetTopicPolicyRequest(
            topic=topic, policy=smq_pb2.TopicPolicy(**policy.to_proto_fields())
        )
        response = self._call(
            "SetTopicPolicy",
            request,
            timeout,  # replaces: safe to retry
            Op(f"set the policy of topic {topic!r}", None, topic),
            idempotent=True,
        )
        return TopicPolicy.from_proto(response.effective)

    # -- durable named consumers ------------------------------------------------------------

    def commit_offset(
        self, consumer: str, topic: str, offset: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Record, in the server's database, that `consumer` has processed `topic` up to
        and including `offset`; it resumes at `offset + 1` (commit 0 to start from the
        beginning). Committing is allowed even where remote writes are disabled.
        Raises NotFound (no topic), OffsetOutOfRange (above the latest), InvalidArgument
        (bad consumer name: as for topics)."""
        request = smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=offset)
        self._call(
            "CommitOffset",
            request,
            timeout,
            Op(f"commit offset {offset} of {topic!r} for consumer {consumer!r}", None, topic),
            idempotent=True,
        )

    def committed_offset(
        self, consumer: str, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """The last offset `consumer` committed on `topic`. Raises NotFound if it has
        committed none there (or the topic does not exist)."""
        request = smq_pb2.GetCommittedOffsetRequest(consumer=consumer, topic=topic)
        return self._call(
            "GetCommittedOffset",
            request,
            timeout,
            Op(f"get the committed offset of consumer {consumer!r} on {topic!r}", None, topic),
            idempotent=True,
        ).offset

    def resume_offset(
        self, consumer: str, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """Where `consumer` goes on reading `topic`: its committed offset + 1, or 0 (the
        earliest) if it has committed nothing there. Raises NotFound (no topic)."""
        try:
            return self.committed_offset(consumer, topic, timeout=timeout) + 1
        except NotFound:
            self.describe_topic(topic, timeout=timeout)  # NotFound if the topic is missing
            return 0

    def list_consumers(
        self,
        topic: str | None = None,
        *,
        consumer: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[ConsumerInfo]:
        """Every committed offset of a named consumer, by consumer: all of them, or only
        those on `topic` and/or of `consumer` (no match: an empty list). In pages, as
        `list_topics`."""
        request = smq_pb2.ListConsumersRequest(topic=topic or "", consumer=consumer or "")
        pages = self._pages("ListConsumers", request, timeout, Op("list consumers", None, topic))
        return [ConsumerInfo.from_proto(c) for page in pages for c in page.consumers]

    def delete_consumer(
        self, consumer: str, topic: str | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Forget `consumer`'s committed offset on `topic`, or on every topic. Not retried.
        Raises NotFound if it had none there (or the topic does not exist)."""
        where = f" on {topic!r}" if topic else ""
        self._call(
            "DeleteConsumer",
            smq_pb2.DeleteConsumerRequest(consumer=consumer, topic=topic or ""),
            timeout,
            Op(f"delete consumer {consumer!r}{where}", None, topic),
        )
