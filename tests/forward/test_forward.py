"""`python -m smq.forward` end to end, against a real SMQ server and a real nats-server
(one, with JetStream, on a loopback port): subjects and ids, commits after acks, the
backlog sent at start and after the upstream returns, resuming from what JetStream
holds, topics that appear later, rate limit, status over sd_notify, mTLS and auth."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from support.certs import make_certs
from support.servers import clean_env, make_topic
from support.forwarding import (NODE, STREAM, ForwarderProcess, NatsServer, add_stream,
                                check_exactly_once_in_order, committed, forward_env, free_ports,
                                produce, read_stream, smq_args, wait_committed)
from support.poll import eventually
from smq._proto import smq_pb2

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("needs_nats"), pytest.mark.timeout(120)]



@pytest.fixture
def nats_server(tmp_path: Path):
    server = NatsServer(tmp_path / "nats", "one", free_ports(1)[0]).start()
    yield server
    server.kill()


@pytest.fixture
def forward(tmp_path: Path):
    """forward(*args, env=) starts `python -m smq.forward` (node `edge`); all are killed
    at the end of the test."""
    started: list[ForwarderProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ForwarderProcess:
        process = ForwarderProcess(["--node", NODE, "--log-interval", "0.5", *args], tmp_path,
                                   env or forward_env())
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


class NotifySocket:
    """A stand-in for systemd's notify socket: every datagram's fields."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()
                                      if "=" in line))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


# -- the main path ------------------------------------------------------------------------------

def test_backlog_is_forwarded_at_start_with_subjects_ids_and_commits(
        smq_server, nats_server, forward, tmp_path):
    stub = smq_server.stub()
    expected = {}
    for topic in ("sensors", "gps.fix"):
        make_topic(stub, topic)
        expected[topic] = produce(stub, topic, 700)
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        forwarder = forward("--topics", "sensors,gps.fix", *smq_args(smq_server),
                            "--nats-servers", nats_server.url, "--create-stream", "--window", "64",
                            env=forward_env(NOTIFY_SOCKET=notify.path))
        wait_committed(stub, expected)
        expected["sensors"] += produce(stub, "sensors", 5, start=701)  # and new ones follow
        wait_committed(stub, expected)
        ready = next(m for m in notify.messages if m.get("READY") == "1")
        assert "backlog 1400 (sensors 700, gps.fix 700)" in ready["STATUS"]
        final = (f"forwarding to {STREAM} at 127.0.0.1:{nats_server.port}; backlog 0 "
                 "(sensors 0, gps.fix 0); forwarded 1405")
        eventually(lambda: any(m.get("STATUS") == final for m in notify.messages), timeout=15,
                   message="a status line after the last message")
        assert forwarder.terminate() == 0
        assert any(m.get("STOPPING") == "1" for m in notify.messages)
    finally:
        notify.close()
    stored = read_stream([nats_server.url], STREAM)
    check_exactly_once_in_order(stored, NODE, expected)
    log = forwarder.log()
    assert f"created JetStream stream '{STREAM}' for smq.{NODE}.>" in log
    assert "backlog 0 (sensors 0, gps.fix 0)" in log  # the periodic backlog line
    assert "stopped: 'sensors' forwarded up to offset 705, committed 705" in log


def test_backlog_drains_after_the_upstream_returns_without_new_traffic(
        smq_server, nats_server, forward):
    stub = smq_server.stub()
    make_topic(stub, "t")
    expected = {"t": produce(stub, "t", 100)}
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
                        "--create-stream", "--ack-timeout", "2s")
    wait_committed(stub, expected)

    nats_server.stop()
    expected["t"] += produce(stub, "t", 300, start=101)
    forwarder.wait_log(r"not forwarding: .*; backlog 300 \(t 300\)", timeout=20)
    time.sleep(1)
    assert committed(stub, "t") == 100
    nats_server.start()
    # Nothing new is produced: the 300 waiting messages go as soon as NATS is back.
    wait_committed(stub, expected, timeout=40)
    assert forwarder.terminate() == 0
    check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)


def test_resumes_after_what_jetstream_holds_even_beyond_the_duplicate_window(
        smq_server, nats_server, forward):
    """A forwarder that died after JetStream's acks but before its commit: the next one
    commits what JetStream holds and sends nothing twice, though the ids have long
    left the (here 1 s) duplicate window."""
    stub = smq_server.stub()
    make_topic(stub, "t")
    expected = {"t": produce(stub, "t", 200)}
    args = ["--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
            "--create-stream", "--duplicate-window", "1s"]
    first = forward(*args)
    wait_committed(stub, expected)
    assert first.terminate() == 0
    stub.CommitOffset(smq_pb2.CommitOffsetRequest(consumer=f"forward-{NODE}", topic="t", offset=50))
    expected["t"] += produce(stub, "t", 20, start=201)
    time.sleep(1.5)

    second = forward(*args)
    wait_committed(stub, expected)
    assert second.terminate() == 0
    assert "JetStream already holds 't' up to offset 200 (committed: 50)" in second.log()
    check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)


def test_waits_for_the_stream_and_for_topics_that_do_not_exist_yet(
        smq_server, nats_server, forward):
    stub = smq_server.stub()
    forwarder = forward("--topics", "later", *smq_args(smq_server),
                        "--nats-servers", nats_server.url)
    forwarder.wait_log(f"stream '{STREAM}' does not exist \\(create it, or pass --create-stream\\)")
    add_stream(nats_server.url)
    forwarder.wait_log("topic 'later' does not exist in SMQ yet; waiting for it")
    make_topic(stub, "later")
    expected = {"later": produce(stub, "later", 10)}
    wait_committed(stub, expected)
    assert forwarder.terminate() == 0
    check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)


def test_a_stream_that_does_not_take_the_subjects_is_reported(smq_server, nats_server, forward):
    add_stream(nats_server.url, subjects="other.>")
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url)
    forwarder.wait_log(f"stream '{STREAM}' does not take subject 'smq.{NODE}.t' "
                       r"\(its subjects: other.>\)")
    assert forwarder.terminate() == 0


def test_start_from_latest_and_a_named_consumer(smq_server, nats_server, forward):
    stub = smq_server.stub()
    make_topic(stub, "t")
    produce(stub, "t", 30)
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
                        "--create-stream", "--start-from", "latest", "--consumer", "cloud")
    eventually(lambda: committed(stub, "t", "cloud") == 30, timeout=20,
               message="the latest offset committed")
    new = produce(stub, "t", 5, start=31)
    eventually(lambda: committed(stub, "t", "cloud") == 35, timeout=20,
               message="the new messages")
    assert forwarder.terminate() == 0
    stored = read_stream([nats_server.url], STREAM)
    assert [m.msg_id for m in stored] == [f"{NODE}/t/{o}" for o in range(31, 36)]
    assert [m.data for m in stored] == new


def test_rate_limit_bounds_the_pace(smq_server, nats_server, forward):
    stub = smq_server.stub()
    make_topic(stub, "t")
    expected = {"t": produce(stub, "t", 300)}
    started = time.monotonic()
    forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
            "--create-stream", "--rate-limit", "200")
    wait_committed(stub, expected)
    assert time.monotonic() - started >= 1.3  # 300 messages at 200/s (a burst of 0.1 s allowed)


def test_messages_deleted_before_they_were_forwarded_are_reported(smq_server, nats_server, forward):
    """Without keep_uncommitted, retention may delete what the forwarder has not sent."""
    stub = smq_server.stub()
    make_topic(stub, "t")
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(topic="t", policy=smq_pb2.TopicPolicy(
        max_messages=10)))
    produce(stub, "t", 5)
    forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers", nats_server.url,
                        "--create-stream", "--ack-timeout", "1s")
    eventually(lambda: committed(stub, "t") == 5, timeout=20, message="the first messages")
    nats_server.stop()
    produce(stub, "t", 40, start=6)  # retention keeps offsets 36..45
    time.sleep(0.5)
    nats_server.start()
    eventually(lambda: committed(stub, "t") == 45, timeout=30, message="the rest")
    assert forwarder.terminate() == 0
    assert "offsets 6 to 35 of 't' were deleted from SMQ before they were forwarded" in forwarder.log()
    stored = read_stream([nats_server.url], STREAM)
    assert [m.msg_id for m in stored] == [f"{NODE}/t/{o}" for o in [*range(1, 6), *range(36, 46)]]


# -- security -----------------------------------------------------------------------------------

def test_mtls_to_smq_and_tls_with_a_client_certificate_and_a_password_file_to_nats(
        start_server, forward, tmp_path):
    certs = make_certs(tmp_path / "certs")
    smq = start_server(env=clean_env(
        SERVER_ENABLE_MTLS="true", SERVER_CERT_FILE=str(certs.server_cert),
        SERVER_KEY_FILE=str(certs.server_key), SERVER_CA_CERT_FILE=str(certs.ca_cert)))
    nats_server = NatsServer(tmp_path / "nats", "tls", free_ports(1)[0], extra_config=f"""
tls {{ cert_file: '{certs.server_cert}', key_file: '{certs.server_key}',
      ca_file: '{certs.ca_cert}', verify: true }}
authorization {{ user: edge, password: s3cret }}
""").start()
    try:
        import grpc
        from smq._proto import smq_pb2_grpc
        channel = grpc.secure_channel(smq.address, grpc.ssl_channel_credentials(
            certs.read("ca_cert"), certs.read("client_key"), certs.read("client_cert")))
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)
        make_topic(stub, "t")
        expected = {"t": produce(stub, "t", 50)}
        env = forward_env(ENABLE_MTLS="true", CLIENT_CERT=str(certs.client_cert),
                          CLIENT_KEY=str(certs.client_key), CA_CERT=str(certs.ca_cert),
                          NATS_URL=f"tls://127.0.0.1:{nats_server.port}", NATS_USER="edge",
                          NATS_CA=str(certs.ca_cert),
                          NATS_CERT=str(certs.client_cert), NATS_KEY=str(certs.client_key))
        password = tmp_path / "nats-password"  # as systemd's LoadCredential= passes it
        password.write_text("s3cret\n")
        password.chmod(0o400)
        forwarder = forward("--topics", "t", *smq_args(smq), "--create-stream",
                            env={**env, "NATS_PASSWORD_FILE": str(password)})
        wait_committed(stub, expected)
        assert forwarder.terminate() == 0
        stored = read_stream([f"tls://127.0.0.1:{nats_server.port}"], STREAM, user="edge",
                             password="s3cret", tls=tls_context(certs))
        check_exactly_once_in_order(stored, NODE, expected)

        # A wrong password is logged, and retried (a service does not give up).
        bad = forward("--topics", "t", *smq_args(smq), "--create-stream",
                      env={**env, "NATS_PASSWORD": "wrong"})
        bad.wait_log(r"cannot connect to NATS at tls://127.0.0.1:\d+: .*[Aa]uthorization")
        assert bad.terminate() == 0
    finally:
        nats_server.kill()


def test_token_authentication(smq_server, forward, tmp_path):
    nats_server = NatsServer(tmp_path / "nats", "token", free_ports(1)[0],
                             extra_config="authorization { token: t0ken }").start()
    try:
        stub = smq_server.stub()
        make_topic(stub, "t")
        expected = {"t": produce(stub, "t", 20)}
        forwarder = forward("--topics", "t", *smq_args(smq_server), "--nats-servers",
                            nats_server.url, "--nats-token", "t0ken", "--create-stream")
        wait_committed(stub, expected)
        assert forwarder.terminate() == 0
        check_exactly_once_in_order(read_stream([nats_server.url], STREAM, token="t0ken"),
                                    NODE, expected)
    finally:
        nats_server.kill()


def test_a_topic_the_smq_acl_denies_is_logged_once_and_the_others_are_forwarded(
        nats_server, forward, tmp_path):
    from support.acl_servers import AclServer
    server = AclServer(make_certs(tmp_path / "certs"), tmp_path,
                       '[identities."edge-forwarder"]\nconsume = ["sensors.*"]\n')
    try:
        server.make_topic("sensors.a", 0)
        server.make_topic("secret.b", 0)
        expected = {"sensors.a": produce(server.local, "sensors.a", 20)}
        produce(server.local, "secret.b", 5)
        cert, key, ca = server.files_of("edge-forwarder")
        env = forward_env(ENABLE_MTLS="true", CLIENT_CERT=cert, CLIENT_KEY=key, CA_CERT=ca)
        forwarder = forward("--topics", "sensors.a,secret.b", "--host", "localhost", "--port",
                            str(server.process.port), "--nats-servers", nats_server.url,
                            "--create-stream", env=env)
        wait_committed(server.local, expected)
        forwarder.wait_log(r"identity \"edge-forwarder\" may not consume from or administer "
                           r"topic \"secret.b\".*not forwarding 'secret.b', trying again every")
        assert forwarder.log().count("may not consume") == 1, forwarder.log()
        assert committed(server.local, "secret.b") is None
        assert forwarder.terminate() == 0
        check_exactly_once_in_order(read_stream([nats_server.url], STREAM), NODE, expected)
    finally:
        server.close()


def tls_context(certs):
    import ssl
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def test_a_message_larger_than_nats_takes_stops_its_topic_with_a_clear_error(
        start_server, forward, tmp_path):
    smq = start_server("--max-message-size", "2MiB")
    nats_server = NatsServer(tmp_path / "nats", "small", free_ports(1)[0],
                             extra_config="max_payload: 65536").start()
    try:
        stub = smq.stub()
        make_topic(stub, "t")
        produce(stub, "t", 3)
        stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"x" * 100_000), timeout=10)
        forwarder = forward("--topics", "t", *smq_args(smq), "--nats-servers", nats_server.url,
                            "--create-stream")
        forwarder.wait_log(r"edge/t/4 is 100000 bytes, more than the NATS server takes "
                           r"\(max_payload 65536\)")
        eventually(lambda: committed(stub, "t") == 3, timeout=10,
                   message="the messages before it")
        assert forwarder.terminate() == 0
    finally:
        nats_server.kill()
