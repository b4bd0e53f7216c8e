"""The hand-off between callers and the group-commit writer (smq/server/writer.py), in-process.

No timing is asserted: only who commits, what shares a commit, and shutdown order.
"""
from __future__ import annotations

import threading
import time

import pytest

from smq.errors import Unavailable
from smq.server.schema import StorageOptions
from smq.server.storage import Storage
from smq.server.ops import Append, CreateTopic, WriteOp
from smq.server.writer import GroupCommitWriter
from support.poll import eventually


class Probe(WriteOp):
    """Records the thread that applies it; with `hold`, blocks inside the transaction."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__()
        self.hold = hold
        self.entered = threading.Event()
        self.thread: threading.Thread | None = None

    def apply(self, writer: GroupCommitWriter) -> None:
        self.thread = threading.current_thread()
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        self.result = True


@pytest.fixture
def writer(tmp_path):
    storage = Storage(str(tmp_path / "w.db"), StorageOptions(durability="normal"))
    writer = GroupCommitWriter(storage)
    writer.execute(CreateTopic("t"), 10)
    yield writer
    writer.close(10)
    storage.close()


def test_a_lone_writer_commits_in_its_own_thread(writer):
    probe = Probe()
    assert writer.execute(probe, 10) is True
    assert probe.thread is threading.current_thread()
    assert writer.execute(Append.to_topic("t", [b"a", b"b"]), 10) == (1, 2)


def test_writes_that_arrive_during_a_commit_share_the_next_one(writer):
    hold = threading.Event()
    first = Probe(hold)
    leader = threading.Thread(target=writer.execute, args=(first, 10))
    leader.start()
    assert first.entered.wait(10)  # the caller holds the commit lock, inside its transaction
    queued: list[WriteOp] = []
    submit = writer.submit
    writer.submit = lambda op: queued.append(op) or submit(op)
    results: list = []
    others = [threading.Thread(target=lambda: results.append(
        writer.execute(Append.to_topic("t", [b"x"]), 10))) for _ in range(5)]
    for thread in others:
        thread.start()
    eventually(lambda: len(queued) == 5, interval=0.001)  # the commit lock is taken: all five queue up
    commits = writer.commits
    hold.set()
    leader.join(10)
    for thread in others:
        thread.join(10)
    assert sorted(results) == [(n, n) for n in range(1, 6)]
    assert writer.commits - commits == 2  # the held one, then the five together
    assert first.thread is leader


def test_a_wrong_guess_of_concurrent_writers_costs_one_wait(writer):
    writer._expected = 3  # as if three writers had been about at the last commit
    probe = Probe()
    assert writer.execute(probe, 10) is True
    assert probe.thread is writer._thread  # queued, and committed alone after the wait
    probe = Probe()
    assert writer.execute(probe, 10) is True
    assert probe.thread is threading.current_thread()  # alone again: no more waiting


def test_close_waits_for_a_callers_own_commit_then_refuses(writer):
    hold = threading.Event()
    probe = Probe(hold)
    caller = threading.Thread(target=writer.execute, args=(probe, 10))
    caller.start()
    assert probe.entered.wait(10)
    closer = threading.Thread(target=writer.close, args=(10,))
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive()  # still inside the caller's transaction
    hold.set()
    closer.join(10)
    caller.join(10)
    assert probe.done() and probe.error is None
    with pytest.raises(Unavailable):
        writer.execute(Probe(), 10)
