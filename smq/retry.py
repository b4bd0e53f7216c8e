"""How long to wait before trying again: shared by the client and the forwarder."""

from __future__ import annotations

import random

DOUBLINGS_MAX = 64  # past this the delay is the cap anyway; 2.0**1024 would overflow a float


def backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds before retry number `attempt` (0-based): `first`, doubling up to `cap`,
    then 50-100% of that at random, so that callers that failed together spread out.
    Callers that retry forever (a server down for days) stay at the cap."""
    return min(cap, first * 2.0 ** min(attempt, DOUBLINGS_MAX)) * random.uniform(0.5, 1.0)
