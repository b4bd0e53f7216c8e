"""What the forwarding engine is told to do (Plan, from the configuration) and what it
knows of each topic as it goes (ForwardedTopic). Plain data: made by smq.forward.main,
read and updated by the engine's tasks on the event loop's thread.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to forward where, and how fast (the engine's part of the configuration)."""

    topics: tuple[str, ...]
    node: str
    subject_prefix: str
    stream: str
    window: int = 256
    rate_limit: float = 0.0  # messages per second; 0: no limit
    ack_timeout: float = 10.0  # seconds
    start_from: str = "earliest"  # where a topic without a committed offset starts
    create_stream: bool = False
    replicas: int = 1
    duplicate_window: float = 120.0  # seconds, for a stream we create
    log_interval: float = 60.0  # seconds between backlog lines in the log

    def subject(self, topic: str) -> str:
        return f"{self.subject_prefix}.{self.node}.{topic}"

    @property
    def subjects(self) -> str:
        """The namespace this node publishes in (and a created stream takes)."""
        return f"{self.subject_prefix}.{self.node}.>"

    def id_prefix(self, topic: str) -> str:
        """What the Nats-Msg-Id of each of topic's messages starts with (then its offset)."""
        return f"{self.node}/{topic}/"


@dataclasses.dataclass
class ForwardedTopic:
    """What the forwarder knows of one topic. Offsets are SMQ offsets."""

    name: str
    subject: str
    id_prefix: str  # Nats-Msg-Id without the offset
    state: str = "starting"
    committed: int | None = None  # the consumer's committed offset in SMQ
    acked: int = 0  # highest offset JetStream has stored (gap-free below)
    earliest: int = 0  # SMQ's offsets, as last seen (0: no message)
    latest: int = 0
    forwarded: int = 0  # acknowledged by JetStream since start
    sent: int = 0  # highest offset published since start

    @property
    def backlog(self) -> int:
        """SMQ's latest offset minus the committed one (or all it stores, before a commit)."""
        done = self.committed if self.committed is not None else max(self.earliest - 1, 0)
        return max(self.latest - done, 0)

    @property
    def lag(self) -> int:
        """Messages SMQ stores after the last offset JetStream acknowledged (or that was
        committed, if more), as far as the forwarder knows SMQ's latest offset."""
        done = max(self.acked, self.committed or 0, self.earliest - 1)
        return max(self.latest - done, 0)

    def offset_of(self, msg_id: str | None) -> int | None:
        if msg_id and msg_id.startswith(self.id_prefix) and msg_id[len(self.id_prefix) :].isdigit():
            return int(msg_id[len(self.id_prefix) :])
        return None
