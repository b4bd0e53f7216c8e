"""The metrics' docs agree with a real scrape: every metric name a query of the Grafana
dashboard (docs/grafana/smq.json) or an alert rule of docs/metrics.md uses is a series
of a running server's /metrics, and the tables of docs/metrics.md list exactly the
families the server exposes, with their types and labels. The server has had produces
(one by one, in a batch, over a stream), reads, a named consumer's commits, a failed
call and a stream open while it is scraped.

The bounds of the topic label that docs/metrics.md describes hold: past
--metrics-max-topics, topics are summed under topic="~other" without offsets and their
consumers are only counted; a labelled topic deleted gives its label to the next topic
created, and ~other's counters keep what its deleted topics counted.
(tests/e2e/test_prometheus.py runs the dashboard's queries in a real Prometheus.)"""
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
    alert_queries,
    documented_metrics,
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


def test_every_metric_a_documented_alert_rule_names_is_in_a_real_scrape(scrape):
    series, _ = parse_scrape(scrape)
    assert unknown_names(alert_queries(), series) == []


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


def test_docs_list_every_metric_family_with_its_type_and_labels(scrape):
    _, families = parse_scrape(scrape)
    exposed = {f.name: (f.type, f.labels) for f in families.values()}
    documented = documented_metrics()
    assert sorted(set(exposed) - set(documented)) == [], "exposed, not in docs/metrics.md"
    assert sorted(set(documented) - set(exposed)) == [], "in docs/metrics.md, not exposed"
    wrong = {name: (documented[name], exposed[name]) for name in exposed
             if documented[name] != exposed[name]}
    assert wrong == {}, "documented (type, labels) vs exposed"


def series_of(text: str, name: str) -> dict[str, float]:
    """{topic label (or the whole label set): value} of one family's samples."""
    found = {}
    for labels, value in re.findall(rf"(?m)^{name}(\{{[^}}]*\}})? (\S+)$", text):
        topic = re.search(r'topic="([^"]*)"', labels or "")
        found[topic.group(1) if topic else labels] = float(value)
    return found


def test_consumers_of_topics_under_other_are_counted_as_omitted(start_server):
    server = start_server("--metrics-port", "0", "--metrics-max-topics", "1")
    with Client("127.0.0.1", server.port) as client:
        for topic in ("t1", "t2"):
            client.create_topic(topic)
            client.produce(topic, b"m")
            client.commit_offset("reader", topic, 1)
            client.commit_offset("writer", topic, 1)
        text = scrape_of(metrics_address(server.log()))
    assert set(series_of(text, "smq_consumer_lag_messages")) == {"t1"}
    assert series_of(text, "smq_metrics_consumers_omitted") == {"": 2}  # t2's two


def test_topics_past_the_bound_are_summed_under_other(start_server):
    server = start_server("--metrics-port", "0", "--metrics-max-topics", "2")
    address = metrics_address(server.log())
    with Client("127.0.0.1", server.port) as client:
        for topic, count in (("t1", 1), ("t2", 2), ("t3", 3), ("t4", 4)):
            client.create_topic(topic)
            client.produce_batch(topic, [b"m"] * count)
            client.commit_offset("reader", topic, 1)
        text = scrape_of(address)
        assert series_of(text, "smq_topic_stored_messages") == {"t1": 1, "t2": 2, "~other": 7}
        assert series_of(text, "smq_topic_produced_messages_total") == \
            {"t1": 1, "t2": 2, "~other": 7}
        assert set(series_of(text, "smq_topic_latest_offset")) == {"t1", "t2"}
        assert set(series_of(text, "smq_consumer_lag_messages")) == {"t1", "t2"}

        # A labelled topic deleted: its series end, and its label goes to the next topic
        # created; those under ~other stay there.
        client.delete_topic("t1")
        client.create_topic("t5")
        client.produce_batch("t5", [b"m"] * 5)
        text = scrape_of(address)
        assert series_of(text, "smq_topic_stored_messages") == {"t2": 2, "t5": 5, "~other": 7}
        # A topic under ~other deleted: ~other's stored messages go down, its counters
        # keep what the topic counted (a counter never goes down).
        client.delete_topic("t3")
        text = scrape_of(address)
        assert series_of(text, "smq_topic_stored_messages") == {"t2": 2, "t5": 5, "~other": 4}
        assert series_of(text, "smq_topic_produced_messages_total") == \
            {"t2": 2, "t5": 5, "~other": 7}
