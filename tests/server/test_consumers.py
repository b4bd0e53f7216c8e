"""Durable named consumers: committed offsets stored in the database, at most
--max-consumers-per-topic of them per topic."""
import concurrent.futures

import grpc
import pytest

from support.servers import make_topic
from smq._proto import smq_pb2, smq_pb2_grpc

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)


def stub_for(target):
    return smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(target))


def commit(stub, consumer, topic, offset):
    stub.CommitOffset(smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=offset))


def committed(stub, consumer, topic):
    return stub.GetCommittedOffset(smq_pb2.GetCommittedOffsetRequest(consumer=consumer, topic=topic)).offset


def status_of(call, *args):
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code()


def test_commit_get_list_delete_and_restart(start_server, tmp_path):
    server = start_server("--allow-remote-writes=false", "--unix-socket", str(tmp_path / "s.sock"))
    local = stub_for(f"unix:{tmp_path / 's.sock'}")
    make_topic(local, "t", 10)
    make_topic(local, "u", 3)
    stub = server.stub()  # remote, read-only: may still commit its own offsets
    assert status_of(committed, stub, "fwd", "t") == grpc.StatusCode.NOT_FOUND
    commit(stub, "fwd", "t", 4)
    commit(stub, "fwd", "u", 3)
    commit(stub, "audit", "t", 0)
    assert committed(stub, "fwd", "t") == 4
    listed = {(c.consumer, c.topic): (c.committed_offset, c.lag)
              for c in stub.ListConsumers(smq_pb2.ListConsumersRequest()).consumers}
    assert listed == {("audit", "t"): (0, 10), ("fwd", "t"): (4, 6), ("fwd", "u"): (3, 0)}
    only_t = stub.ListConsumers(smq_pb2.ListConsumersRequest(topic="t")).consumers
    assert sorted(c.consumer for c in only_t) == ["audit", "fwd"]

    assert server.terminate() == 0
    server = start_server(db=tmp_path / "smq.db")
    stub = server.stub()
    assert committed(stub, "fwd", "t") == 4
    stub.DeleteConsumer(smq_pb2.DeleteConsumerRequest(consumer="fwd"))
    assert status_of(committed, stub, "fwd", "u") == grpc.StatusCode.NOT_FOUND
    assert committed(stub, "audit", "t") == 0
    assert status_of(stub.DeleteConsumer, smq_pb2.DeleteConsumerRequest(consumer="fwd")) == \
        grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("consumer, topic, offset, code", [
    ("c", "t", 4, grpc.StatusCode.OUT_OF_RANGE),
    ("c", "t", -1, grpc.StatusCode.INVALID_ARGUMENT),
    ("bad name", "t", 1, grpc.StatusCode.INVALID_ARGUMENT),
    ("", "t", 1, grpc.StatusCode.INVALID_ARGUMENT),
    ("c", "missing", 1, grpc.StatusCode.NOT_FOUND),
])
def test_commit_errors(stub, consumer, topic, offset, code):
    make_topic(stub, "t", 3)
    assert status_of(commit, stub, consumer, topic, offset) == code


def test_deleting_a_topic_forgets_its_consumers(stub):
    make_topic(stub, "t", 3)
    commit(stub, "c", "t", 2)
    stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic="t"))
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    assert status_of(committed, stub, "c", "t") == grpc.StatusCode.NOT_FOUND


def test_retention_keeps_what_a_consumer_has_not_committed(stub):
    make_topic(stub, "t")
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic="t", policy=smq_pb2.TopicPolicy(max_messages=5, keep_uncommitted=True)))
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[b"m"] * 3))
    commit(stub, "slow", "t", 3)
    stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="t", messages=[b"m"] * 17))  # 20 in all
    # max_messages alone would keep 16..20; the consumer still needs 4 onwards.
    assert stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic="t")).offset == 4
    commit(stub, "slow", "t", 18)  # now retention may take everything up to 15
    assert stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic="t")).offset == 16
    # An explicit trim is the user's decision and is not held back.
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="t", offset=19))
    assert stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic="t")).offset == 20


def test_lag_counts_only_stored_messages(stub):
    make_topic(stub, "t", 6)
    commit(stub, "c", "t", 1)
    stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic="t", offset=3))
    (info,) = stub.ListConsumers(smq_pb2.ListConsumersRequest(topic="t")).consumers
    assert info.lag == 3  # offsets 4, 5, 6 are stored; 2 and 3 were deleted, not owed


def test_listing_consumers_of_a_missing_topic_is_not_found(stub):
    assert status_of(stub.ListConsumers, smq_pb2.ListConsumersRequest(topic="nope")) == \
        grpc.StatusCode.NOT_FOUND


def test_remote_callers_may_commit_but_not_delete_consumers(start_server, tmp_path):
    server = start_server("--allow-remote-writes=false", "--unix-socket", str(tmp_path / "s.sock"))
    make_topic(stub_for(f"unix:{tmp_path / 's.sock'}"), "t", 2)
    remote = server.stub()
    commit(remote, "c", "t", 2)
    assert status_of(remote.DeleteConsumer, smq_pb2.DeleteConsumerRequest(consumer="c")) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert committed(remote, "c", "t") == 2


def test_sub_second_default_max_age_is_not_forever(start_server):
    server = start_server("--retention-max-age", "500ms")
    stub = server.stub()
    make_topic(stub, "t")
    policy = stub.GetTopicPolicy(smq_pb2.GetTopicPolicyRequest(topic="t"))
    assert policy.effective.max_age_seconds == 1


# -- named consumers per topic are bounded (CommitOffset is open to read-only callers) --

def test_a_read_only_client_cannot_add_consumers_without_limit(start_server, tmp_path):
    socket = tmp_path / "s.sock"
    flags = ("--allow-remote-writes=false", "--unix-socket", str(socket),
             "--max-consumers-per-topic", "3")
    server = start_server(*flags)
    local = stub_for(f"unix:{socket}")
    make_topic(local, "t", 1)
    make_topic(local, "other", 1)
    remote = server.stub()

    def commit(consumer: str, topic: str = "t") -> None:
        remote.CommitOffset(smq_pb2.CommitOffsetRequest(consumer=consumer, topic=topic, offset=1),
                            timeout=20)

    for consumer in ("c1", "c2", "c3"):
        commit(consumer)
    with pytest.raises(grpc.RpcError) as info:
        commit("c4")
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        "topic 't' has 3 named consumers, the most this server allows "
        "(--max-consumers-per-topic): delete one it no longer needs "
        "(smq consumer delete NAME --topic t), or raise the limit")
    commit("c1")  # committing again for an existing consumer always works
    commit("c4", "other")  # the bound is per topic
    local.DeleteConsumer(smq_pb2.DeleteConsumerRequest(consumer="c2", topic="t"), timeout=20)
    commit("c4")  # a freed place can be taken

    assert server.terminate() == 0
    remote = start_server(*flags, db=tmp_path / "smq.db").stub()  # counted from the file
    assert status_of(commit, "c5") == grpc.StatusCode.RESOURCE_EXHAUSTED
    commit("c3")


def test_the_bound_holds_under_concurrent_commits(start_server):
    server = start_server("--max-consumers-per-topic", "10")
    stub = server.stub()
    make_topic(stub, "t", 1)

    def commit(consumer: str) -> grpc.StatusCode:
        try:
            stub.CommitOffset(smq_pb2.CommitOffsetRequest(consumer=consumer, topic="t", offset=1),
                              timeout=20)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(commit, [f"c{i}" for i in range(64)]))
    assert codes.count(grpc.StatusCode.OK) == 10
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 54
    listed = stub.ListConsumers(smq_pb2.ListConsumersRequest(topic="t"), timeout=20).consumers
    assert len(listed) == 10
