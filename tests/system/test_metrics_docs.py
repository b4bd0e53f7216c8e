"""The Grafana dashboard (docs/grafana/smq.json) agrees with a real scrape: every metric
name its queries use is a series of a running server's /metrics. The server has had
produces (one by one, in a batch, over a stream), reads, a named consumer's commits, a
failed call and a stream open while it is scraped. (tests/e2e/test_prometheus.py runs
the dashboard's queries in a real Prometheus.)"""
from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import pytest

from smq._proto import smq_pb2
from smq.client import Client
from smq.errors import NotFound
from support.metrics import (
    PROMETHEUS_SERIES,
    Query,
    load_dashboard,
    names_in,
    panels,
    parse_scrape,
    queries,
)
from support.poll import eventually
from support.prometheus import http_get, metrics_address
from support.servers import module_server

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def scrape_of(address: str, until: str = "smq_disk_budget_left_bytes") -> str:
    """/metrics, once it has `until` (the disk budget left: measured by the writer's
    first upkeep, a second after the start)."""
    def scraped() -> str | None:
        status, body = http_get(f"http://{address}/metrics")
        assert status == 200, body
        return body if re.search(rf"(?m)^{until}\b", body) else None

    return eventually(scraped, timeout=15, message=f"no {until} in /metrics")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = module_server(tmp_path_factory, "metrics-docs", "--metrics-port", "0")
    try:
        with Client("127.0.0.1", server.port) as client:
            client.create_topic("sensors")
            client.create_topic("events")
            for i in range(5):
                client.produce("sensors", f"reading {i}")
            client.produce_batch("events", [b"e1", b"e2", b"e3"])
            client.stream_produce("events", [b"e4", b"e5"])
            client.consume("sensors", 1)
            client.bulk_retrieve("events", 1, 10)
            client.commit_offset("uploader", "sensors", 2)
            for _payload, offset in client.subscribe("events", consumer="archiver"):
                if offset == 5:
                    break
            with pytest.raises(NotFound):
                client.consume("missing", 1)
        stream = server.stub().StreamConsume(smq_pb2.ConsumeRequest(topic="sensors", offset=6))
        try:
            next(stream)  # a heartbeat: the stream is open
            yield scrape_of(metrics_address(server.log()))
        finally:
            stream.cancel()
    finally:
        server.close()


def unknown_names(found: list[Query], series: set[str]) -> list[str]:
    """What the queries use that does not exist: metric names missing from the scrape
    (and not made by Prometheus), functions PromQL lacks, queries naming no metric."""
    problems = []
    for query in found:
        metrics, functions = names_in(query.expr)
        problems += [f"{query.where}: no series {name}"
                     for name in sorted(metrics - series - PROMETHEUS_SERIES)]
        problems += [f"{query.where}: no function {name}()" for name in sorted(functions)]
        if not metrics:
            problems.append(f"{query.where}: no metric in {query.expr}")
    return problems


def test_every_metric_a_dashboard_query_names_is_in_a_real_scrape(scrape):
    series, _ = parse_scrape(scrape)
    found = queries(load_dashboard())
    assert len(found) > 30
    assert unknown_names(found, series) == []


def test_a_misspelt_name_in_the_dashboard_is_caught(scrape):
    series, _ = parse_scrape(scrape)
    dashboard = copy.deepcopy(load_dashboard())
    target = next(t for p in panels(dashboard) for t in p.get("targets", []) if "smq_" in t["expr"])
    target["expr"] = target["expr"].replace("smq_", "smq_x", 1)
    [problem] = unknown_names(queries(dashboard), series)
    assert re.search(r": no series smq_x\w+$", problem), problem
    target["expr"] = "rat(" + target["expr"] + ")"
    assert any(p.endswith("no function rat()") for p in unknown_names(queries(dashboard), series))


def test_the_dashboard_is_importable():
    """The shape Grafana's import needs, a data source chosen by a variable, and panels
    laid out on the 24-column grid without overlapping."""
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] == "SMQ" and dashboard["id"] is None
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    topic = variables["topic"]["query"]
    assert re.fullmatch(r"label_values\(smq_topic_stored_messages\{[^}]*\}, topic\)", topic)
    every = panels(dashboard)
    assert len({p["id"] for p in every}) == len(every), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in every:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24, panel["title"]
        taken = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not taken & cells, f"{panel['title']} overlaps another panel"
        cells |= taken
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]

