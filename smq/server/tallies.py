"""What the server counts as it runs, for its metrics (metrics.py reads them at a scrape):
histograms, RPCs by method and status, and per-topic counts kept by many threads.

They are plain Python numbers, not prometheus_client's metric objects: the hot paths
(every call, every commit) pay one lock or none and a few additions, and the scrape
turns them into metric families. A histogram written by one thread at a time (the
writer's, under its commit lock) takes no lock; a reader sees it at most one
observation behind.
"""

from __future__ import annotations

import bisect
import threading
import time

# Seconds: from a fast commit or call (0.5 ms) to a slow disk or a long stream.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Messages per commit: one lone Produce up to a writer group's cap (write_lanes.py).
MESSAGES_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000)


class Histogram:
    """Counts per bucket (upper bounds `bounds`, then +Inf) and the sum of what was observed."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """(le, count of observations <= le) up to "+Inf", and the sum: what
        HistogramMetricFamily takes. Its count is the +Inf bucket's."""
        counts, total = list(self.counts), self.sum
        buckets, running = [], 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), counts):
            running += count
            buckets.append((bound, running))
        return buckets, total


def _le(bound: float) -> str:
    return repr(float(bound))


class CallStats:
    """Calls by method: finished ones by status code, their durations, and those in flight.
    Called by the threads that run calls (status.py's wrappers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.in_flight: dict[str, int] = {}

    def begin(self, method: str) -> float:
        with self._lock:
            self.in_flight[method] = self.in_flight.get(method, 0) + 1
        return time.perf_counter()

    def end(self, method: str, code: str, started: float) -> None:
        seconds = time.perf_counter() - started
        with self._lock:
            self.in_flight[method] -= 1
            key = (method, code)
            self.finished[key] = self.finished.get(key, 0) + 1
            histogram = self.durations.get(method)
            if histogram is None:
                histogram = self.durations[method] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[str, Histogram], dict[str, int]]:
        """Copies, consistent with each other."""
        with self._lock:
            durations = {}
            for method, histogram in self.durations.items():
                copy = Histogram(histogram.bounds)
                copy.counts, copy.sum = list(histogram.counts), histogram.sum
                durations[method] = copy
            return dict(self.finished), durations, dict(self.in_flight)


class NoCallStats:
    """CallStats' interface for a server without metrics: nothing counted."""

    def begin(self, method: str) -> float:
        return 0.0

    def end(self, method: str, code: str, started: float) -> None:
        pass


NO_CALL_STATS = NoCallStats()


class Tally:
    """Counts by key, added to by many threads (messages delivered per topic)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, count: int) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + count

    def forget(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class CommitStats:
    """The writer's, kept by one thread at a time (under its commit lock): messages per
    commit, how long commits and their COMMIT statements took, and per topic the messages
    appended and those retention dropped, counted once their transaction committed."""

    def __init__(self) -> None:
        self.messages = Histogram(MESSAGES_BUCKETS)
        self.seconds = Histogram(DURATION_BUCKETS)
        self.sync_seconds = Histogram(DURATION_BUCKETS)
        self.produced: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.also_forget: list[Tally] = []  # others' counts by topic (messages delivered)

    def committed(self, appended: dict[str, int], dropped: dict[str, int], seconds: float) -> None:
        if appended:  # upkeep and liveness commits carry none
            self.messages.observe(sum(appended.values()))
        self.seconds.observe(seconds)
        for counts, changes in ((self.produced, appended), (self.dropped, dropped)):
            for topic, count in changes.items():
                counts[topic] = counts.get(topic, 0) + count

    def forget(self, topic: str) -> None:
        """A deleted topic's counts go with it."""
        self.produced.pop(topic, None)
        self.dropped.pop(topic, None)
        for tally in self.also_forget:
            tally.forget(topic)


class NoTally(Tally):
    """Tally's interface for a server without metrics: nothing kept."""

    def add(self, key: str, count: int) -> None:
        pass

    def forget(self, key: str) -> None:
        pass
