"""The server's Prometheus metrics (--metrics-port; docs/metrics.md lists them).

ServerMetrics owns the counts kept while the server runs (tallies.py: calls by method
and status, messages delivered per topic; the writer keeps its own) and a registry of
its own whose collector reads them, and the service's state, at each scrape: nothing
is computed for metrics between scrapes beyond those additions.

Topic labels are bounded (Labels): a topic gets its own `topic` label while fewer than
--metrics-max-topics have one (the oldest first), else it is summed under
topic="~other" (no real topic has that name: "~" is not allowed in one), without
offsets. A topic keeps the label it got until it is deleted, and ~other's counters keep
what its deleted topics counted, so that no counter ever goes down. Consumer series are
likewise bounded (MAX_CONSUMER_SERIES), for topics with their own label only.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .. import __version__
from .budget import MemoryBudget
from .schema import file_size
from .service import QueueService
from .tallies import CallStats, Histogram, Tally
from .topic_state import TopicState

OTHER_TOPICS = "~other"
MAX_CONSUMER_SERIES = 1000
STREAMING_RPCS = ("StreamConsume", "Subscribe", "StreamProduce", "ServerReflectionInfo")


class ServerMetrics:
    """Counts for the metrics, and the registry that exposes them once `attach`ed."""

    def __init__(self, max_topics: int) -> None:
        self.max_topics = max_topics
        self.calls = CallStats()
        self.delivered = Tally()
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU, open fds, ...

    def attach(
        self, service: QueueService, budget: MemoryBudget, liveness: Callable[[], str | None]
    ) -> None:
        """Start exposing the server's state (once it exists). `liveness()`: None while
        the liveness check passes, else its reason."""
        service.writer.stats.also_forget.append(self.delivered)  # a deleted topic's counts
        self.registry.register(_Collector(self, service, budget, liveness))


class _Collector:
    def __init__(
        self,
        metrics: ServerMetrics,
        service: QueueService,
        budget: MemoryBudget,
        liveness: Callable[[], str | None],
    ) -> None:
        self.metrics = metrics
        self.service = service
        self.budget = budget
        self.liveness = liveness
        self.labels = Labels(metrics.max_topics)

    def collect(self) -> Iterator[Metric]:
        topics = sorted(self.service.topics(), key=lambda t: t.id)
        own, others = self.labels.assign(topics)
        counts = self._counts(topics)
        retired = self.labels.other_counts(others, counts)
        yield from _topic_families(own, others, counts, retired)
        yield from self._consumers(own)
        yield from self._writer()
        yield from self._calls()
        yield from self._server(len(topics))

    def _counts(self, topics: list[TopicState]) -> dict[str, dict[str, int]]:
        """Per-topic counters by metric name, of existing topics only."""
        names = {t.name for t in topics}
        stats = self.service.writer.stats
        return {
            "produced": {n: c for n, c in dict(stats.produced).items() if n in names},
            "delivered": {n: c for n, c in self.metrics.delivered.snapshot().items() if n in names},
            "dropped": {n: c for n, c in dict(stats.dropped).items() if n in names},
        }

    def _consumers(self, labelled: list[TopicState]) -> Iterator[Metric]:
        committed = GaugeMetricFamily(
            "smq_consumer_committed_offset",
            "Offset a named consumer last committed on a topic",
            labels=["topic", "consumer"],
        )
        lag = GaugeMetricFamily(
            "smq_consumer_lag_messages",
            "Messages stored after a named consumer's committed offset",
            labels=["topic", "consumer"],
        )
        by_id = {t.id: t for t in labelled}
        rows, total = self.service.storage.offsets_of(list(by_id), MAX_CONSUMER_SERIES)
        for name, topic_id, offset in rows:
            topic = by_id[topic_id]
            committed.add_metric([topic.name, name], offset)
            lag.add_metric([topic.name, name], topic.lag_after(offset))
        yield committed
        yield lag
        yield GaugeMetricFamily(
            "smq_metrics_consumers_omitted",
            f"Named consumers without series: past {MAX_CONSUMER_SERIES}, or of a topic "
            "summed under ~other",
            value=total - len(rows),
        )

    def _writer(self) -> Iterator[Metric]:
        writer = self.service.writer
        yield CounterMetricFamily(
            "smq_commits", "Write transactions committed", value=writer.commits
        )
        yield _histogram(
            "smq_commit_messages",
            "Messages appended per commit (commits that appended any)",
            writer.stats.messages,
        )
        yield _histogram(
            "smq_commit_duration_seconds",
            "Time of each commit of the writer: its transaction (BEGIN to COMMIT, the writes "
            "applied) and the upkeep around it (a checkpoint when the WAL is past its share)",
            writer.stats.seconds,
        )
        yield _histogram(
            "smq_fsync_duration_seconds",
            "Time of each COMMIT statement in full durability: SQLite writes the "
            "transaction's WAL frames and fsyncs the WAL in it (commits that wrote something; "
            "normal durability: not kept)",
            writer.stats.sync_seconds,
        )
        yield GaugeMetricFamily(
            "smq_writer_queue_depth", "Writes waiting for the writer", value=writer.queue_depth()
        )

    def _calls(self) -> Iterator[Metric]:
        finished, durations, in_flight = self.metrics.calls.snapshot()
        total = CounterMetricFamily(
            "smq_rpcs", "Calls finished, by method and status code", labels=["method", "code"]
        )
        for (method, code), count in sorted(finished.items()):
            total.add_metric([method, code], count)
        yield total
        duration = HistogramMetricFamily(
            "smq_rpc_duration_seconds", "Time of each call, by method", labels=["method"]
        )
        for method, histogram in sorted(durations.items()):
            buckets, sum_value = histogram.cumulative()
            duration.add_metric([method], buckets, sum_value)
        yield duration
        streams = GaugeMetricFamily(
            "smq_open_streams", "Streams open, by method", labels=["method"]
        )
        for method in STREAMING_RPCS:
            streams.add_metric([method], in_flight.get(method, 0))
        yield streams

    def _server(self, topic_count: int) -> Iterator[Metric]:
        storage = self.service.storage
        info = GaugeMetricFamily(
            "smq_build_info",
            "SMQ's version and the Python that runs it (value 1)",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield GaugeMetricFamily("smq_topics", "Topics that exist", value=topic_count)
        files = GaugeMetricFamily(
            "smq_database_file_bytes", "Size of the database's files", labels=["file"]
        )
        database, wal = file_size(storage.path), file_size(storage.path + "-wal")
        files.add_metric(["database"], database)
        files.add_metric(["wal"], wal)
        yield files
        yield GaugeMetricFamily(
            "smq_disk_budget_used_bytes",
            "What the database takes of the disk budget: its file and its WAL",
            value=database + wal,
        )
        left = self.service.writer.disk_left
        if left is not None:
            yield GaugeMetricFamily(
                "smq_disk_budget_left_bytes",
                "What new messages may still take (--max-db-size, --min-free-space), "
                "measured every second",
                value=max(left, 0),
            )
        yield GaugeMetricFamily(
            "smq_memory_budget_used_bytes",
            "Memory held for calls (--memory-budget)",
            value=self.budget.used,
        )
        yield GaugeMetricFamily(
            "smq_memory_budget_limit_bytes",
            "Memory that calls may hold in all (--memory-budget)",
            value=self.budget.limit,
        )
        yield GaugeMetricFamily(
            "smq_liveness_check_passing",
            "1 while the liveness check (the systemd watchdog's) passes, else 0",
            value=0 if self.liveness() else 1,
        )
        yield GaugeMetricFamily(
            "smq_process_threads", "Threads of the server process", value=_threads()
        )


class Labels:
    """Which topics have their own label (ids; kept until the topic is deleted) and which
    are summed under ~other, with the counts of ~other's topics as last seen and of those
    deleted since (so that ~other's counters never go down). Used by the scrape only."""

    def __init__(self, max_topics: int) -> None:
        self.max_topics = max_topics
        self.own: set[int] = set()
        self.others: dict[int, dict[str, int]] = {}  # topic id -> its counts as last seen
        self.retired: dict[str, int] = {}  # the counts of ~other's deleted topics

    def assign(self, topics: list[TopicState]) -> tuple[list[TopicState], list[TopicState]]:
        """(topics with their own label, topics under ~other), `topics` oldest first."""
        alive = {t.id for t in topics}
        self.own &= alive
        for gone in [i for i in self.others if i not in alive]:
            for key, count in self.others.pop(gone).items():
                self.retired[key] = self.retired.get(key, 0) + count
        for topic in topics:
            if topic.id not in self.own and topic.id not in self.others:
                if len(self.own) < self.max_topics:
                    self.own.add(topic.id)
                else:
                    self.others[topic.id] = {}
        return [t for t in topics if t.id in self.own], [t for t in topics if t.id in self.others]

    def other_counts(
        self, others: list[TopicState], counts: dict[str, dict[str, int]]
    ) -> dict[str, int]:
        """Remember the counts of ~other's topics; return those of its deleted ones."""
        for topic in others:
            self.others[topic.id] = {key: counts[key].get(topic.name, 0) for key in counts}
        return self.retired


def _topic_families(
    own: list[TopicState],
    others: list[TopicState],
    counts: dict[str, dict[str, int]],
    retired: dict[str, int],
) -> Iterator[Metric]:
    """The per-topic families: `own` topics by name, `others` summed under ~other (with
    the `retired` counts of its deleted topics)."""
    gauges = {
        "messages": GaugeMetricFamily(
            "smq_topic_stored_messages", "Messages stored", labels=["topic"]
        ),
        "bytes": GaugeMetricFamily(
            "smq_topic_stored_bytes", "Payload bytes stored", labels=["topic"]
        ),
    }
    earliest = GaugeMetricFamily(
        "smq_topic_earliest_offset", "Offset of the oldest stored message", labels=["topic"]
    )
    latest = GaugeMetricFamily(
        "smq_topic_latest_offset",
        "Offset of the newest message (0: none yet)",
        labels=["topic"],
    )
    counters = {
        "produced": CounterMetricFamily(
            "smq_topic_produced_messages",
            "Messages appended since the server started",
            labels=["topic"],
        ),
        "delivered": CounterMetricFamily(
            "smq_topic_delivered_messages",
            "Messages handed to readers (Consume, StreamConsume, Subscribe, BulkRetrieve) "
            "since the server started",
            labels=["topic"],
        ),
        "dropped": CounterMetricFamily(
            "smq_topic_retention_dropped_messages",
            "Messages retention removed (count, size, age limits, drop-oldest) since the "
            "server started",
            labels=["topic"],
        ),
    }
    for topic in own:
        gauges["messages"].add_metric([topic.name], topic.message_count)
        gauges["bytes"].add_metric([topic.name], topic.stored_bytes)
        if topic.earliest is not None:
            earliest.add_metric([topic.name], topic.earliest)
        latest.add_metric([topic.name], topic.next_offset - 1)
        for key, family in counters.items():
            family.add_metric([topic.name], counts[key].get(topic.name, 0))
    if others or retired:
        gauges["messages"].add_metric([OTHER_TOPICS], sum(t.message_count for t in others))
        gauges["bytes"].add_metric([OTHER_TOPICS], sum(t.stored_bytes for t in others))
        for key, family in counters.items():
            family.add_metric([OTHER_TOPICS], retired.get(key, 0) + _sum_of(counts[key], others))
    yield from gauges.values()
    yield earliest
    yield latest
    yield from counters.values()


def _sum_of(counts: dict[str, int], topics: Iterable[TopicState]) -> int:
    return sum(counts.get(t.name, 0) for t in topics)


def _histogram(name: str, documentation: str, histogram: Histogram) -> Metric:
    buckets, sum_value = histogram.cumulative()
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum_value)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0
