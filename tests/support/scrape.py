"""Reading a metrics port as Prometheus does: GET /metrics, parsed into samples."""

from __future__ import annotations

import http.client
import re

from prometheus_client.parser import text_string_to_metric_families

METRICS_LINE = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")


def metrics_port(log: str) -> int:
    """The metrics port a server's "serving on" line names."""
    match = METRICS_LINE.search(log)
    assert match, f"no metrics port in the log:\n{log}"
    return int(match.group(1))


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of GET path on 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    """One sample's value, or None if the scrape had no such series."""
    return samples.get((name, tuple(sorted(labels.items()))))


def label_values(samples: dict, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for (n, labels) in samples if n == name and label in dict(labels)}
