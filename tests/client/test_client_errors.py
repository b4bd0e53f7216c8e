"""Status codes -> error classes: the table is complete, each docs/wire.md condition raises its
class from a real server, every code from every operation keeps its code and details,
and the pysmq classes are raised where pysmq raises them."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import smq
from support import ROOT
from support.servers import ServerProcess, clean_env
from smq import errors
from smq.client import ERROR_FOR_STATUS, Client

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

# docs/wire.md, "Status codes": every condition the server reports, and its code.
WIRE_STATUS_CODES = {
    "topic does not exist": "NOT_FOUND",
    "invalid topic name, invalid argument": "INVALID_ARGUMENT",
    "topic is empty (earliest/latest offset)": "FAILED_PRECONDITION",
    "offset above the latest": "OUT_OF_RANGE",
    "offset below 1 or already deleted": "NOT_FOUND",
    "remote writes disabled": "PERMISSION_DENIED",
    "message larger than the server's maximum": "RESOURCE_EXHAUSTED",
    "disk full, or a configured storage quota reached": "RESOURCE_EXHAUSTED",
    "too many concurrent calls or streams": "RESOURCE_EXHAUSTED",
    "server shutting down": "UNAVAILABLE",
    "unexpected storage failure": "INTERNAL",
    "the original server, for almost everything": "UNKNOWN",
}
PYSMQ_NAMES = ("SMQException", "SMQConnectionError", "SMQAuthenticationError", "SMQProduceError",
               "SMQConsumeError", "SMQTopicCreationError", "SMQOffsetError", "SMQTimeoutError")


# -- the table ---------------------------------------------------------------------------

@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK],
                         ids=lambda c: c.name)
def test_every_status_code_is_mapped_to_its_own_class(code: grpc.StatusCode) -> None:
    assert code in ERROR_FOR_STATUS, f"{code.name} is not mapped to an error class"
    error_class = ERROR_FOR_STATUS[code]
    assert error_class.code == code.name
    assert issubclass(error_class, smq.SMQError) and error_class.__doc__


def test_the_mapping_is_one_to_one() -> None:
    assert len(set(ERROR_FOR_STATUS.values())) == len(ERROR_FOR_STATUS)


@pytest.mark.parametrize("condition", WIRE_STATUS_CODES)
def test_every_wire_condition_has_a_specific_class(condition: str) -> None:
    code = grpc.StatusCode[WIRE_STATUS_CODES[condition]]
    assert ERROR_FOR_STATUS[code] in vars(smq).values(), "exported from smq"


def test_server_errors_come_back_as_themselves_or_their_parent() -> None:
    """Both tables at once: whatever the server raises (errors.py, sent with its `code`),
    the client raises a class that the server's class is a subclass of."""
    from smq.server.status import STATUS_OF
    never_sent = {errors.SMQError, errors.SMQConnectionError, errors.SMQAuthenticationError,
                  errors.SMQTimeoutError, errors.SMQProduceError, errors.SMQConsumeError,
                  errors.SMQTopicCreationError, errors.SMQOffsetError, errors.StartupError,
                  errors.ConfigError, errors.CertificateError,
                  errors.JetStreamError, errors.NotConnected, errors.StreamMissing,
                  errors.PublishFailed, errors.MissingDependency}  # and smq forward's  # pysmq's operation classes; errors that stop the server
    server_classes = [c for c in vars(errors).values() if isinstance(c, type)
                      and issubclass(c, errors.SMQError) and c not in never_sent]
    assert errors.TopicNotFound in server_classes and errors.StorageFull in server_classes
    for server_class in server_classes:
        sent = STATUS_OF.get(server_class.code, getattr(grpc.StatusCode, server_class.code))
        assert issubclass(server_class, ERROR_FOR_STATUS[sent]), server_class


def test_pysmq_names_and_hierarchy() -> None:
    assert smq.SMQException is smq.SMQError
    assert issubclass(smq.SMQAuthenticationError, smq.SMQConnectionError)
    assert issubclass(smq.Unavailable, smq.SMQConnectionError)
    assert issubclass(smq.DeadlineExceeded, smq.SMQTimeoutError)
    error = smq.SMQProduceError("failed", ValueError("cause"))  # pysmq's constructor
    assert str(error) == "failed" and isinstance(error.original_error, ValueError)
    combined = errors.with_operation(smq.NotFound, smq.SMQProduceError)
    assert combined is errors.with_operation(smq.NotFound, smq.SMQProduceError)
    assert combined.__name__ == "NotFound" and issubclass(combined, smq.SMQProduceError)
    assert errors.with_operation(smq.Unavailable, smq.SMQConnectionError) is smq.Unavailable


# -- every code, every operation: an in-process server that answers each status -----------

class AbortingServer:
    """Answers every SMQ call with the status in `self.code`, counting calls."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNKNOWN
        self.calls = 0
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        handlers = {}
        for method in ("Connect", "CreateTopic", "Produce", "Consume", "GetLatestOffset",
                       "GetEarliestOffset", "DeleteUntilOffset", "BulkRetrieve", "ProduceBatch",
                       "ListTopics", "DescribeTopic", "DeleteTopic", "SetTopicPolicy",
                       "GetTopicPolicy", "CommitOffset", "GetCommittedOffset", "ListConsumers",
                       "DeleteConsumer", "GetServerInfo"):
            handlers[method] = grpc.unary_unary_rpc_method_handler(self.abort)
        for method in ("StreamConsume", "Subscribe"):
            handlers[method] = grpc.unary_stream_rpc_method_handler(self.abort_stream)
        handlers["StreamProduce"] = grpc.stream_unary_rpc_method_handler(self.abort)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("smq.SuhaibMessageQueue", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def abort(self, request: object, context: grpc.ServicerContext) -> None:
        self.calls += 1
        context.abort(self.code, f"fake {self.code.name}")

    def abort_stream(self, request: object, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.abort(request, context)
        yield b""


@pytest.fixture(scope="module")
def aborting() -> Iterator[AbortingServer]:
    server = AbortingServer()
    yield server
    server.server.stop(None)


Call = Callable[[Client], object]
OPERATIONS: dict[str, tuple[Call, type[smq.SMQError] | None, bool]] = {
    # name: (call, pysmq class of the operation, pysmq wraps even connection errors)
    "connect": (lambda c: c.connect(), smq.SMQConnectionError, False),
    "create_topic": (lambda c: c.create_topic("t"), smq.SMQTopicCreationError, False),
    "produce": (lambda c: c.produce("t", b"x"), smq.SMQProduceError, False),
    "stream_produce": (lambda c: c.stream_produce("t", [b"x"]), smq.SMQProduceError, False),
    "produce_many": (lambda c: c.produce_many("t", [b"x"]), smq.SMQProduceError, False),
    "consume": (lambda c: c.consume("t", 1), smq.SMQConsumeError, False),
    "consume_earliest": (lambda c: c.consume_earliest("t"), smq.SMQConsumeError, True),
    "consume_latest": (lambda c: c.consume_latest("t"), smq.SMQConsumeError, True),
    "bulk_retrieve": (lambda c: c.bulk_retrieve("t", 0, 1), smq.SMQConsumeError, False),
    "stream_consume": (lambda c: next(c.stream_consume("t", 0)), smq.SMQConsumeError, False),
    "iter_messages": (lambda c: next(c.iter_messages("t", reconnect=False)), smq.SMQConsumeError, False),
    "subscribe": (lambda c: next(c.subscribe("t", reconnect=False)), smq.SMQConsumeError, False),
    "get_earliest_offset": (lambda c: c.get_earliest_offset("t"), smq.SMQOffsetError, False),
    "get_latest_offset": (lambda c: c.get_latest_offset("t"), smq.SMQOffsetError, False),
    "delete_until_offset": (lambda c: c.delete_until_offset("t", 1), smq.SMQOffsetError, False),
    "list_topics": (lambda c: c.list_topics(), None, False),
    "describe_topic": (lambda c: c.describe_topic("t"), None, False),
    "delete_topic": (lambda c: c.delete_topic("t"), None, False),
    "get_topic_policy": (lambda c: c.get_topic_policy("t"), None, False),
    "set_topic_policy": (lambda c: c.set_topic_policy("t", max_messages=1), None, False),
    "commit_offset": (lambda c: c.commit_offset("c", "t", 1), None, False),
    "committed_offset": (lambda c: c.committed_offset("c", "t"), None, False),
    "resume_offset": (lambda c: c.resume_offset("c", "t"), None, False),
    "list_consumers": (lambda c: c.list_consumers(), None, False),
    "delete_consumer": (lambda c: c.delete_consumer("c"), None, False),
    "server_info": (lambda c: c.server_info(), None, False),
    "iter_messages(consumer=)": (lambda c: next(c.iter_messages("t", reconnect=False, consumer="c")),
                                 smq.SMQConsumeError, False),
    "subscribe(consumer=)": (lambda c: next(c.subscribe("t", reconnect=False, consumer="c")),
                             smq.SMQConsumeError, False),
}


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK],
                         ids=lambda c: c.name)
def test_every_code_from_every_operation(aborting: AbortingServer, code: grpc.StatusCode) -> None:
    aborting.code = code
    with Client("127.0.0.1", aborting.port, retries=0) as client:
        for name, (call, operation_class, wraps_all) in OPERATIONS.items():
            with pytest.raises(smq.SMQError) as caught:
                call(client)
            error = caught.value
            assert isinstance(error, ERROR_FOR_STATUS[code]), name
            assert (error.code, error.details) == (code, f"fake {code.name}"), name
            assert isinstance(error.original_error, grpc.RpcError), name
            assert f"fake {code.name}" in str(error) and str(error).startswith("could not "), name
            transport = issubclass(ERROR_FOR_STATUS[code], errors.TRANSPORT_ERRORS)
            if operation_class is not None:
                assert isinstance(error, operation_class) == (wraps_all or not transport
                                                              or issubclass(ERROR_FOR_STATUS[code], operation_class)), name
            assert type(error).__name__ == ERROR_FOR_STATUS[code].__name__


def test_only_idempotent_calls_are_retried_on_unavailable(aborting: AbortingServer) -> None:
    aborting.code = grpc.StatusCode.UNAVAILABLE
    with Client("127.0.0.1", aborting.port, retries=2) as client:
        for call, expected_calls in ((lambda: client.get_latest_offset("t"), 3),
                                     (lambda: client.consume("t", 1), 3),
                                     (lambda: client.create_topic("t"), 3),
                                     (lambda: client.produce("t", b"x"), 1),
                                     (lambda: client.produce_many("t", [b"x"]), 1),
                                     (lambda: client.set_topic_policy("t", max_age=60), 3),
                                     (lambda: client.commit_offset("c", "t", 1), 3),
                                     (lambda: client.list_consumers(), 3),
                                     (lambda: client.server_info(), 3),
                                     (lambda: client.delete_consumer("c", "t"), 1),
                                     (lambda: client.delete_topic("t"), 1)):
            aborting.calls = 0
            with pytest.raises(smq.Unavailable):
                call()
            assert aborting.calls == expected_calls
    aborting.code = grpc.StatusCode.NOT_FOUND
    with Client("127.0.0.1", aborting.port, retries=2) as client:
        aborting.calls = 0
        with pytest.raises(smq.NotFound):
            client.get_latest_offset("t")
        assert aborting.calls == 1


# -- each docs/wire.md condition, from a real server --------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("errors")
    proc = ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          "--max-message-size", "1000"], tmp).wait_serving()
    yield proc
    proc.close()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client("127.0.0.1", server.port) as client:
        client.create_topic("full")
        client.create_topic("empty")
        if client.describe_topic("full").next_offset == 1:
            client.produce_many("full", [b"1", b"2", b"3"])
            client.delete_until_offset("full", 1)
        yield client


def raised(call: Callable[[], object]) -> smq.SMQError:
    with pytest.raises(smq.SMQError) as caught:
        call()
    return caught.value


def test_topic_does_not_exist(client: Client) -> None:
    error = raised(lambda: client.produce("missing", b"x"))
    assert isinstance(error, smq.NotFound) and isinstance(error, smq.SMQProduceError)
    assert error.details == "topic 'missing' does not exist" and error.topic == "missing"


def test_not_found_says_which_thing_is_missing(client: Client) -> None:
    """NOT_FOUND carries a reason beside the status (trailing metadata "smq-reason"): the
    client raises the finer class, so no caller reads the message text."""
    assert isinstance(raised(lambda: client.describe_topic("missing")), errors.TopicNotFound)
    assert isinstance(raised(lambda: client.consume("full", 1)), errors.OffsetNotFound)
    none_yet = raised(lambda: client.committed_offset("nobody", "full"))
    assert isinstance(none_yet, errors.NoCommittedOffset)
    assert not isinstance(none_yet, errors.TopicNotFound)
    assert isinstance(raised(lambda: client.committed_offset("nobody", "missing")),
                      errors.TopicNotFound)


def test_invalid_topic_name(client: Client) -> None:
    error = raised(lambda: client.create_topic("no spaces"))
    assert isinstance(error, smq.InvalidArgument) and isinstance(error, smq.SMQTopicCreationError)
    assert "A-Z a-z 0-9 . _ -" in str(error)


def test_topic_is_empty(client: Client) -> None:
    error = raised(lambda: client.get_earliest_offset("empty"))
    assert isinstance(error, smq.TopicEmpty) and isinstance(error, smq.SMQOffsetError)
    assert error.details == "topic is empty" and error.topic == "empty"
    assert isinstance(raised(lambda: client.consume_latest("empty")), smq.SMQConsumeError)


def test_offset_above_latest_and_below_earliest(client: Client) -> None:
    error = raised(lambda: client.consume("full", 4))
    assert isinstance(error, smq.OffsetOutOfRange) and isinstance(error, smq.SMQConsumeError)
    for offset in (0, 1):  # below 1, already deleted
        assert isinstance(raised(lambda: client.consume("full", offset)), smq.NotFound)


def test_remote_writes_disabled(start_server, tmp_path: Path) -> None:
    server = start_server("--allow-remote-writes=false", "--unix-socket", str(tmp_path / "s.sock"))
    with Client("127.0.0.1", server.port) as remote:
        for call in (lambda: remote.create_topic("t"), lambda: remote.produce("t", b"x"),
                     lambda: remote.delete_until_offset("t", 1), lambda: remote.delete_topic("t")):
            error = raised(call)
            assert isinstance(error, smq.PermissionDenied)
            assert "--allow-remote-writes=true" in str(error) and "Unix socket" in str(error)
    with Client(unix_socket=str(tmp_path / "s.sock")) as local:
        local.create_topic("t")
        assert local.produce("t", b"x") == 1
        local.delete_topic("t")


def test_message_too_large(client: Client) -> None:
    error = raised(lambda: client.produce("full", b"x" * 1001))
    assert isinstance(error, smq.ResourceExhausted) and isinstance(error, smq.SMQProduceError)
    assert "1000" in error.details


def test_too_many_streams(start_server) -> None:
    # A server of its own: the slots these streams hold are given back only once the
    # server has seen their cancellation, and no other test may have to wait for that.
    server = start_server("--max-streams", "2", "--heartbeat-interval", "0.2")
    with Client("127.0.0.1", server.port) as client:
        client.create_topic("full")
        client.create_topic("empty")
        client.produce_many("full", [b"1", b"2", b"3"])
        streams = [client.stream_consume("full", 0) for _ in range(2)]
        for stream in streams:
            next(stream)
        try:  # another topic: a stream on "full" would replace this connection's oldest one
            assert isinstance(raised(lambda: next(client.stream_consume("empty", 0))),
                              smq.ResourceExhausted)
        finally:
            for stream in streams:
                stream.close()


def test_deadline_exceeded(client: Client) -> None:
    def slow() -> Iterator[bytes]:
        yield b"1"
        time.sleep(1.5)
        yield b"2"

    client.create_topic("slow")  # what the stream sent before its deadline is kept: not in "full"
    error = raised(lambda: client.stream_produce("slow", slow(), timeout=0.3))
    assert isinstance(error, smq.DeadlineExceeded) and isinstance(error, smq.SMQTimeoutError)
    assert "timeout=" in str(error)


def test_server_shutting_down_and_down(start_server) -> None:
    server = start_server("--heartbeat-interval", "0.2")
    with Client("127.0.0.1", server.port, retries=0) as client:
        client.create_topic("t")
        stream = client.stream_consume("t", 0)
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(next, stream)
        time.sleep(0.5)
        server.terminate()
        error = pending.exception(timeout=20)
        assert isinstance(error, smq.Unavailable) and isinstance(error, smq.SMQConnectionError)
        error = raised(lambda: client.get_latest_offset("t"))
        assert isinstance(error, smq.Unavailable)
        assert str(error).endswith(f"cannot reach the SMQ server at 127.0.0.1:{server.port}: "
                                   "connection refused (is it running, on this port?)")


def test_tls_is_not_for_the_unix_socket(tmp_path: Path) -> None:
    tls = smq.ClientTLSConfig("c.crt", "c.key", "ca.crt")
    with pytest.raises(ValueError, match="plaintext"):
        Client(unix_socket=str(tmp_path / "s.sock"), tls_config=tls)


def test_unreadable_tls_files(tmp_path: Path) -> None:
    tls = smq.ClientTLSConfig(str(tmp_path / "no.crt"), str(tmp_path / "no.key"), str(tmp_path / "ca"))
    error = raised(lambda: Client("localhost", 1, tls_config=tls))
    assert isinstance(error, smq.SMQAuthenticationError) and "no.crt" in str(error)


# -- the same programs, with pysmq and with smq.client ----------------------------------------

PROGRAM = """
import json, sys
if sys.argv[1] == "pysmq":
    from pysmq.client import Client
    from pysmq import exceptions as X
else:
    from smq.client import Client
    import smq.errors as X
c = Client("127.0.0.1", int(sys.argv[2]))
# Not retrying makes "server down" fail at once, like pysmq (which has no retries).
down = Client("127.0.0.1", 1, **({} if sys.argv[1] == "pysmq" else {"retries": 0}))
c.create_topic("cmp"); c.create_topic("cmp_empty")
c.produce("cmp", b"1"); c.produce("cmp", b"2"); c.delete_until_offset("cmp", 1)
scenarios = {
    "produce to a missing topic": lambda: c.produce("missing", b"x"),
    "produce with a bad name": lambda: c.produce("a b", b"x"),
    "create with a bad name": lambda: c.create_topic("a b"),
    "consume above the latest": lambda: c.consume("cmp", 99),
    "consume a deleted offset": lambda: c.consume("cmp", 1),
    "consume offset 0": lambda: c.consume("cmp", 0),
    "consume a missing topic": lambda: c.consume("missing", 1),
    "latest offset of an empty topic": lambda: c.get_latest_offset("cmp_empty"),
    "earliest offset of an empty topic": lambda: c.get_earliest_offset("cmp_empty"),
    "latest offset of a missing topic": lambda: c.get_latest_offset("missing"),
    "consume_latest of an empty topic": lambda: c.consume_latest("cmp_empty"),
    "consume_earliest of a missing topic": lambda: c.consume_earliest("missing"),
    "trim a missing topic": lambda: c.delete_until_offset("missing", 1),
    "bulk_retrieve a missing topic": lambda: c.bulk_retrieve("missing", 0, 10),
    "stream_consume a missing topic": lambda: next(iter(c.stream_consume("missing", 0))),
    "produce, server down": lambda: down.produce("cmp", b"x"),
    "consume, server down": lambda: down.consume("cmp", 1),
    "create_topic, server down": lambda: down.create_topic("cmp"),
    "connect, server down": lambda: down.connect(),
    "consume_latest, server down": lambda: down.consume_latest("cmp"),
    "trim, server down": lambda: down.delete_until_offset("cmp", 1),
}
offset = c.produce("cmp", b"3")
payload, latest = c.consume_latest("cmp")
page = c.bulk_retrieve("cmp", 0, 10)
out = {"results": [offset, payload.decode(), latest, page.count, page.next_offset,
                   [(m.message.decode(), m.offset) for m in page.messages]]}
for name, call in scenarios.items():
    try:
        call()
        out[name] = "no error"
    except Exception as e:
        out[name] = [n for n in %r if isinstance(e, getattr(X, n))]
print(json.dumps(out))
""" % (PYSMQ_NAMES,)


def run_program(flavour: str, port: int) -> dict:
    # Each program in a fresh interpreter: the same source runs once per flavour.
    result = subprocess.run([sys.executable, "-c", PROGRAM, flavour, str(port)], cwd=ROOT,
                            env=clean_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pysmq_programs_get_the_same_results_and_exception_classes(start_server,
                                                                    tmp_path: Path) -> None:
    with_pysmq = run_program("pysmq", start_server(db=tmp_path / "pysmq.db").port)
    with_smq = run_program("smq", start_server(db=tmp_path / "smq.db").port)
    assert with_smq.pop("results") == with_pysmq.pop("results")
    for scenario, pysmq_classes in with_pysmq.items():
        assert pysmq_classes != "no error", scenario
        # Everything a pysmq program catches, it still catches (ours may be more precise).
        assert set(pysmq_classes) <= set(with_smq[scenario]), scenario
