"""Prometheus itself scrapes a real server's metrics port (--metrics-port 0) and its
query API returns exactly what the test did: messages produced, stored and delivered
per topic, a named consumer's offset and lag, calls by method and status code, an open
stream. Every query of the Grafana dashboard (docs/grafana/smq.json) then runs in that
Prometheus, with its variables filled in: each must parse and return series; and the
alert rules of docs/metrics.md, loaded into it, evaluate without error and stay inactive;
promtool passes its prometheus.yml with them.

Needs Debian's prometheus (tests/support/prometheus.py): skipped without it, failed
without it when SMQ_REQUIRE_PROMETHEUS=1 (as .ci/run sets). Prometheus runs in a
temporary directory of its own, stopped and removed at the end, pass or fail."""
from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from smq import __version__
from smq._proto import smq_pb2
from smq.client import Client
from smq.errors import NotFound
from support.metrics import alert_rules, load_dashboard, marked_block, queries, substitute
from support.poll import eventually
from support.prometheus import Prometheus, http_get, metrics_address, require_prometheus
from support.servers import ServerProcess, module_server

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

PRODUCED = {"a": 7, "b": 4}  # messages produced to each topic, one Produce call each
CONSUMED_A = 3  # Consume calls on topic a: offsets 1-3
COMMITTED_A = 5  # the named consumer "reader" commits offset 5 of topic a
PAYLOAD = "message {} of {}"


@dataclass
class Scraped:
    server: ServerProcess
    prometheus: Prometheus
    metrics_address: str


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """A server that had the module's traffic, with a StreamConsume still open, and a
    Prometheus that has scraped it (more than once) since."""
    require_prometheus()
    server = module_server(tmp_path_factory, "prometheus", "--metrics-port", "0")
    try:
        address = metrics_address(server.log())
        with Prometheus({"smq": [address]}, rules=alert_rules()) as prometheus:
            prometheus.wait_scraped("smq", after=time.time())  # a first sample: rate() needs two
            with Client("127.0.0.1", server.port) as client:
                for topic, count in PRODUCED.items():
                    client.create_topic(topic)
                    for i in range(1, count + 1):
                        client.produce(topic, PAYLOAD.format(i, topic))
                with pytest.raises(NotFound):
                    client.produce("no-such-topic", b"x")
                for offset in range(1, CONSUMED_A + 1):
                    client.consume("a", offset)
                assert len(client.bulk_retrieve("b", 1, 100).messages) == PRODUCED["b"]
                client.commit_offset("reader", "a", COMMITTED_A)
            # A stream waiting past the end of topic a (no message to deliver): open
            # while Prometheus scrapes, as its first heartbeat shows.
            stream = server.stub().StreamConsume(
                smq_pb2.ConsumeRequest(topic="a", offset=PRODUCED["a"] + 1))
            try:
                next(stream)
                done = time.time()
                prometheus.wait_scraped("smq", after=done)
                prometheus.wait_scraped("smq", after=time.time())  # two samples since
                yield Scraped(server, prometheus, address)
            finally:
                stream.cancel()
    finally:
        server.close()


def test_prometheus_scrapes_the_exact_counts(scraped):
    value = scraped.prometheus.value
    total = sum(PRODUCED.values())
    assert value('up{job="smq"}') == 1
    for topic, count in PRODUCED.items():
        size = sum(len(PAYLOAD.format(i, topic)) for i in range(1, count + 1))
        assert value(f'smq_topic_produced_messages_total{{topic="{topic}"}}') == count
        assert value(f'smq_topic_stored_messages{{topic="{topic}"}}') == count
        assert value(f'smq_topic_stored_bytes{{topic="{topic}"}}') == size
        assert value(f'smq_topic_earliest_offset{{topic="{topic}"}}') == 1
        assert value(f'smq_topic_latest_offset{{topic="{topic}"}}') == count
        assert value(f'smq_topic_retention_dropped_messages_total{{topic="{topic}"}}') == 0
    assert value('smq_topic_delivered_messages_total{topic="a"}') == CONSUMED_A
    assert value('smq_topic_delivered_messages_total{topic="b"}') == PRODUCED["b"]
    assert value('smq_consumer_committed_offset{topic="a",consumer="reader"}') == COMMITTED_A
    assert value('smq_consumer_lag_messages{topic="a",consumer="reader"}') == \
        PRODUCED["a"] - COMMITTED_A
    assert value("smq_metrics_consumers_omitted") == 0
    assert value('smq_rpcs_total{method="Produce",code="OK"}') == total
    assert value('smq_rpcs_total{method="Produce",code="NOT_FOUND"}') == 1
    assert value('smq_rpcs_total{method="Consume",code="OK"}') == CONSUMED_A
    assert value('smq_rpcs_total{method="BulkRetrieve",code="OK"}') == 1
    assert value('smq_rpcs_total{method="CommitOffset",code="OK"}') == 1
    assert value('smq_rpcs_total{method="CreateTopic",code="OK"}') == len(PRODUCED)
    assert value('smq_rpc_duration_seconds_count{method="Produce"}') == total + 1
    assert value('smq_open_streams{method="StreamConsume"}') == 1
    assert value('smq_open_streams{method="Subscribe"}') == 0
    # Every message was appended by some commit: the per-commit histogram adds up.
    assert value("smq_commit_messages_sum") == total
    assert 1 <= value("smq_commit_messages_count") <= total
    assert value("smq_commits_total") >= value("smq_commit_messages_count")
    assert value("smq_fsync_duration_seconds_count") >= value("smq_commit_messages_count")
    assert value("smq_topics") == len(PRODUCED)
    assert value(f'smq_build_info{{version="{__version__}"}}') == 1
    assert value("smq_liveness_check_passing") == 1
    assert value("smq_disk_budget_left_bytes") > 0
    assert value("smq_memory_budget_limit_bytes") > 0
    assert value("process_resident_memory_bytes") > 1_000_000


def test_healthz_answers_ok(scraped):
    assert http_get(f"http://{scraped.metrics_address}/healthz") == (200, "ok\n")


@pytest.mark.parametrize("query", queries(load_dashboard()), ids=lambda q: q.where)
def test_every_dashboard_query_returns_series(scraped, query):
    """A panel Grafana would show empty, or a query Prometheus refuses, fails here."""
    expr = substitute(query.expr)
    assert scraped.prometheus.query(expr), f"{query.where}: no series for {expr}"


def test_the_documented_alert_rules_evaluate_and_stay_inactive(scraped):
    def evaluated() -> list[dict]:
        rules = scraped.prometheus.rules()
        # Each evaluated at least once (never: "0001-01-01T00:00:00Z").
        return rules if all(r["lastEvaluation"] > "2000" for r in rules) else []

    rules = eventually(evaluated, timeout=10)
    assert len(rules) >= 5
    assert [(r["name"], r["health"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    # Against this healthy server none is pending or firing; but how fast this machine's
    # disk syncs is not the server's to say.
    assert [(r["name"], r["state"]) for r in rules
            if r["state"] != "inactive" and r["name"] != "SMQFsyncSlow"] == []


def test_the_documented_prometheus_config_passes_promtool(tmp_path):
    require_prometheus()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian's prometheus package has it)"
    config = marked_block("prometheus config")
    assert "smq-alerts.yml" in config
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "smq-alerts.yml").write_text(alert_rules())
    checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout, checked.stdout
