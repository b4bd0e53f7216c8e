"""Durable named consumers: committed offsets stored in the database."""
import grpc
import pytest

from conftest import make_topic
from smq._proto import smq_pb2, smq_pb2_grpc


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
