"""The Prometheus metrics of `smq forward` (--metrics-port; docs/forwarding.md lists them).

ForwardMetrics owns a registry of its own: process_* (prometheus_client's
ProcessCollector) and a collector that reads, at each scrape, what the forwarder keeps
anyway: per topic (ForwardedTopic) the messages JetStream acknowledged, the offsets and
the lag; each side's failures by kind (tallies.py); whether NATS is connected; and the
/healthz rule (Forwarder.health_problem). Nothing is computed for the metrics between
scrapes.

A scrape runs on the metrics listener's thread and only reads numbers and strings that
the event loop replaces whole. Topic labels are the configured --topics: bounded.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from .engine import Forwarder


class ForwardMetrics:
    """The registry /metrics serves and the answer of /healthz, once `attach`ed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU, open fds, ...
        self._forwarder: Forwarder | None = None

    def attach(self, forwarder: Forwarder) -> None:
        """Start exposing `forwarder` (once it exists)."""
        self._forwarder = forwarder
        self.registry.register(_Collector(forwarder))

    def health(self) -> str | None:
        """None while forwarding works, else why not (one line): /healthz."""
        if self._forwarder is None:
            return "starting"
        return self._forwarder.health_problem()


class _Collector:
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def collect(self) -> Iterator[Metric]:
        yield from self._topics()
        yield from self._errors()
        forwarder = self.forwarder
        yield GaugeMetricFamily(
            "smq_forward_nats_connected",
            "1 while the connection to NATS is up, else 0",
            value=1 if forwarder.upstream.connected else 0,
        )
        yield GaugeMetricFamily(
            "smq_forward_healthy",
            "1 while /healthz answers 200 (forwarding works), else 0",
            value=0 if forwarder.health_problem() else 1,
        )
        info = GaugeMetricFamily(
            "smq_forward_build_info", "SMQ's version (value 1)", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

    def _topics(self) -> Iterator[Metric]:
        forwarded = CounterMetricFamily(
            "smq_forward_messages",
            "Messages forwarded: published and acknowledged by JetStream, since the start",
            labels=["topic"],
        )
        lag = GaugeMetricFamily(
            "smq_forward_lag_messages",
            "Messages SMQ stores after the last forwarded offset (SMQ's latest offset as "
            "last read: with each page, and every few seconds)",
            labels=["topic"],
        )
        last = GaugeMetricFamily(
            "smq_forward_last_forwarded_offset",
            "Highest offset JetStream holds from this forwarder (gap-free up to it; "
            "0: none yet, or not known yet)",
            labels=["topic"],
        )
        committed = GaugeMetricFamily(
            "smq_forward_committed_offset",
            "Offset the forwarder's SMQ consumer committed, as last known (no sample: none)",
            labels=["topic"],
        )
        for topic in self.forwarder.topics:
            forwarded.add_metric([topic.name], topic.forwarded)
            lag.add_metric([topic.name], topic.lag)
            last.add_metric([topic.name], topic.acked)
            if topic.committed is not None:
                committed.add_metric([topic.name], topic.committed)
        yield from (forwarded, lag, last, committed)

    def _errors(self) -> Iterator[Metric]:
        sides = (
            (
                "smq_forward_upstream_errors",
                "Failures on the NATS JetStream side, by kind",
                self.forwarder.upstream.errors.snapshot(),
            ),
            (
                "smq_forward_smq_errors",
                "Calls to the SMQ server that failed, by kind",
                self.forwarder.source.errors.snapshot(),
            ),
        )
        for name, documentation, counts in sides:
            family = CounterMetricFamily(name, documentation, labels=["kind"])
            for kind, count in counts.items():
                family.add_metric([kind], count)
            yield family
