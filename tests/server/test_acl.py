"""Topic rights per client certificate (--acl-file, docs/operations.md "Access control"),
against real mTLS servers with certificates made in the test, one per identity (CN):
every RPC of smq.proto with every right, allowed and denied (a denied call answers
PERMISSION_DENIED naming the identity, the right and the topic, and changes nothing);
streams denied before their first message; listings filtered; the "*" and "@local"
tables; --allow-remote-writes=false on top; SIGHUP with a good, then a bad file; denials
logged once per identity and topic; and every unusable file refused at start in one line
(exit 2) that names the file and the line."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from smq._proto import smq_pb2 as pb, smq_pb2_grpc
from smq.server import access
from support.acl_servers import TIMEOUT, AclServer
from support.certs import CertSet, make_certs
from support.poll import eventually
from support.servers import SERVER_COMMAND, assert_one_line_refusal, clean_env, start_and_fail

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

ACL = """\
[identities."producer"]
produce = ["sensors.*"]
[identities."consumer"]
consume = ["sensors.*"]
[identities."admin"]
admin = ["sensors.*"]
[identities."elsewhere"]       # every right, on other topics
produce = ["other.*"]
consume = ["other.*"]
admin = ["other.*"]
[identities."lister"]
consume = ["a.*"]
admin = ["b.*"]
[identities."ops"]
admin = ["*"]
"""
RIGHT_HOLDERS = {"producer": "produce", "consumer": "consume", "admin": "admin"}
IDENTITIES = [*RIGHT_HOLDERS, "elsewhere", "nobody"]  # "nobody" has no table, and there is no "*"

# What each RPC needs, as docs/operations.md states it: any one of the rights listed
# (None: only an accepted certificate). Written out here, not taken from access.RULES.
NEEDS: dict[str, set[str] | None] = {
    "Connect": None,
    "GetServerInfo": None,
    "Produce": {"produce"},
    "ProduceBatch": {"produce"},
    "StreamProduce": {"produce"},
    "Consume": {"consume"},
    "StreamConsume": {"consume"},
    "BulkRetrieve": {"consume"},
    "Subscribe": {"consume"},
    "CommitOffset": {"consume"},
    "GetEarliestOffset": {"consume", "admin"},
    "GetLatestOffset": {"consume", "admin"},
    "DescribeTopic": {"consume", "admin"},
    "GetTopicPolicy": {"consume", "admin"},
    "GetCommittedOffset": {"consume", "admin"},
    "ListTopics": {"consume", "admin"},
    "ListConsumers": {"consume", "admin"},
    "CreateTopic": {"admin"},
    "DeleteTopic": {"admin"},
    "DeleteUntilOffset": {"admin"},
    "SetTopicPolicy": {"admin"},
    "DeleteConsumer": {"admin"},
}
LISTINGS = {"ListTopics", "ListConsumers"}  # filtered for identities with a table


class Hidden(Exception):
    """A listing left out the case's topic."""


def first(stream) -> object:
    try:
        return next(iter(stream))
    finally:
        stream.cancel()


def listed(names: list[str], topic: str) -> None:
    if topic not in names:
        raise Hidden(topic)


# Each RPC, called on the case's topic (made with 3 messages and consumer "c" at 1); an
# allowed call succeeds.
CALLS: dict[str, Callable[[smq_pb2_grpc.SuhaibMessageQueueStub, str], object]] = {
    "Connect": lambda s, t: s.Connect(pb.ConnectRequest(), timeout=TIMEOUT),
    "GetServerInfo": lambda s, t: s.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT),
    "Produce": lambda s, t: s.Produce(pb.ProduceRequest(topic=t, message=b"x"), timeout=TIMEOUT),
    "ProduceBatch": lambda s, t: s.ProduceBatch(
        pb.ProduceBatchRequest(topic=t, messages=[b"x", b"y"]), timeout=TIMEOUT),
    "StreamProduce": lambda s, t: s.StreamProduce(
        iter([pb.ProduceRequest(topic=t, message=b"x")]), timeout=TIMEOUT),
    "Consume": lambda s, t: s.Consume(pb.ConsumeRequest(topic=t, offset=1), timeout=TIMEOUT),
    "StreamConsume": lambda s, t: first(
        s.StreamConsume(pb.ConsumeRequest(topic=t, offset=1), timeout=TIMEOUT)),
    "BulkRetrieve": lambda s, t: s.BulkRetrieve(
        pb.BulkRetrieveRequest(topic=t, start_offset=1, limit=10), timeout=TIMEOUT),
    "Subscribe": lambda s, t: first(
        s.Subscribe(pb.SubscribeRequest(topic=t, offset=1), timeout=TIMEOUT)),
    "CommitOffset": lambda s, t: s.CommitOffset(
        pb.CommitOffsetRequest(consumer="c", topic=t, offset=2), timeout=TIMEOUT),
    "GetEarliestOffset": lambda s, t: s.GetEarliestOffset(
        pb.GetEarliestOffsetRequest(topic=t), timeout=TIMEOUT),
    "GetLatestOffset": lambda s, t: s.GetLatestOffset(
        pb.GetLatestOffsetRequest(topic=t), timeout=TIMEOUT),
    "DescribeTopic": lambda s, t: s.DescribeTopic(pb.DescribeTopicRequest(topic=t), timeout=TIMEOUT),
    "GetTopicPolicy": lambda s, t: s.GetTopicPolicy(
        pb.GetTopicPolicyRequest(topic=t), timeout=TIMEOUT),
    "GetCommittedOffset": lambda s, t: s.GetCommittedOffset(
        pb.GetCommittedOffsetRequest(consumer="c", topic=t), timeout=TIMEOUT),
    "ListTopics": lambda s, t: listed(
        [i.name for i in s.ListTopics(pb.ListTopicsRequest(), timeout=TIMEOUT).topics], t),
    "ListConsumers": lambda s, t: listed(
        [c.topic for c in s.ListConsumers(pb.ListConsumersRequest(consumer="c"),
                                          timeout=TIMEOUT).consumers], t),
    "CreateTopic": lambda s, t: s.CreateTopic(pb.CreateTopicRequest(topic=t + ".new"),
                                              timeout=TIMEOUT),
    "DeleteTopic": lambda s, t: s.DeleteTopic(pb.DeleteTopicRequest(topic=t), timeout=TIMEOUT),
    "DeleteUntilOffset": lambda s, t: s.DeleteUntilOffset(
        pb.DeleteUntilOffsetRequest(topic=t, offset=2), timeout=TIMEOUT),
    "SetTopicPolicy": lambda s, t: s.SetTopicPolicy(
        pb.SetTopicPolicyRequest(topic=t, policy=pb.TopicPolicy(max_messages=100)), timeout=TIMEOUT),
    "DeleteConsumer": lambda s, t: s.DeleteConsumer(
        pb.DeleteConsumerRequest(consumer="c", topic=t), timeout=TIMEOUT),
}


def denial(call: Callable[[], object]) -> str:
    """The details of the PERMISSION_DENIED the call must end with."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    assert dict(caught.value.trailing_metadata() or ()).get("smq-reason") == "access-denied"
    return caught.value.details()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def server(certs: CertSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    server = AclServer(certs, tmp_path_factory.mktemp("acl"), ACL)
    yield server
    server.close()


# -- every RPC, every right ---------------------------------------------------------------

def test_the_tables_cover_every_rpc_of_the_proto():
    """A new RPC fails here until it has a rule (access.RULES) and a case in this file."""
    assert set(NEEDS) == set(CALLS) == access.service_methods() == set(access.RULES)


@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize("rpc", sorted(access.service_methods()))
def test_every_rpc_with_every_right(server: AclServer, rpc: str, identity: str):
    topic = f"sensors.{rpc}.{identity}"
    server.make_topic(topic)
    server.local.CommitOffset(pb.CommitOffsetRequest(consumer="c", topic=topic, offset=1),
                              timeout=TIMEOUT)
    needs = NEEDS[rpc]  # KeyError: an RPC of the proto without a case here
    allowed = needs is None or RIGHT_HOLDERS.get(identity) in needs
    call = CALLS[rpc]
    stub = server.stub(identity)
    if allowed:
        call(stub, topic)
        return
    before = server.state(topic), server.state(topic + ".new")
    if rpc in LISTINGS and identity != "nobody":
        with pytest.raises(Hidden):
            call(stub, topic)
    else:
        details = denial(lambda: call(stub, topic))
        assert f'identity "{identity}" may not ' in details, details
        if rpc in LISTINGS:
            named = rpc
        elif rpc == "StreamProduce" and identity not in ("producer", "elsewhere"):
            named = "produce to any topic"  # no produce right at all: denied before a message
        else:
            named = f'topic "{topic}' + ('.new"' if rpc == "CreateTopic" else '"')
        assert named in details, details
        assert f"acl file {server.acl_path}" in details, details
        if identity == "nobody":
            assert "no rules for it" in details, details
    assert (server.state(topic), server.state(topic + ".new")) == before


def test_denials_name_the_right(server: AclServer):
    server.make_topic("sensors.named")
    consumer, producer = server.stub("consumer"), server.stub("producer")
    assert denial(lambda: CALLS["Produce"](consumer, "sensors.named")) == (
        'identity "consumer" may not produce to topic "sensors.named" '
        f"(acl file {server.acl_path})")
    assert 'may not consume from topic "sensors.named"' in denial(
        lambda: CALLS["Subscribe"](producer, "sensors.named"))
    assert 'may not consume from or administer topic "sensors.named"' in denial(
        lambda: CALLS["DescribeTopic"](producer, "sensors.named"))
    assert 'may not administer topic "sensors.named.new"' in denial(
        lambda: CALLS["CreateTopic"](producer, "sensors.named"))


def test_a_denied_call_on_a_huge_invalid_name_answers_invalid_argument_cut_short(
        server: AclServer):
    huge = "x" * 1_000_000  # was echoed whole: RESOURCE_EXHAUSTED, and kept as a log key
    for rpc, identity in (("Produce", "consumer"), ("DescribeTopic", "producer"),
                          ("StreamProduce", "producer"), ("CreateTopic", "nobody"),
                          ("Produce", "consumer")):
        with pytest.raises(grpc.RpcError) as caught:
            CALLS[rpc](server.stub(identity), huge)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "invalid topic name" in caught.value.details()
        assert len(caught.value.details()) < 200
    assert "x" * 300 not in server.process.log()
    long_cn = "c" * 2000  # a CN is shown cut short too
    details = denial(lambda: CALLS["Consume"](server.stub(long_cn), "sensors.a"))
    assert "c" * 253 + '..."' in details and len(details) < 600


def test_denial_log_keys_are_bounded_in_size_and_number():
    gate = access.Gate(None)
    throttled = gate._denials
    for i in range(throttled._max_keys + 50):
        gate.log_denial(f"identity-{i}", "t" * 249, "denied")
    assert len(throttled._lines) <= throttled._max_keys
    caller = access.Caller(gate, "i" * 10_000, local=False)
    gate.rules = access.AccessRules("/acl.toml", {})
    with pytest.raises(Exception):
        caller.check(("produce",), "topic")
    assert all(len(k[0]) <= access.MAX_SHOWN for k in throttled._lines)


# -- streams ------------------------------------------------------------------------------

def test_a_denied_stream_produce_stores_nothing_and_keeps_what_came_before(server: AclServer):
    server.make_topic("sensors.mixed", 0)
    server.make_topic("other.mixed", 0)
    producer = server.stub("producer")
    details = denial(lambda: producer.StreamProduce(iter([
        pb.ProduceRequest(topic="other.mixed", message=b"first"),
        pb.ProduceRequest(topic="sensors.mixed", message=b"second")]), timeout=TIMEOUT))
    assert 'may not produce to topic "other.mixed"' in details
    assert server.state("other.mixed")[1] == [] and server.state("sensors.mixed")[1] == []
    # as any failing message: the ones before it are kept (docs/wire.md, StreamProduce)
    denial(lambda: producer.StreamProduce(iter([
        pb.ProduceRequest(topic="sensors.mixed", message=b"kept"),
        pb.ProduceRequest(topic="other.mixed", message=b"refused")]), timeout=TIMEOUT))
    assert server.state("sensors.mixed")[1] == [(1, b"kept")]
    assert server.state("other.mixed")[1] == []


def test_a_stream_produce_with_no_produce_right_at_all_is_denied_even_empty(server: AclServer):
    details = denial(lambda: server.stub("consumer").StreamProduce(iter([]), timeout=TIMEOUT))
    assert 'identity "consumer" may not produce to any topic' in details


@pytest.mark.parametrize("rpc", ["Subscribe", "StreamConsume"])
def test_a_denied_consuming_stream_ends_before_its_first_message(server: AclServer, rpc: str):
    server.make_topic(f"sensors.stream.{rpc}")
    stream = (server.stub("producer").Subscribe(pb.SubscribeRequest(topic=f"sensors.stream.{rpc}"),
                                                timeout=TIMEOUT)
              if rpc == "Subscribe" else
              server.stub("producer").StreamConsume(
                  pb.ConsumeRequest(topic=f"sensors.stream.{rpc}", offset=1), timeout=TIMEOUT))
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for reply in stream:
            received.append(reply)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert received == []


# -- listings -------------------------------------------------------------------------------

def test_list_topics_shows_only_the_topics_consume_or_admin_covers(server: AclServer):
    for name in ("a.1", "a.2", "b.1", "c.1"):
        server.make_topic(name, 1)
    lister = server.stub("lister")
    whole = [t.name for t in lister.ListTopics(pb.ListTopicsRequest(), timeout=TIMEOUT).topics]
    assert whole == ["a.1", "a.2", "b.1"]
    paged, token = [], ""
    while True:
        page = lister.ListTopics(pb.ListTopicsRequest(page_size=1, page_token=token),
                                 timeout=TIMEOUT)
        paged += [t.name for t in page.topics]
        token = page.next_page_token
        if not token:
            break
    assert paged == whole
    # a table without consume or admin: an empty list, not an error
    names = [t.name for t in server.stub("producer").ListTopics(pb.ListTopicsRequest(),
                                                                 timeout=TIMEOUT).topics]
    assert names == []


def test_list_consumers_is_filtered_and_a_named_topic_needs_the_right(server: AclServer):
    for name in ("a.cons", "c.cons"):
        server.make_topic(name, 1)
        server.local.CommitOffset(pb.CommitOffsetRequest(consumer="lc", topic=name, offset=1),
                                  timeout=TIMEOUT)
    lister = server.stub("lister")
    reply = lister.ListConsumers(pb.ListConsumersRequest(consumer="lc"), timeout=TIMEOUT)
    assert [(c.consumer, c.topic) for c in reply.consumers] == [("lc", "a.cons")]
    details = denial(lambda: lister.ListConsumers(pb.ListConsumersRequest(topic="c.cons"),
                                                  timeout=TIMEOUT))
    assert 'may not consume from or administer topic "c.cons"' in details


def test_deleting_a_consumer_on_every_topic_needs_admin_on_every_topic(server: AclServer):
    server.make_topic("sensors.every", 1)
    server.local.CommitOffset(pb.CommitOffsetRequest(consumer="gone", topic="sensors.every",
                                                     offset=1), timeout=TIMEOUT)
    request = pb.DeleteConsumerRequest(consumer="gone", topic="")
    details = denial(lambda: server.stub("admin").DeleteConsumer(request, timeout=TIMEOUT))
    assert 'identity "admin" may not administer every topic' in details
    assert server.state("sensors.every")[3] == [("gone", 1)]
    server.stub("ops").DeleteConsumer(request, timeout=TIMEOUT)
    assert server.state("sensors.every")[3] == []


# -- the log --------------------------------------------------------------------------------

def test_denials_are_logged_once_per_identity_and_topic(server: AclServer):
    server.make_topic("sensors.logged")
    server.make_topic("sensors.logged2")
    consumer = server.stub("consumer")
    for _ in range(3):
        denial(lambda: CALLS["Produce"](consumer, "sensors.logged"))
    denial(lambda: CALLS["Produce"](consumer, "sensors.logged2"))
    line = 'denied: identity "consumer" may not produce to topic "sensors.logged" '

    def logged() -> bool:
        log = server.process.log()
        return line in log and '"sensors.logged2"' in log

    eventually(logged)
    log = server.process.log()
    assert log.count(line) == 1, log
    assert "peer ipv4:127.0.0.1:" in log


# -- the "*" and "@local" tables, and remote writes -----------------------------------------

LOCAL_AND_STAR = """\
[identities."*"]
consume = ["public.*"]
[identities."@local"]
produce = ["local.*"]
[identities."ops"]
admin = ["*"]
produce = ["*"]
[identities."writer"]
produce = ["public.*"]
"""


def test_the_star_and_local_tables(certs: CertSet, tmp_path: Path):
    server = AclServer(certs, tmp_path, LOCAL_AND_STAR)
    try:
        ops = server.stub("ops")
        for topic in ("public.x", "local.x"):
            ops.CreateTopic(pb.CreateTopicRequest(topic=topic), timeout=TIMEOUT)
            ops.Produce(pb.ProduceRequest(topic=topic, message=b"m1"), timeout=TIMEOUT)
        for stranger in ("stranger", None, "@local"):  # None: a certificate without a CN
            stub = server.stub(stranger)
            assert CALLS["Consume"](stub, "public.x").message == b"m1"
            details = denial(lambda: CALLS["Produce"](stub, "local.x"))
            assert "may not produce to" in details
        assert "a client certificate without a subject CN may not" in denial(
            lambda: CALLS["Consume"](server.stub(None), "local.x"))
        # its own table only: "*" does not add to it
        denial(lambda: CALLS["Consume"](server.stub("writer"), "public.x"))
        # the socket's callers: the "@local" table, not "*" nor full rights
        assert server.local.Produce(pb.ProduceRequest(topic="local.x", message=b"m2"),
                                    timeout=TIMEOUT).offset == 2
        assert 'identity "@local" may not consume from topic "public.x"' in denial(
            lambda: CALLS["Consume"](server.local, "public.x"))
        denial(lambda: CALLS["CreateTopic"](server.local, "local.x"))
    finally:
        server.close()


@pytest.mark.parametrize(("cns", "reason"), [
    (("ops\0evil",), "whose subject CN holds a NUL byte"),  # gRPC's CN reads "ops"
    (("ops", "nobody"), "with 2 subject CNs"),
    (("nobody", "ops"), "with 2 subject CNs"),
])
def test_a_certificate_with_a_nul_in_its_cn_or_several_cns_is_refused(
        certs: CertSet, tmp_path: Path, cns: tuple[str, ...], reason: str):
    server = AclServer(certs, tmp_path, LOCAL_AND_STAR)
    try:
        ops = server.stub("ops")
        ops.CreateTopic(pb.CreateTopicRequest(topic="public.x"), timeout=TIMEOUT)
        ops.Produce(pb.ProduceRequest(topic="public.x", message=b"m1"), timeout=TIMEOUT)
        stub = server.stub(*cns)
        # neither the table of the CN gRPC reads nor the "*" table
        for rpc in ("Consume", "CreateTopic", "DeleteTopic"):
            details = denial(lambda: CALLS[rpc](stub, "public.x"))
            assert f"a client certificate {reason}" in details, details
        assert reason in denial(lambda: stub.ListTopics(pb.ListTopicsRequest(), timeout=TIMEOUT))
        assert CALLS["Consume"](server.stub("stranger"), "public.x").message == b"m1"
    finally:
        server.close()


def test_the_identity_is_read_from_the_whole_subject():
    def identity(common_name: bytes, subject: bytes) -> tuple[str, str]:
        return access.certificate_identity(
            {"x509_common_name": [common_name], "x509_subject": [subject]})

    assert identity(b"operator", b"CN=operator") == ("operator", "")
    assert identity(b"a,b+c", b"CN=a\\,b\\+c,O=x") == ("a,b+c", "")
    assert identity(b"da\xc5\xa1b", b"CN=da\\C5\\A1b") == ("da\u0161b", "")
    assert identity(b"", b"O=no CN") == ("", "")
    assert identity(b"nobody", b"CN=nobody,OU=operator") == ("nobody", "")
    assert identity(b"operator", b"CN=operator\\00evil")[1] == "whose subject CN holds a NUL byte"
    assert identity(b"operator", b"CN=nobody,CN=operator")[1].startswith("with 2 subject CNs")
    assert identity(b"operator", b"CN=nobody+CN=operator")[1].startswith("with 2 subject CNs")
    assert identity(b"operator", b"CN=#0c086f70")[1] != ""  # not the same name: refused


def test_local_callers_have_every_right_without_a_local_table(server: AclServer):
    server.make_topic("elsewhere.entirely")  # CreateTopic and Produce
    server.local.DeleteTopic(pb.DeleteTopicRequest(topic="elsewhere.entirely"), timeout=TIMEOUT)


def test_remote_writes_disabled_still_apply(certs: CertSet, tmp_path: Path):
    server = AclServer(certs, tmp_path, ACL, "--allow-remote-writes=false")
    try:
        server.make_topic("sensors.ro")
        with pytest.raises(grpc.RpcError) as caught:
            CALLS["Produce"](server.stub("producer"), "sensors.ro")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "remote writes are disabled" in caught.value.details()
        assert CALLS["Consume"](server.stub("consumer"), "sensors.ro").message == b"m1"
    finally:
        server.close()


# -- SIGHUP -----------------------------------------------------------------------------------

def test_sighup_loads_a_good_file_and_keeps_the_rules_when_the_new_file_is_bad(
        certs: CertSet, tmp_path: Path):
    server = AclServer(certs, tmp_path, '[identities.w]\nproduce = ["x.*"]\nconsume = ["x.*"]\n')
    try:
        server.make_topic("x.1")
        server.make_topic("y.1")
        w = server.stub("w")
        CALLS["Produce"](w, "x.1")
        denial(lambda: CALLS["Produce"](w, "y.1"))
        # an open stream loses a right the new rules take away
        stream = w.Subscribe(pb.SubscribeRequest(topic="x.1", offset=1), timeout=60)
        assert [m.message for m in next(stream).messages][:1] == [b"m1"]

        server.reload('[identities.w]\nproduce = ["y.*"]\n[identities.v]\nconsume = ["*"]\n')
        eventually(lambda: "access rules reloaded from" in server.process.log())
        assert f"access rules reloaded from {server.acl_path}: 2 identities" in server.process.log()
        CALLS["Produce"](w, "y.1")
        denial(lambda: CALLS["Produce"](w, "x.1"))
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:  # heartbeats every 0.2 s: the next page is checked
                pass
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        server.reload('[identities.w]\nproduce = ["x.*"]\nconsume = "x.*"\n')
        eventually(lambda: "keeping the access rules loaded before" in server.process.log())
        lines = [line for line in server.process.log().splitlines()
                 if "keeping the access rules" in line]
        assert len(lines) == 1 and "line 3" in lines[0] and str(server.acl_path) in lines[0], lines
        CALLS["Produce"](w, "y.1")  # the rules before the bad file still apply
        denial(lambda: CALLS["Produce"](w, "x.1"))
        assert server.process.proc.poll() is None

        server.reload("x = " + "[" * 497 + "]" * 497 + "\n")  # RecursionError in tomllib
        eventually(lambda: "nested too deeply" in server.process.log())
        CALLS["Produce"](w, "y.1")
        assert server.process.proc.poll() is None

        server.acl_path.unlink()
        os.mkfifo(server.acl_path)  # opening it would wait for a writer
        server.process.proc.send_signal(signal.SIGHUP)
        eventually(lambda: "not a regular file (a FIFO)" in server.process.log())
        CALLS["Produce"](w, "y.1")
        denial(lambda: CALLS["Produce"](w, "x.1"))
    finally:
        server.close()


def test_sighup_without_an_acl_file_changes_nothing(start_server):
    server = start_server()
    server.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "no --acl-file (SMQ_ACL_FILE) to reload" in server.log())
    server.stub().Connect(pb.ConnectRequest(), timeout=TIMEOUT)
    assert server.terminate() == 0


# -- refusing to start --------------------------------------------------------------------------

BAD_FILES = {
    "TOML syntax error": ('[identities.w]\nproduce = ["a"\n', "line 3"),
    "unknown key": ('[identities.w]\nproduce = ["a"]\n[idents.x]\n', "line 3"),
    "unknown right": ('[identities.w]\nproduce = ["a"]\nread = ["b"]\n', "line 3"),
    "pattern not a string": ('[identities.w]\n\nconsume = ["a", 2]\n', "line 3"),
    "patterns not a list": ('[identities.w]\nadmin = "*"\n', "line 2"),
    "identity not a table": ('[identities]\nw = 1\n', "line 2"),
    "identities not a table": ('identities = "w"\n', "line 1"),
    "nested too deeply": ("x = " + "[" * 497 + "]" * 497 + "\n", "nested too deeply"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_refuses_to_start_in_one_line(case: str, certs: CertSet, tmp_path: Path):
    text, line = BAD_FILES[case]
    path = tmp_path / "acl.toml"
    path.write_text(text)
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "smq.db"),
                            *certs.server_flags(), "--acl-file", str(path))
    assert_one_line_refusal(result, str(path), line, "--acl-file")
    assert not (tmp_path / "smq.db").exists()  # refused before the database was touched


@pytest.mark.parametrize("case", ["missing", "a directory", "a FIFO", "a device", "no mTLS"])
def test_an_unusable_file_refuses_to_start_in_one_line(case: str, certs: CertSet, tmp_path: Path):
    path = tmp_path / "acl.toml"
    flags = certs.server_flags()
    if case == "a directory":
        path.mkdir()
    elif case == "a FIFO":
        os.mkfifo(path)  # opening it waited for a writer: the server hung, deaf to SIGTERM
    elif case == "a device":
        path = Path("/dev/null")
    elif case == "no mTLS":
        path.write_text(ACL)
        flags = []
    expected = {"missing": "No such file", "a directory": "Is a directory",
                "a FIFO": "not a regular file (a FIFO)",
                "a device": "not a regular file (a character device)",
                "no mTLS": "--server-enable-mtls"}[case]
    result = start_and_fail(tmp_path, "--dbpath", str(tmp_path / "smq.db"), *flags,
                            "--acl-file", str(path))
    assert_one_line_refusal(result, str(path), expected)


@pytest.mark.parametrize("how", ["environment", ".env file"])
def test_the_file_from_the_environment_or_the_env_file(how: str, certs: CertSet, tmp_path: Path):
    path = tmp_path / "acl.toml"
    path.write_text('[identities.w]\nproduce = ["a"]\nread = ["b"]\n')
    env = clean_env()
    if how == "environment":
        env["SMQ_ACL_FILE"] = str(path)
    else:
        (tmp_path / ".env").write_text(f"SMQ_ACL_FILE={path}\n")
    result = subprocess.run([*SERVER_COMMAND, "--port", "0", "--bind", "127.0.0.1",
                             "--dbpath", str(tmp_path / "smq.db"), *certs.server_flags()],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert_one_line_refusal(result, str(path), "line 3", "SMQ_ACL_FILE")
