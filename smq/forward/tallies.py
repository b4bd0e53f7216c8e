"""What `smq forward` counts as it runs, for its metrics (metrics.py reads them at a
scrape): failures of each side by kind. Messages forwarded are counted per topic on
ForwardedTopic (plan.py).

Plain numbers, added on the event loop's thread and read by the metrics thread: each
`Tally` has a fixed set of kinds, every one present from the start (a scrape shows them
at 0, and the labels stay bounded), so the reader copies a dict that never changes size.
"""

from __future__ import annotations

from collections.abc import Iterable

# NATS JetStream (jetstream.py), by kind:
UPSTREAM_ERRORS = (
    "connect",  # no NATS server answered a connection attempt, or it did not come back in time
    "disconnect",  # an established connection was lost (nats-py then reconnects by itself)
    "publish",  # JetStream refused a message, or no stream answered (no responders)
    "ack_timeout",  # no acknowledgement within --ack-timeout
    "stream",  # the stream is missing, takes none of the subjects, or its API calls failed
)
# The SMQ server (source.py): calls that failed, by kind. NOT_FOUND answers are not
# failures here (a topic that does not exist yet, a consumer that never committed).
SMQ_ERRORS = (
    "unavailable",  # UNAVAILABLE or DEADLINE_EXCEEDED: not reachable, or too slow
    "access_denied",  # PERMISSION_DENIED: the server's access rules
    "other",  # any other status (UNAUTHENTICATED, RESOURCE_EXHAUSTED, INTERNAL, ...)
)


class Tally:
    """A count per kind, for a fixed set of kinds."""

    def __init__(self, kinds: Iterable[str]) -> None:
        self._counts = dict.fromkeys(kinds, 0)

    def add(self, kind: str) -> None:
        self._counts[kind] += 1  # KeyError for a kind not in the set: a bug

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)
