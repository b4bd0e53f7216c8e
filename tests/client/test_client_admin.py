"""smq.client against a real server: topic policies, durable named consumers (also through
`consumer=` on the iterators) and server info."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import smq
from support.servers import ServerProcess, module_server
from smq.client import Client, ConsumerInfo, ServerInfo, TopicPolicy

pytestmark = pytest.mark.process  # starts servers (tests/conftest.py)

WEEK = 7 * 86400


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """Server defaults that show in effective policies: a week's retention, drop-oldest."""
    proc = module_server(tmp_path_factory, "admin", "--retention-max-age", "7d",
                         "--on-full", "drop-oldest", "--max-message-size", "2MiB")
    yield proc
    proc.close()




# -- topic policies ----------------------------------------------------------------------------

def test_a_new_topic_has_no_overrides_and_the_server_defaults(client: Client, topic: str) -> None:
    overrides, effective = client.get_topic_policy(topic)
    assert overrides == TopicPolicy()
    assert effective == TopicPolicy(max_messages=0, max_bytes=0, max_age=WEEK,
                                    on_full="drop-oldest", keep_uncommitted=False)


def test_set_returns_the_effective_policy_and_replaces_the_overrides(client: Client, topic: str) -> None:
    effective = client.set_topic_policy(topic, max_messages=5, max_age=3600.0, on_full="reject")
    assert effective == TopicPolicy(5, 0, 3600, "reject", False)
    assert client.get_topic_policy(topic)[0] == TopicPolicy(max_messages=5, max_age=3600,
                                                            on_full="reject")
    # Replaces: what is not given goes back to the server's default.
    assert client.set_topic_policy(topic, max_bytes=1024) == TopicPolicy(0, 1024, WEEK, "drop-oldest", False)
    assert client.get_topic_policy(topic)[0] == TopicPolicy(max_bytes=1024)
    # Changing one field: pass the others along (docs/client.md's pattern).
    overrides, _ = client.get_topic_policy(topic)
    client.set_topic_policy(topic, **dataclasses.asdict(overrides) | {"keep_uncommitted": True})
    assert client.get_topic_policy(topic)[0] == TopicPolicy(max_bytes=1024, keep_uncommitted=True)
    client.set_topic_policy(topic)  # no override left
    assert client.get_topic_policy(topic)[0] == TopicPolicy()


def test_zero_means_no_limit_and_the_policy_applies(client: Client, topic: str) -> None:
    assert client.set_topic_policy(topic, max_messages=0, max_age=0).max_age == 0
    client.set_topic_policy(topic, max_messages=5)
    client.produce_many(topic, [b"m%d" % i for i in range(1, 11)])
    info = client.describe_topic(topic)
    assert (info.earliest_offset, info.latest_offset) == (6, 10)


def test_policy_errors(client: Client, topic: str) -> None:
    for call in (lambda: client.get_topic_policy("no-such-topic"),
                 lambda: client.set_topic_policy("no-such-topic", max_messages=1)):
        with pytest.raises(smq.NotFound, match="could not .* policy of topic 'no-such-topic'"):
            call()
    with pytest.raises(smq.InvalidArgument, match="on_full"):
        client.set_topic_policy(topic, on_full="panic")
    with pytest.raises(smq.InvalidArgument, match="max_bytes"):
        client.set_topic_policy(topic, max_bytes=-1)
    with pytest.raises(ValueError, match="whole number of seconds"):
        client.set_topic_policy(topic, max_age=1.5)  # refused before anything is sent
    assert client.get_topic_policy(topic)[0] == TopicPolicy()


def test_remote_writes_disabled(start_server, tmp_path: Path) -> None:
    socket = str(tmp_path / "s.sock")
    server = start_server("--allow-remote-writes=false", "--unix-socket", socket)
    with Client(unix_socket=socket) as local, Client("127.0.0.1", server.port) as remote:
        local.create_topic("t")
        local.produce_many("t", [b"1", b"2"])
        with pytest.raises(smq.PermissionDenied, match="Unix socket"):
            remote.set_topic_policy("t", max_messages=1)
        assert remote.get_topic_policy("t")[0] == TopicPolicy()  # reading is fine
        assert local.set_topic_policy("t", max_messages=1).max_messages == 1
        # Named consumers may commit remotely all the same; deleting one is a write.
        remote.commit_offset("remote", "t", 2)
        assert remote.committed_offset("remote", "t") == 2
        with pytest.raises(smq.PermissionDenied):
            remote.delete_consumer("remote")
        local.delete_consumer("remote")


# -- durable named consumers -----------------------------------------------------------------------

def test_commit_get_list_and_delete(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"x"] * 10)
    with pytest.raises(smq.NotFound, match="no committed offset"):
        client.committed_offset("fwd", topic)
    assert client.resume_offset("fwd", topic) == 0
    client.commit_offset("fwd", topic, 4)
    client.commit_offset("audit", topic, 0)  # 0: from the beginning
    assert client.committed_offset("fwd", topic) == 4
    assert client.resume_offset("fwd", topic) == 5
    assert client.resume_offset("audit", topic) == 1

    listed = client.list_consumers(topic)
    assert [(c.consumer, c.committed_offset, c.lag) for c in listed] == [("audit", 0, 10), ("fwd", 4, 6)]
    assert all(isinstance(c, ConsumerInfo) and c.topic == topic and c.updated_at > 1_600_000_000
               for c in listed)
    assert [c.consumer for c in client.list_consumers(topic, consumer="fwd")] == ["fwd"]
    assert {(c.consumer, c.topic) for c in client.list_consumers(consumer="fwd")} >= {("fwd", topic)}
    assert client.list_consumers(topic, consumer="nobody") == []
    with pytest.raises(smq.NotFound):
        client.list_consumers("no-such-topic")

    client.delete_consumer("fwd", topic)
    with pytest.raises(smq.NotFound):
        client.committed_offset("fwd", topic)
    with pytest.raises(smq.NotFound, match="consumer 'fwd' has no committed offset"):
        client.delete_consumer("fwd", topic)
    client.delete_consumer("audit")  # on every topic
    assert client.list_consumers(topic) == []


def test_a_consumer_on_several_topics_is_deleted_everywhere(client: Client, topic: str) -> None:
    other = topic + "-2"
    client.create_topic(other)
    client.produce(topic, b"a")
    client.produce(other, b"b")
    client.commit_offset("multi", topic, 1)
    client.commit_offset("multi", other, 1)
    assert len(client.list_consumers(consumer="multi")) == 2
    client.delete_consumer("multi")
    assert client.list_consumers(consumer="multi") == []
    with pytest.raises(smq.NotFound):
        client.delete_consumer("multi")


def test_consumer_errors(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"x"] * 3)
    with pytest.raises(smq.OffsetOutOfRange, match="above the latest offset 3"):
        client.commit_offset("c", topic, 4)
    with pytest.raises(smq.InvalidArgument):
        client.commit_offset("c", topic, -1)
    with pytest.raises(smq.InvalidArgument):
        client.commit_offset("bad name", topic, 1)
    for call in (lambda: client.commit_offset("c", "no-such-topic", 1),
                 lambda: client.committed_offset("c", "no-such-topic"),
                 lambda: client.resume_offset("c", "no-such-topic"),
                 lambda: client.delete_consumer("c", "no-such-topic")):
        with pytest.raises(smq.NotFound, match="no-such-topic"):
            call()


def test_iter_messages_with_a_consumer_resumes_after_its_commit(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"m%d" % i for i in range(1, 6)])
    read = [m.offset for m in client.iter_messages(topic, follow=False, consumer="batch")]
    assert read == [1, 2, 3, 4, 5] and client.committed_offset("batch", topic) == 5
    assert list(client.iter_messages(topic, follow=False, consumer="batch")) == []  # nothing new
    client.produce_many(topic, [b"m6", b"m7"])
    assert list(client.iter_messages(topic, follow=False, consumer="batch")) == [(b"m6", 6), (b"m7", 7)]
    assert client.committed_offset("batch", topic) == 7
    # from_offset is where a consumer without a commit starts.
    assert [m.offset for m in client.iter_messages(topic, 6, follow=False, consumer="late")] == [6, 7]


def test_a_page_is_committed_once_the_next_message_is_asked_for(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"x"] * 6)
    messages = client.iter_messages(topic, follow=False, page_size=2, consumer="careful")
    assert [next(messages).offset for _ in range(3)] == [1, 2, 3]  # 1-2 handled, 3 in hand
    messages.close()  # the loop stops: 3 is not known to be handled
    assert client.committed_offset("careful", topic) == 2
    assert next(client.iter_messages(topic, follow=False, consumer="careful")).offset == 3


def test_subscribe_with_a_consumer_commits_each_page_as_it_follows(client: Client, topic: str) -> None:
    client.produce_many(topic, [b"a", b"b", b"c"])
    client.commit_offset("follower", topic, 1)
    messages = client.subscribe(topic, consumer="follower")
    assert [next(messages).offset for _ in range(2)] == [2, 3]
    client.produce(topic, b"d")
    assert next(messages).offset == 4  # asking for it committed 3, the end of the page before
    assert client.committed_offset("follower", topic) == 3
    client.produce_many(topic, [b"e", b"f"])
    assert next(messages) == (b"e", 5)
    assert client.committed_offset("follower", topic) == 4
    messages.close()
    assert client.list_consumers(topic, consumer="follower")[0].lag == 2


def test_iterators_with_a_consumer_report_a_missing_topic(client: Client) -> None:
    for messages in (client.iter_messages("no-such-topic", follow=False, consumer="c"),
                     client.subscribe("no-such-topic", consumer="c", reconnect=False)):
        with pytest.raises(smq.NotFound, match="topic 'no-such-topic' does not exist"):
            next(messages)


# -- server info --------------------------------------------------------------------------

def test_server_info(client: Client, topic: str) -> None:
    before = client.server_info()
    assert isinstance(before, ServerInfo)
    assert (before.version, before.durability, before.max_message_size) == \
        (smq.__version__, "full", 2 * 1024**2)
    assert before.uptime > 0 and before.topics >= 1
    client.produce_many(topic, [b"12345"] * 4)
    after = client.server_info()
    assert after.commits > before.commits and after.committed_writes > before.committed_writes
    assert after.committed_messages - before.committed_messages == 4
    assert (after.stored_messages - before.stored_messages, after.stored_bytes - before.stored_bytes) == (4, 20)
    assert after.uptime > before.uptime
