"""AsyncClient's calls on topics, their policies and named consumers: the sync
`Admin`'s (smq.client.admin), as coroutines, with the same requests, retries, results
and errors (both run smq.client.rpcs). Each docstring names the sync method that
documents it.
"""

from __future__ import annotations

from ..domain import TopicPolicy
from ..errors import NotFound
from . import rpcs
from .aio_calls import AsyncCalls
from .types import USE_CLIENT_DEFAULT, ConsumerInfo, Timeout, TopicInfo


class AsyncAdmin(AsyncCalls):
    """Topics, their policies and named consumers' offsets (mixed into AsyncClient)."""

    # -- topics ---------------------------------------------------------------------

    async def create_topic(self, topic: str, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool | None:
        """As `Client.create_topic`: True if created, False if it existed. Idempotent."""
        return await self._run(rpcs.create_topic(topic), timeout)

    async def list_topics(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[TopicInfo]:
        """As `Client.list_topics`: every topic, asked for in pages."""
        return await self._list(rpcs.list_topics(), timeout)

    async def describe_topic(
        self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> TopicInfo:
        """As `Client.describe_topic`. Raises NotFound."""
        return await self._run(rpcs.describe_topic(topic), timeout)

    async def delete_topic(self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """As `Client.delete_topic`. Not retried."""
        await self._run(rpcs.delete_topic(topic), timeout)

    async def get_topic_policy(
        self, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> tuple[TopicPolicy, TopicPolicy]:
        """As `Client.get_topic_policy`: (overrides, effective)."""
        return await self._run(rpcs.get_topic_policy(topic), timeout)

    async def set_topic_policy(
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
        """As `Client.set_topic_policy`: REPLACES the overrides; returns the effective policy."""
        rpc = rpcs.set_topic_policy(
            topic, max_messages, max_bytes, max_age, on_full, keep_uncommitted
        )
        return await self._run(rpc, timeout)

    # -- durable named consumers ------------------------------------------------------------

    async def commit_offset(
        self, consumer: str, topic: str, offset: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """As `Client.commit_offset`: `consumer` has processed `topic` up to `offset`."""
        await self._run(rpcs.commit_offset(consumer, topic, offset), timeout)

    async def committed_offset(
        self, consumer: str, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """As `Client.committed_offset`. Raises NotFound if it committed none there."""
        return await self._run(rpcs.committed_offset(consumer, topic), timeout)

    async def resume_offset(
        self, consumer: str, topic: str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """As `Client.resume_offset`: committed + 1, or 0 with no commit. Raises NotFound
        (no topic)."""
        try:
            return await self.committed_offset(consumer, topic, timeout=timeout) + 1
        except NotFound:
            await self.describe_topic(topic, timeout=timeout)  # NotFound if no topic
            return 0

    async def list_consumers(
        self,
        topic: str | None = None,
        *,
        consumer: str | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> list[ConsumerInfo]:
        """As `Client.list_consumers`: every committed offset, or those on `topic` / of
        `consumer`."""
        return await self._list(rpcs.list_consumers(topic, consumer), timeout)

    async def delete_consumer(
        self, consumer: str, topic: str | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """As `Client.delete_consumer`. Not retried. Raises NotFound."""
        await self._run(rpcs.delete_consumer(consumer, topic), timeout)
