"""Who may write, and the services beside SMQ on the same port (docs/wire.md):
--allow-remote-writes=false / ALLOW_REMOTE_WRITES=false refuses writes over TCP with
PERMISSION_DENIED and changes nothing, while callers on --unix-socket may still write;
the Unix socket is for its owner (and a configured group) whatever the umask;
grpc.health.v1 answers SERVING, NOT_SERVING while the liveness check fails and while
draining; reflection lists the service and describes it well enough to call it without
the .proto file.
"""
from __future__ import annotations

import grp
import os
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support.disks import ext4, shut_down_ext4
from support.servers import (
    SERVER_COMMAND,
    ServerProcess,
    assert_one_line_refusal,
    clean_env,
    make_topic,
    start_and_fail,
)
from smq._proto import smq_pb2 as pb, smq_pb2_grpc
from smq.server.service import QueueService
from smq.server.storage import Storage

TIMEOUT = 20.0
SERVICE = "smq.SuhaibMessageQueue"
WIRE_RPCS = {"Connect", "GetLatestOffset", "GetEarliestOffset", "CreateTopic", "Produce",
             "Consume", "StreamProduce", "StreamConsume", "DeleteUntilOffset", "BulkRetrieve"}

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

# The four writes, each on an existing topic "t" (CreateTopic also on a new one).
WRITES: dict[str, Callable[[smq_pb2_grpc.SuhaibMessageQueueStub], object]] = {
    "CreateTopic(new)": lambda s: s.CreateTopic(pb.CreateTopicRequest(topic="new"), timeout=TIMEOUT),
    "CreateTopic(existing)": lambda s: s.CreateTopic(pb.CreateTopicRequest(topic="t"), timeout=TIMEOUT),
    "Produce": lambda s: s.Produce(pb.ProduceRequest(topic="t", message=b"w"), timeout=TIMEOUT),
    "StreamProduce": lambda s: s.StreamProduce(
        iter([pb.ProduceRequest(topic="t", message=b"w1"), pb.ProduceRequest(topic="t", message=b"w2")]),
        timeout=TIMEOUT),
    "StreamProduce(empty)": lambda s: s.StreamProduce(iter([]), timeout=TIMEOUT),
    "DeleteUntilOffset": lambda s: s.DeleteUntilOffset(
        pb.DeleteUntilOffsetRequest(topic="t", offset=2), timeout=TIMEOUT),
}


def contents(stub, topic: str) -> list[tuple[int, bytes]]:
    page = stub.BulkRetrieve(pb.BulkRetrieveRequest(topic=topic, start_offset=0, limit=1000),
                             timeout=TIMEOUT)
    return [(m.offset, m.message) for m in page.messages]


def unix_stub(path) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    return smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(f"unix:{path}"))


@pytest.fixture
def read_only_server(start_server, tmp_path) -> tuple[ServerProcess, str]:
    """Remote writes disabled, plus a Unix socket (short path: the limit is ~107 bytes)."""
    socket_path = str(tmp_path / "s.sock")
    server = start_server("--allow-remote-writes=false", "--unix-socket", socket_path)
    return server, socket_path


# -- remote writes -------------------------------------------------------------------

def test_writes_over_tcp_are_permission_denied_and_change_nothing(read_only_server):
    server, socket_path = read_only_server
    local, remote = unix_stub(socket_path), server.stub()
    make_topic(local, "t", 3)
    before = contents(remote, "t")
    for name, write in WRITES.items():
        with pytest.raises(grpc.RpcError) as info:
            write(remote)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    assert contents(remote, "t") == before == [(1, b"m1"), (2, b"m2"), (3, b"m3")]
    with pytest.raises(grpc.RpcError) as info:
        remote.GetLatestOffset(pb.GetLatestOffsetRequest(topic="new"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # CreateTopic created nothing


def test_reads_over_tcp_still_work_with_writes_disabled(read_only_server):
    server, socket_path = read_only_server
    local, remote = unix_stub(socket_path), server.stub()
    make_topic(local, "t", 3)
    assert remote.Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()
    assert remote.GetEarliestOffset(pb.GetEarliestOffsetRequest(topic="t"), timeout=TIMEOUT).offset == 1
    assert remote.GetLatestOffset(pb.GetLatestOffsetRequest(topic="t"), timeout=TIMEOUT).offset == 3
    assert remote.Consume(pb.ConsumeRequest(topic="t", offset=2), timeout=TIMEOUT) == \
        pb.ConsumeResponse(message=b"m2", offset=2)
    assert contents(remote, "t") == [(1, b"m1"), (2, b"m2"), (3, b"m3")]

    stream = remote.StreamConsume(pb.ConsumeRequest(topic="t", offset=3), timeout=TIMEOUT)
    try:
        assert next(stream) == pb.ConsumeResponse(message=b"m3", offset=3)
        local.Produce(pb.ProduceRequest(topic="t", message=b"local"), timeout=TIMEOUT)
        assert next(r for r in stream if r.offset != -1) == pb.ConsumeResponse(message=b"local", offset=4)
    finally:
        stream.cancel()


def test_writes_over_the_unix_socket_are_allowed_with_remote_writes_disabled(read_only_server):
    server, socket_path = read_only_server
    local, remote = unix_stub(socket_path), server.stub()
    local.CreateTopic(pb.CreateTopicRequest(topic="t"), timeout=TIMEOUT)
    local.CreateTopic(pb.CreateTopicRequest(topic="t"), timeout=TIMEOUT)
    assert local.Produce(pb.ProduceRequest(topic="t", message=b"a"), timeout=TIMEOUT).offset == 1
    assert local.StreamProduce(iter([pb.ProduceRequest(topic="t", message=b"b"),
                                     pb.ProduceRequest(topic="t", message=b"c")]),
                               timeout=TIMEOUT).offset == 3
    local.DeleteUntilOffset(pb.DeleteUntilOffsetRequest(topic="t", offset=1), timeout=TIMEOUT)
    assert contents(remote, "t") == [(2, b"b"), (3, b"c")]
    assert contents(local, "t") == [(2, b"b"), (3, b"c")]


def test_allow_remote_writes_false_from_the_environment(start_server):
    server = start_server(env=clean_env(ALLOW_REMOTE_WRITES="false"))
    stub = server.stub()
    for name, write in WRITES.items():
        with pytest.raises(grpc.RpcError) as info:
            write(stub)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
    assert stub.Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()


def test_remote_writes_are_allowed_by_default_and_over_the_socket_too(start_server, tmp_path):
    socket_path = str(tmp_path / "s.sock")
    server = start_server("--unix-socket", socket_path)
    make_topic(server.stub(), "t", 1)
    assert unix_stub(socket_path).Produce(pb.ProduceRequest(topic="t", message=b"u"),
                                          timeout=TIMEOUT).offset == 2
    assert contents(server.stub(), "t") == [(1, b"m1"), (2, b"u")]


# -- health ------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_is_serving(smq_server, service):
    health = health_pb2_grpc.HealthStub(smq_server.channel())
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_turns_not_serving_while_draining(start_server):
    server = start_server("--shutdown-grace", "2")  # watches stay open through the grace
    health = health_pb2_grpc.HealthStub(server.channel())
    statuses: dict[str, queue.Queue] = {}
    for service in ("", SERVICE):
        statuses[service] = queue.Queue()
        watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)

        def pump(watch=watch, into=statuses[service]) -> None:
            try:
                for response in watch:
                    into.put(response.status)
            except grpc.RpcError:
                pass
            into.put(None)

        threading.Thread(target=pump, daemon=True).start()
    for service in statuses:
        assert statuses[service].get(timeout=TIMEOUT) == health_pb2.HealthCheckResponse.SERVING
    server.proc.send_signal(signal.SIGTERM)
    for service in statuses:
        assert statuses[service].get(timeout=TIMEOUT) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.proc.wait(TIMEOUT) == 0


HEALTH_CHECK_INTERVAL = 1.0  # seconds; each check may take half of it


def health_of(server: ServerProcess) -> tuple[int, int]:
    """The health status of "" and of the SMQ service."""
    health = health_pb2_grpc.HealthStub(server.channel())
    return tuple(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
                 for service in ("", SERVICE))


def seconds_until_health(server: ServerProcess, status: int, limit: float) -> float:
    """How long until both names answer `status` (failing well after `limit`)."""
    started = time.monotonic()
    while health_of(server) != (status, status):
        assert time.monotonic() - started < limit + 10, f"health never became {status}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_health_follows_the_liveness_check_when_the_database_is_moved_away(start_server, tmp_path):
    """Moved (or deleted, or a disk remounted over it): what is written now is lost at the next
    start, so the server is not healthy until the file it opened is back at its path."""
    data = tmp_path / "data"
    data.mkdir()
    server = start_server("--health-check-interval", str(HEALTH_CHECK_INTERVAL),
                          db=data / "smq.db")
    make_topic(server.stub(), "t", 3)
    period = HEALTH_CHECK_INTERVAL * 1.5  # a check comes within the interval, and takes half
    assert health_of(server) == (health_pb2.HealthCheckResponse.SERVING,) * 2
    data.rename(tmp_path / "elsewhere")
    data.mkdir()  # an empty directory where the database was
    waited = seconds_until_health(server, health_pb2.HealthCheckResponse.NOT_SERVING, period)
    assert waited <= period + 1.0, waited
    data.rmdir()
    (tmp_path / "elsewhere").rename(data)
    waited = seconds_until_health(server, health_pb2.HealthCheckResponse.SERVING, period)
    assert waited <= period + 1.0, waited
    log = server.log()
    assert "liveness check failed" in log and "liveness check passes again" in log, log
    assert server.terminate() == 0


def test_health_is_not_serving_after_the_filesystem_shuts_down(start_server, tmp_path):
    """The adversarial run's case: ext4 shut itself down; every call answered INTERNAL
    while health said SERVING."""
    with ext4(tmp_path / "disk") as disk:
        server = start_server("--health-check-interval", str(HEALTH_CHECK_INTERVAL),
                              db=disk / "smq.db")
        make_topic(server.stub(), "t", 3)
        assert health_of(server) == (health_pb2.HealthCheckResponse.SERVING,) * 2
        shut_down_ext4(disk)
        waited = seconds_until_health(server, health_pb2.HealthCheckResponse.NOT_SERVING,
                                      HEALTH_CHECK_INTERVAL * 1.5)
        assert waited <= HEALTH_CHECK_INTERVAL * 1.5 + 1.0, waited
        server.kill()


def test_liveness_check_reads_the_file_not_only_sqlites_cache(tmp_path):
    """Right after the shutdown nothing else has touched the disk: SQLite would answer the
    check's transaction and query from memory. The check itself must see the failure."""
    with ext4(tmp_path / "disk") as disk:
        service = QueueService(Storage(str(disk / "smq.db")))
        try:
            service.create_topic("t")
            service.produce("t", b"x")
            time.sleep(1.5)  # the writer's first upkeep tick has run: it stays idle now
            assert service.liveness_problem(1.0) is None
            shut_down_ext4(disk)
            assert "Input/output error" in service.liveness_problem(1.0)
        finally:
            service.close()


# -- reflection ----------------------------------------------------------------------

def reflect(server: ServerProcess, request: reflection_pb2.ServerReflectionRequest):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    return next(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))


def test_reflection_lists_the_service(smq_server):
    response = reflect(smq_server, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_a_huge_reflection_request_is_refused_unparsed(smq_server):
    """The hostile run's case: 30 streams of one 3.9 MiB request each took the server to
    its unit's MemoryMax (parsing, and an error echoing the symbol name)."""
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="x" * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as caught:
        reflect(smq_server, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64 KiB" in caught.value.details()
    response = reflect(smq_server, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert response.list_services_response.service  # the server goes on answering


def test_reflection_describes_the_service_for_generic_clients(smq_server):
    response = reflect(smq_server, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=SERVICE))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    smq_file = next(f for f in files if f.package == "smq")
    service = next(s for s in smq_file.service if s.name == "SuhaibMessageQueue")
    assert WIRE_RPCS <= {method.name for method in service.method}  # plus our additions
    produce = next(m for m in smq_file.message_type if m.name == "ProduceRequest")
    assert [(f.name, f.number) for f in produce.field] == [("topic", 1), ("message", 2)]



def test_reflection_answers_smq_proto_as_generated(smq_server):
    """smq.proto lives in a descriptor pool of its own (scripts/gen_proto.py); reflection
    still answers the file by name, byte for byte what protoc made of proto/smq.proto."""
    from smq._proto import smq_pb2
    response = reflect(smq_server, reflection_pb2.ServerReflectionRequest(file_by_filename="smq.proto"))
    assert list(response.file_descriptor_response.file_descriptor_proto) == [smq_pb2.DESCRIPTOR.serialized_pb]

# -- the Unix socket's permissions -------------------------------------------------------

UMASK_000 = ["sh", "-c", 'umask 000 && exec "$@"', "sh", *SERVER_COMMAND]
# A plain Python for a child running as another user (the venv may not be theirs to run).
CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory any user may pass through (pytest's own are the owner's only)."""
    path = Path(tempfile.mkdtemp(prefix="smq-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def connects_as(user: str, path: Path, extra_groups: list[str] | None = None) -> bool:
    """Whether `user` (with `extra_groups`) may connect to the socket at path (needs root)."""
    result = subprocess.run(["/usr/bin/python3", "-c", CONNECT, str(path)], user=user,
                            group=user if user != "nobody" else None,
                            extra_groups=extra_groups or [], capture_output=True, text=True,
                            timeout=30)
    if result.returncode and "PermissionError" not in result.stderr:
        raise AssertionError(result.stderr)
    return result.returncode == 0


def other_user() -> str:
    """"nobody", when this process may run a child as nobody (root outside a sandbox)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("checking another user's access needs root and /usr/bin/python3")
    try:
        subprocess.run(["/usr/bin/python3", "-c", ""], user="nobody", check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError):  # e.g. Bazel's sandbox maps only root
        pytest.skip("this process may not run a child as another user here")
    return "nobody"


def usable_group(socket_dir: Path) -> int:
    """Group 1 ("daemon" on Debian: a group nobody is not in), when files may be given to it."""
    probe = socket_dir / "probe"
    probe.touch()
    try:
        os.chown(probe, -1, 1)
    except OSError:  # a user namespace that maps only root (Bazel's sandbox)
        pytest.skip("files cannot be given to group 1 here")
    finally:
        probe.unlink()
    return 1


def test_unix_socket_is_the_owners_only_whatever_the_umask(start_server, socket_dir):
    path = socket_dir / "s.sock"
    server = start_server("--unix-socket", str(path), command=UMASK_000)
    assert mode_of(path) == 0o600  # not 0777, which umask 000 would give
    assert unix_stub(path).Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()
    assert not connects_as(other_user(), path)  # may skip: checked last but one
    assert server.terminate() == 0


def test_unix_socket_group_may_use_it_too(start_server, socket_dir):
    group = grp.getgrgid(usable_group(socket_dir)).gr_name
    path = socket_dir / "s.sock"
    start_server("--unix-socket", str(path), "--unix-socket-group", group, command=UMASK_000)
    assert mode_of(path) == 0o660 and path.stat().st_gid == 1
    user = other_user()
    assert not connects_as(user, path)
    assert connects_as(user, path, extra_groups=[group])


def test_unix_socket_group_by_number(start_server, socket_dir):
    usable_group(socket_dir)
    path = socket_dir / "s.sock"
    start_server("--unix-socket", str(path), env=clean_env(SMQ_UNIX_SOCKET_GROUP="1"))
    assert mode_of(path) == 0o660 and path.stat().st_gid == 1


def test_a_second_server_leaves_a_running_servers_socket_alone(start_server, tmp_path, socket_dir):
    """The hostile run's case: a second server started by mistake (same database or
    another) replaced the running one's socket, or removed it when it stopped."""
    path = socket_dir / "s.sock"
    first = start_server("--unix-socket", str(path))
    for db in (tmp_path / "smq.db", tmp_path / "other.db"):  # same database, another
        result = start_and_fail(tmp_path, "--unix-socket", str(path), "--dbpath", str(db))
        assert_one_line_refusal(result, str(path), "in use by a running server")
        assert unix_stub(path).Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()
    assert first.terminate() == 0
    assert not path.exists()


def test_a_socket_left_by_a_killed_server_is_replaced(start_server, socket_dir):
    path = socket_dir / "s.sock"
    start_server("--unix-socket", str(path)).kill()
    assert path.exists()  # nobody listens on it now
    second = start_server("--unix-socket", str(path))
    assert unix_stub(path).Connect(pb.ConnectRequest(), timeout=TIMEOUT) == pb.ConnectResponse()
    assert second.terminate() == 0
