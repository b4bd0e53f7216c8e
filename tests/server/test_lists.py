"""Lists of any length. The adversarial run's case: 15,000 topics of 249-character names,
or 15,000 consumer names, and ListTopics, ListConsumers, `smq topic list`, `smq consumer
list` and `smq topic create` (which listed first) all failed with RESOURCE_EXHAUSTED
"Sent message larger than max". Here at three times that: lists come in pages that fit
the send limit by their encoded size, a client from before paging gets the whole list
or a refusal that says to page (never a cut list), smq.client and the smq command page
through (and still work with a server from before paging), `smq topic create` does not
list (tests/server/test_consumers.py has the bound on consumers per topic).

The big databases are filled by the real storage layer in one transaction (what 45,000
CreateTopic calls leave behind, without their ~30 s of round trips), then served.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from support import ROOT
from support.servers import ServerProcess, clean_env, make_topic, point_cli_at
from smq._proto import smq_pb2 as pb
from smq.client import Client
from smq.server.config import ServerConfig as Config
from smq.server.lists import MAX_PAGE_SIZE
from smq.server.app import send_limit
from smq.server.storage import Storage

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

TIMEOUT = 60.0
MANY = 45_000  # three times the 15,000
SEND_LIMIT = send_limit(Config())  # the servers here run with the default settings
# The last commit whose server predates paged lists and CreateTopicResponse.created.
SERVER_BEFORE_PAGING = "b535860"


def long_name(i: int, fill: str) -> str:
    """249 characters, the longest name allowed; sorting them sorts by i."""
    return f"{i:06d}".ljust(249, fill)


def fill_database(db: Path, topics: list[str], consumers: list[tuple[str, str]] = ()) -> None:
    """Topics and (consumer, topic) offsets written by smq.server.storage in one transaction."""
    storage = Storage(str(db))
    try:
        with storage.write_transaction():
            created = {name: storage.insert_topic(name) for name in topics}
            for consumer, topic in consumers:
                storage.insert_consumer(consumer, created[topic], 0)
    finally:
        storage.close()


def serve(tmp: Path, *flags: str) -> ServerProcess:
    return ServerProcess(["--dbpath", str(tmp / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
                          *flags], tmp).wait_serving(timeout=60)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def all_pages(call, request) -> list:
    """Every page of a paged list call, each checked to fit the send limit."""
    pages = []
    while True:
        page = call(request, timeout=TIMEOUT)
        assert page.ByteSize() <= SEND_LIMIT
        pages.append(page)
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


# -- 45,000 topics of 249-character names -----------------------------------------------------

TOPIC_NAMES = [long_name(i, "t") for i in range(MANY)]


@pytest.fixture(scope="module")
def many_topics(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("many-topics")
    fill_database(tmp / "smq.db", TOPIC_NAMES)
    server = serve(tmp)
    yield server
    server.close()


def test_a_client_before_paging_is_told_to_page_when_the_list_does_not_fit(many_topics):
    error = error_of(lambda: many_topics.stub().ListTopics(pb.ListTopicsRequest(), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MANY} topics do not fit one answer of at most {SEND_LIMIT} bytes" in error.details()
    assert "page_size and page_token" in error.details()


def test_topic_pages_fit_the_send_limit_and_hold_every_topic_once(many_topics):
    stub = many_topics.stub()
    pages = all_pages(stub.ListTopics, pb.ListTopicsRequest(page_size=MAX_PAGE_SIZE + 1))
    assert [len(p.topics) for p in pages] == [MAX_PAGE_SIZE] * 4 + [MANY - 4 * MAX_PAGE_SIZE]
    assert [t.name for p in pages for t in p.topics] == TOPIC_NAMES
    pages = all_pages(stub.ListTopics, pb.ListTopicsRequest(page_token=TOPIC_NAMES[-3]))
    assert [t.name for p in pages for t in p.topics] == TOPIC_NAMES[-2:]  # after the token


def test_the_client_lists_every_topic(many_topics):
    with Client("127.0.0.1", many_topics.port) as client:
        assert [t.name for t in client.list_topics()] == TOPIC_NAMES


def test_smq_topic_list_prints_every_topic(many_topics, smq, monkeypatch, tmp_path):
    point_cli_at(many_topics, monkeypatch, tmp_path)
    code, out, err = smq("topic", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == MANY + 1 and lines[1].startswith(TOPIC_NAMES[0] + "  0")


def test_smq_topic_create_does_not_list(many_topics, smq, monkeypatch, tmp_path):
    point_cli_at(many_topics, monkeypatch, tmp_path)
    try:
        assert smq("topic", "create", "one-more") == (0, "created topic 'one-more'\n", "")
    finally:  # the module's other tests list exactly TOPIC_NAMES, in any order
        many_topics.stub().DeleteTopic(pb.DeleteTopicRequest(topic="one-more"), timeout=TIMEOUT)
    assert smq("topic", "create", TOPIC_NAMES[7]) == \
        (0, f"topic {TOPIC_NAMES[7]!r} already exists\n", "")


# -- 45,000 consumers of 249-character names on a topic of a 249-character name --------------

TOPIC = long_name(0, "t")
CONSUMER_NAMES = [long_name(i, "c") for i in range(MANY)]


@pytest.fixture(scope="module")
def many_consumers(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("many-consumers")
    fill_database(tmp / "smq.db", [TOPIC], [(name, TOPIC) for name in CONSUMER_NAMES])
    server = serve(tmp, "--max-consumers-per-topic", str(MANY + 1))
    yield server
    server.close()


def test_a_client_before_paging_is_told_to_page_consumers_too(many_consumers):
    error = error_of(lambda: many_consumers.stub().ListConsumers(pb.ListConsumersRequest(),
                                                                 timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MANY} consumer offsets do not fit one answer" in error.details()


def test_consumer_pages_are_cut_by_their_encoded_size(many_consumers):
    """10,000 of these would take ~5 MB: each page stops just below the send limit."""
    pages = all_pages(many_consumers.stub().ListConsumers,
                      pb.ListConsumersRequest(topic=TOPIC, page_size=MAX_PAGE_SIZE))
    assert [c.consumer for p in pages for c in p.consumers] == CONSUMER_NAMES
    entry = pages[0].consumers[0].ByteSize() + 3  # one entry with its framing
    for page in pages[:-1]:
        assert len(page.consumers) < MAX_PAGE_SIZE
        assert SEND_LIMIT - 2 * entry < page.ByteSize() <= SEND_LIMIT


def test_the_client_and_smq_consumer_list_every_consumer(many_consumers, smq, monkeypatch, tmp_path):
    with Client("127.0.0.1", many_consumers.port) as client:
        assert [c.consumer for c in client.list_consumers(TOPIC)] == CONSUMER_NAMES
    point_cli_at(many_consumers, monkeypatch, tmp_path)
    code, out, err = smq("consumer", "list", "--json")
    assert (code, err) == (0, "")
    assert len(out.splitlines()) == MANY


def test_a_raised_bound_counts_the_stored_consumers(many_consumers):
    stub = many_consumers.stub()

    def commit(consumer: str) -> None:
        stub.CommitOffset(pb.CommitOffsetRequest(consumer=consumer, topic=TOPIC, offset=0),
                          timeout=TIMEOUT)

    commit("one-more")  # consumer number MANY + 1: the bound
    try:
        error = error_of(lambda: commit("and-another"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"has {MANY + 1} named consumers" in error.details()
        commit(CONSUMER_NAMES[5])  # an existing consumer may always commit
    finally:  # the module's other tests list exactly CONSUMER_NAMES, in any order
        stub.DeleteConsumer(pb.DeleteConsumerRequest(consumer="one-more", topic=TOPIC),
                            timeout=TIMEOUT)


# -- pages and tokens, on a few topics --------------------------------------------------------

def names_of(pages) -> list[str]:
    return [t.name for p in pages for t in p.topics]


def test_a_client_before_paging_gets_the_whole_list_when_it_fits(stub):
    for name in ("c", "a", "b"):
        make_topic(stub, name)
    answer = stub.ListTopics(pb.ListTopicsRequest(), timeout=TIMEOUT)
    assert [t.name for t in answer.topics] == ["a", "b", "c"] and answer.next_page_token == ""


def test_small_pages_go_on_after_a_deleted_topic(stub):
    for name in ("a", "b", "c", "d", "e"):
        make_topic(stub, name)
    first = stub.ListTopics(pb.ListTopicsRequest(page_size=2), timeout=TIMEOUT)
    assert [t.name for t in first.topics] == ["a", "b"] and first.next_page_token
    stub.DeleteTopic(pb.DeleteTopicRequest(topic="b"), timeout=TIMEOUT)
    rest = all_pages(stub.ListTopics, pb.ListTopicsRequest(page_size=2,
                                                           page_token=first.next_page_token))
    assert [[t.name for t in p.topics] for p in rest] == [["c", "d"], ["e"]]


@pytest.mark.parametrize("request_fields", [
    {"page_size": -1}, {"page_token": "no/such/shape"}, {"page_token": "bad name"},
    {"page_token": "x" * 250}])
def test_bad_paging_fields_are_invalid_argument(stub, request_fields):
    make_topic(stub, "t")
    for call, request in ((stub.ListTopics, pb.ListTopicsRequest(**request_fields)),
                          (stub.ListConsumers, pb.ListConsumersRequest(**request_fields))):
        error = error_of(lambda: call(request, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request_fields


def test_consumer_pages_follow_the_filters(stub):
    make_topic(stub, "t", 1)
    make_topic(stub, "u", 1)
    for consumer in ("c1", "c2", "c3"):
        for topic in ("t", "u"):
            stub.CommitOffset(pb.CommitOffsetRequest(consumer=consumer, topic=topic, offset=1),
                              timeout=TIMEOUT)
    pages = all_pages(stub.ListConsumers, pb.ListConsumersRequest(page_size=4))
    assert [[(c.consumer, c.topic) for c in p.consumers] for p in pages] == [
        [("c1", "t"), ("c1", "u"), ("c2", "t"), ("c2", "u")], [("c3", "t"), ("c3", "u")]]
    pages = all_pages(stub.ListConsumers, pb.ListConsumersRequest(topic="u", page_size=2))
    assert [[c.consumer for c in p.consumers] for p in pages] == [["c1", "c2"], ["c3"]]


# -- a server from before paging ------------------------------------------------------------------

@pytest.fixture
def server_before_paging(start_server, tmp_path) -> ServerProcess:
    """This SMQ as it was before paging, run from the git history of this checkout."""
    try:
        archive = subprocess.run(["git", "archive", SERVER_BEFORE_PAGING, "smq"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {SERVER_BEFORE_PAGING} is not in this checkout's git history")
    old = tmp_path / "before-paging"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    # Ahead of the path this test runs with (Bazel puts the dependencies there).
    path = os.pathsep.join(filter(None, [str(old), os.environ.get("PYTHONPATH")]))
    return start_server(command=[sys.executable, "-m", "smq"], env=clean_env(PYTHONPATH=path))


def test_the_client_works_with_a_server_from_before_paging(server_before_paging):
    with Client("127.0.0.1", server_before_paging.port) as client:
        assert client.create_topic("b") is None  # it does not say
        client.create_topic("a")
        client.commit_offset("c", "a", 0)
        assert [t.name for t in client.list_topics()] == ["a", "b"]
        assert [(c.consumer, c.topic) for c in client.list_consumers()] == [("c", "a")]


def test_smq_topic_create_on_a_server_from_before_paging(server_before_paging, smq, monkeypatch,
                                                        tmp_path):
    point_cli_at(server_before_paging, monkeypatch, tmp_path)
    assert smq("topic", "create", "t") == (0, "created topic 't'\n", "")
    assert smq("topic", "create", "t") == (0, "topic 't' already exists\n", "")
