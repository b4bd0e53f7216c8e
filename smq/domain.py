"""Facts every SMQ program shares: defaults, the name rule, the topic policy.

The server checks names and applies policies, the client builds and reads them, the
CLI and the forwarder take them from the command line: each from here. No grpc, no
apsw (the policy's proto conversion takes the message it is given).
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Final

from .errors import InvalidArgument

DEFAULT_HOST: Final = "localhost"
DEFAULT_PORT: Final = 8097
HEARTBEAT_OFFSET: Final = -1  # the offset of StreamConsume's heartbeats (pysmq skips it)

# Topic and consumer names: a superset of the original's [A-Za-z0-9_]{1,35}.
NAME_RULE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
NAME_RULE_TEXT: Final = "1 to 249 characters of A-Z a-z 0-9 . _ -"

ON_FULL_CHOICES: Final = ("reject", "drop-oldest")  # TopicPolicy.on_full


def check_name(name: str, what: str = "topic name") -> None:
    """Raise InvalidArgument unless `name` follows the name rule."""
    if not NAME_RULE.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise InvalidArgument(f"invalid {what} {shown!r}: use {NAME_RULE_TEXT}")


@dataclasses.dataclass(frozen=True)
class TopicPolicy:
    """A topic's retention and disk-full policy.

    In the overrides of a topic, None means "the server's default" (its --retention-*
    and --on-full settings; keep_uncommitted defaults to False); in the effective
    policy every field is set. For the limits, 0 means no limit.

    - `max_messages`: keep at most this many messages (the oldest go first).
    - `max_bytes`: keep at most this many payload bytes.
    - `max_age`: keep messages for this many seconds.
    - `on_full`: when the disk or the database quota is full, "reject" new messages
      (RESOURCE_EXHAUSTED) or "drop-oldest" to make room.
    - `keep_uncommitted`: retention (not `delete_until_offset`) keeps what a named
      consumer has not committed yet.
    """

    max_messages: int | None = None
    max_bytes: int | None = None
    max_age: int | None = None
    on_full: str | None = None
    keep_uncommitted: bool | None = None

    def over(self, defaults: TopicPolicy) -> TopicPolicy:
        """This policy with its unset fields taken from defaults."""
        # Not dataclasses.astuple: it deep-copies every field, and this runs at each commit.
        return TopicPolicy(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(_policy_values(self), _policy_values(defaults))
            )
        )

    @classmethod
    def from_proto(cls, message: Any) -> TopicPolicy:
        """From the wire's TopicPolicy (an unset field is None)."""
        return cls(
            **{
                ours: getattr(message, wire) if message.HasField(wire) else None
                for ours, wire in POLICY_WIRE_NAMES.items()
            }
        )

    def to_proto_fields(self) -> dict[str, Any]:
        """The wire message's fields that are set (unset ones mean the default)."""
        return {
            wire: getattr(self, ours)
            for ours, wire in POLICY_WIRE_NAMES.items()
            if getattr(self, ours) is not None
        }


# TopicPolicy field -> field of the wire's TopicPolicy message
POLICY_WIRE_NAMES: Final = {
    "max_messages": "max_messages",
    "max_bytes": "max_bytes",
    "max_age": "max_age_seconds",
    "on_full": "on_full",
    "keep_uncommitted": "keep_uncommitted",
}
_policy_values = operator.attrgetter(*(f.name for f in dataclasses.fields(TopicPolicy)))


def tcp_address(host: str, port: int) -> str:
    """host:port for gRPC, with an IPv6 literal in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def plural(count: int, word: str) -> str:
    """'1 topic', '2 topics'."""
    return f"{count} {word}{'' if count == 1 else 's'}"
