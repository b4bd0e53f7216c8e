"""The Client's calls that look after the server's state rather than move messages:
topics (create, list, describe, delete), their retention and disk-full policies, and
the offsets named consumers committed. `smq.client.Client` has them all; they run in
the caller's thread, as every call does (see smq.client.calls).
"""

from __future__ import annotations

from ..domain import TopicPolicy
from ..errors import NotFound
from . import rpcs
from .calls import Calls
from .types import USE_CLIENT_DEFAULT, ConsumerInfo, Timeout, TopicInfo


class Admin(Calls):
    """Topics, their policies and named consumers' offsets (mixed into Client)."""

    # -- topics ---------------------------------------------------------------------

    def create_topic(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool | None:
        """Create a topic; creating an existing one succeeds and changes nothing. Returns
        True if this call created it, False if it existed, None from a server too old to
        say (pysmq returned None).

        Raises SMQTopicCreationError: InvalidArgument (bad name), PermissionDenied."""
        return self._run(rpcs.create_topic(topic), timeout)

    def list_topics(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[TopicInfo]:
        """Every topic, by name: asked for in pages of DEFAULT_LIST_PAGE_SIZE, so any
        number of topics can be listed (a server from before paging answers all at once).
        `timeout` applies per page."""
        return self._list(rpcs.list_topics(), timeout)

    def describe_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> TopicInfo:
        """Offsets, size and counters of one topic. Raises NotFound."""
        return self._run(rpcs.describe_topic(topic), timeout)

    def delete_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Delete a topic and all its messages. Re-creating it continues its offsets.
        Raises NotFound, PermissionDenied (remote writes disabled)."""
        self._run(rpcs.delete_topic(topic), timeout)

    def get_topic_policy(
        self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> tuple[TopicPolicy, TopicPolicy]:
        """The topic's retention and disk-full policy, as (overrides, effective): what the
        topic sets itself (None: the server's default), and what applies. Raises NotFound."""
        return self._run(rpcs.get_topic_policy(topic), timeout)

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
        rpc = rpcs.set_topic_policy(
            topic, max_messages, max_bytes, max_age, on_full, keep_uncommitted
        )
        return self._run(rpc, timeout)

    # -- durable named consumers ------------------------------------------------------------

    def commit_offset(
        self, consumer: str, topic: str, offset: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Record, in the server's database, that `consumer` has processed `topic` up to
        and including `offset`; it resumes at `offset + 1` (commit 0 to start from the
        beginning). Committing is allowed even where remote writes are disabled.
        Raises NotFound (no topic), OffsetOutOfRange (above the latest), InvalidArgument
        (bad consumer name: as for topics)."""
        self._run(rpcs.commit_offset(consumer, topic, offset), timeout)

    def committed_offset(
        self, consumer: str, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """The last offset `consumer` committed on `topic`. Raises NotFound if it has
        committed none there (or the topic does not exist)."""
        return self._run(rpcs.committed_offset(consumer, topic), timeout)

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
        return self._list(rpcs.list_consumers(topic, consumer), timeout)

    def delete_consumer(
        self, consumer: str, topic: str | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Forget `consumer`'s committed offset on `topic`, or on every topic. Not retried.
        Raises NotFound if it had none there (or the topic does not exist)."""
        self._run(rpcs.delete_consumer(consumer, topic), timeout)
