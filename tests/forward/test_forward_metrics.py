"""`smq forward --metrics-port`, end to end: a real SMQ server process, a real nats-server
and the forwarder as a child process, its /metrics read over HTTP as Prometheus reads
it. Counts are exact (N messages forwarded: the counter grew by N, and the stream holds
N); the lag grows while NATS is away and drains after; each side's failures are counted
by kind; /healthz is 503 with a one-line reason while forwarding does not work (NATS
away, SMQ away, a topic denied, a message NATS refuses) and 200 again once it does.
(A port that cannot be had: test_forward_config.py.)"""
from __future__ import annotations

import http.client
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import smq
from smq.forward.tallies import SMQ_ERRORS, UPSTREAM_ERRORS
from support.certs import make_certs
from support.forwarding import (NODE, STREAM, ForwarderProcess, NatsServer, add_stream,
                                check_exactly_once_in_order, committed, forward_env, free_ports,
                                produce, read_stream, smq_args, wait_committed)
from support.poll import eventually
from support.servers import make_topic
from smq._proto import smq_pb2

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("needs_nats"), pytest.mark.timeout(180)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def nats_server(tmp_path: Path):
    server = NatsServer(tmp_path / "nats", "one", free_ports(1)[0]).start()
    yield server
    server.kill()


@pytest.fixture
def forward(tmp_path: Path):
    """forward(*args, env=) starts `python -m smq.forward` (node `edge`, status every
    0.5 s) with its metrics on a free loopback port; all are killed at the end."""
    started: list[ForwarderProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ForwarderProcess:
        process = ForwarderProcess(["--node", NODE, "--log-interval", "0.5",
                                    "--metrics-port", "0", *args], tmp_path, env or forward_env())
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def metrics_port(forwarder: ForwarderProcess) -> int:
    """The port the forwarder's start line names (it binds port 0: any free one)."""
    match = forwarder.wait_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
    return int(match.group(1))


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET path on 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def by_topic(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["topic"]: v for (n, labels), v in samples.items() if n == name}


def errors(samples: Samples, side: str) -> dict[str, float]:
    name = f"smq_forward_{side}_errors_total"
    return {dict(labels)["kind"]: v for (n, labels), v in samples.items() if n == name}


def healthz(port: int) -> tuple[int, str]:
    status, body = get(port, "/healthz")
    assert body.endswith("\n") and body.count("\n") == 1, repr(body)  # one line
    return status, body.rstrip("\n")


# -- exact counts -------------------------------------------------------------------------------

def test_counts_are_exactly_what_jetstream_acknowledged(smq_server, nats_server, forward):
    stub = smq_server.stub()
    expected = {}
    for topic, count in (("sensors", 700), ("gps.fix", 300)):
        make_topic(stub, topic)
        expected[topic] = produce(stub, topic, count)
    forwarder = forward("--topics", "sensors,gps.fix", *smq_args(smq_server),
                        "--nats-servers", nats_server.url, "--create-stream", "--window", "64")
    port = metrics_port(forwarder)
    wait_committed(stub, expected)

    # Committed in SMQ only after JetStream's acknowledgement: the counts are final.
    samples = scrape(port)
    assert by_topic(samples, "smq_forward_messages_total") == {"sensors": 700, "gps.fix": 300}
    assert by_topic(samples, "smq_forward_last_forwarded_offset") == {"sensors": 700,
                                                                      "gps.fix": 300}
    eventually(lambda: by_topic(scrape(port), "smq_forward_committed_offset")
               == {"sensors": 700, "gps.fix": 300}, timeout=10)
    assert by_topic(samples, "smq_forward_lag_messages") == {"sensors": 0, "gps.fix": 0}
    assert errors(samples, "upstream") == dict.fromkeys(UPSTREAM_ERRORS, 0)
    assert errors(samples, "smq") == dict.fromkeys(SMQ_ERRORS, 0)
    assert value(samples, "smq_forward_nats_connected") == 1
    assert value(samples, "smq_forward_healthy") == 1
    assert [dict(labels)["version"] for (n, labels) in samples
            if n == "smq_forward_build_info"] == [smq.__version__]
    assert value(samples, "process_open_fds") > 0  # the ProcessCollector's
    assert healthz(port) == (200, "ok")

    # N more: the counter grows by exactly N.
    expected["sensors"] += produce(stub, "sensors", 55, start=701)
    wait_committed(stub, expected)
    samples = scrape(port)
    assert by_topic(samples, "smq_forward_messages_total") == {"sensors": 755, "gps.fix": 300}
    assert value(samples, "smq_forward_last_forwarded_offset", topic="sensors") == 755
    assert forwarder.terminate() == 0
    stored = read_stream([nats_server.url], STREAM)
    assert len(stored) == 1055
    check_exactly_once_in_order(stored, NODE, expected)


def test_metric_types_and_labels(smq_server, nats_server, forward):
    stub = smq_server.stub()
    make_topic(stub, "t")
    forwarder = forward("--topics", "t,later", *smq_args(smq_server),
                        "--nats-servers", nats_server.url, "--create-stream")
    port = metrics_port(forwarder)
    forwarder.wait_log("forwarding t, later from SMQ")
    status, body = get(port, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    kinds = {name: families[name].type for name in families if name.startswith("smq_forward")}
    assert kinds == {
        "smq_forward_messages": "counter",
        "smq_forward_lag_messages": "gauge",
        "smq_forward_last_forwarded_offset": "gauge",
        "smq_forward_committed_offset": "gauge",
        "smq_forward_upstream_errors": "counter",
        "smq_forward_smq_errors": "counter",
        "smq_forward_nats_connected": "gauge",
        "smq_forward_healthy": "gauge",
        "smq_forward_build_info": "gauge",
    }
    # One series per configured topic: a topic that does not exist yet has its own, at 0.
    samples = scrape(port)
    assert by_topic(samples, "smq_forward_messages_total") == {"t": 0, "later": 0}
    assert healthz(port) == (200, "ok")  # a topic not created yet: nothing to forward
    assert forwarder.terminate() == 0


# -- NATS away, then back -----------------------------------------------------------------------

def test_while_nats_is_away_the_lag_grows_errors_are_counted_and_healthz_is_503(
        smq_server, nats_server, forward):
    stub = smq_server.stub()
    make_topic(stub, "t")
    expected = {"t": produce(stub, "t", 100)}
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
                        "--create-stream", "--ack-timeout", "2s")
    port = metrics_port(forwarder)
    wait_committed(stub, expected)
    eventually(lambda: healthz(port) == (200, "ok"), timeout=10)

    nats_server.stop()
    status, reason = eventually(lambda: (h := healthz(port))[0] == 503 and h, timeout=15)
    assert "NATS" in reason, reason
    expected["t"] += produce(stub, "t", 300, start=101)
    eventually(lambda: value(scrape(port), "smq_forward_lag_messages", topic="t") == 300,
               timeout=15, message="the lag of 300 new messages")
    expected["t"] += produce(stub, "t", 50, start=401)
    eventually(lambda: value(scrape(port), "smq_forward_lag_messages", topic="t") == 350,
               timeout=15, message="the lag growing to 350")
    samples = eventually(lambda: (s := scrape(port)) and errors(s, "upstream")["connect"] >= 1
                         and s, timeout=30, message="a failed connection attempt counted")
    assert value(samples, "smq_forward_messages_total", topic="t") == 100
    assert value(samples, "smq_forward_last_forwarded_offset", topic="t") == 100
    assert value(samples, "smq_forward_committed_offset", topic="t") == 100
    assert value(samples, "smq_forward_nats_connected") == 0
    assert value(samples, "smq_forward_healthy") == 0
    upstream = errors(samples, "upstream")
    assert upstream["disconnect"] == 1  # one loss, however many reconnect attempts
    assert upstream["publish"] == upstream["stream"] == 0
    assert errors(samples, "smq") == dict.fromkeys(SMQ_ERRORS, 0)
    assert healthz(port)[0] == 503
    assert committed(stub, "t") == 100

    nats_server.start()
    eventually(lambda: healthz(port) == (200, "ok"), timeout=40, message="healthz 200 again")
    wait_committed(stub, expected, timeout=40)
    samples = scrape(port)
    assert value(samples, "smq_forward_messages_total", topic="t") == 450
    assert value(samples, "smq_forward_lag_messages", topic="t") == 0
    assert value(samples, "smq_forward_nats_connected") == 1
    assert value(samples, "smq_forward_healthy") == 1
    assert errors(samples, "upstream")["disconnect"] == 1
    assert forwarder.terminate() == 0
    check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)


# -- SMQ away, then back ------------------------------------------------------------------------

def test_while_smq_is_away_healthz_is_503_and_failed_calls_are_counted(
        start_server, nats_server, forward):
    smq_server = start_server("--heartbeat-interval", "0.2")
    stub = smq_server.stub()
    make_topic(stub, "t")
    expected = {"t": produce(stub, "t", 20)}
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
                        "--create-stream")
    port = metrics_port(forwarder)
    wait_committed(stub, expected)
    eventually(lambda: healthz(port) == (200, "ok"), timeout=10)

    assert smq_server.terminate() == 0
    status, reason = eventually(lambda: (h := healthz(port))[0] == 503 and h, timeout=20)
    assert reason.startswith("topic 't': SMQ unavailable: could not ") and "UNAVAILABLE" in reason
    samples = eventually(lambda: (s := scrape(port)) and errors(s, "smq")["unavailable"] >= 1
                         and s, timeout=10)
    assert errors(samples, "smq")["access_denied"] == errors(samples, "smq")["other"] == 0
    assert value(samples, "smq_forward_nats_connected") == 1
    assert value(samples, "smq_forward_healthy") == 0

    smq_server = start_server("--heartbeat-interval", "0.2", port=str(smq_server.port))
    stub = smq_server.stub()
    eventually(lambda: healthz(port) == (200, "ok"), timeout=40, message="healthz 200 again")
    expected["t"] += produce(stub, "t", 10, start=21)
    wait_committed(stub, expected)
    assert value(scrape(port), "smq_forward_messages_total", topic="t") == 30
    assert forwarder.terminate() == 0
    check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)


# -- topics that cannot be forwarded ------------------------------------------------------------

def test_a_denied_topic_is_counted_and_named_by_healthz(nats_server, forward, tmp_path):
    from support.acl_servers import AclServer
    server = AclServer(make_certs(tmp_path / "certs"), tmp_path,
                       '[identities."edge-forwarder"]\nconsume = ["sensors.*"]\n')
    try:
        server.make_topic("sensors.a", 0)
        server.make_topic("secret.b", 0)
        expected = {"sensors.a": produce(server.local, "sensors.a", 20)}
        cert, key, ca = server.files_of("edge-forwarder")
        env = forward_env(ENABLE_MTLS="true", CLIENT_CERT=cert, CLIENT_KEY=key, CA_CERT=ca)
        forwarder = forward("--topics", "sensors.a,secret.b", "--host", "localhost", "--port",
                            str(server.process.port), "--nats-servers", nats_server.url,
                            "--create-stream", env=env)
        port = metrics_port(forwarder)
        wait_committed(server.local, expected)
        status, reason = eventually(lambda: (h := healthz(port))[0] == 503 and h, timeout=20)
        assert reason.startswith("topic 'secret.b': access denied: could not "), reason
        samples = scrape(port)
        assert errors(samples, "smq")["access_denied"] >= 1
        assert errors(samples, "smq")["unavailable"] == errors(samples, "smq")["other"] == 0
        assert by_topic(samples, "smq_forward_messages_total") == {"sensors.a": 20,
                                                                   "secret.b": 0}
        assert value(samples, "smq_forward_healthy") == 0
        assert forwarder.terminate() == 0
    finally:
        server.close()


def test_a_message_nats_refuses_is_counted_and_named_by_healthz(start_server, forward, tmp_path):
    smq_server = start_server("--max-message-size", "2MiB")
    nats_server = NatsServer(tmp_path / "nats", "small", free_ports(1)[0],
                             extra_config="max_payload: 65536").start()
    try:
        stub = smq_server.stub()
        make_topic(stub, "t")
        produce(stub, "t", 3)
        stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x" * 100_000), timeout=10)
        forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers",
                            nats_server.url, "--create-stream")
        port = metrics_port(forwarder)
        eventually(lambda: errors(scrape(port), "upstream")["publish"] >= 1, timeout=20,
                   message="the refusal counted")
        # The three before it, however late their acknowledgements came: counted once.
        eventually(lambda: value(scrape(port), "smq_forward_messages_total", topic="t") == 3,
                   timeout=20, message="3 messages forwarded")
        assert value(scrape(port), "smq_forward_lag_messages", topic="t") == 1
        status, reason = eventually(lambda: (h := healthz(port))[0] == 503 and h, timeout=20)
        assert reason.startswith("not forwarding: edge/t/4 is 100000 bytes, more than the NATS"), \
            reason
        assert forwarder.terminate() == 0
    finally:
        nats_server.kill()


def test_a_stream_that_does_not_take_the_subjects_is_counted(smq_server, nats_server, forward):
    add_stream(nats_server.url, subjects="other.>")
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url)
    port = metrics_port(forwarder)
    samples = eventually(lambda: (s := scrape(port)) and errors(s, "upstream")["stream"] >= 1
                         and s, timeout=20)
    assert value(samples, "smq_forward_nats_connected") == 1
    status, reason = healthz(port)
    assert (status, reason) == (503, f"not forwarding: JetStream stream '{STREAM}' does not take "
                                     f"subject 'smq.{NODE}.t' (its subjects: other.>)")
    assert forwarder.terminate() == 0
