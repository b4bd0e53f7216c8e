"""Age retention and a wall clock that steps (issue 13, point 3): in-process, on a real
database file, with the writer's clock driven by the test (no sleeps)."""
from __future__ import annotations

import logging

import pytest

from smq.server import clock
from smq.domain import TopicPolicy
from smq.server.storage import Storage
from smq.server.ops import Append, CreateTopic, EnforceAge
from smq.server.writer import GroupCommitWriter

DAY = 86400
NOW = clock.RELEASED + 30 * DAY  # a plausible wall clock


class Clocks:
    """A wall clock, a boot clock and a boot id the test moves: `wait` moves both clocks,
    `step` the wall clock only, `reboot` starts a new boot."""

    def __init__(self, wall: float) -> None:
        self.wall_time = float(wall)
        self.boot_time = 1000.0
        self.boot = "boot-1"

    def wait(self, seconds: float) -> None:
        self.wall_time += seconds
        self.boot_time += seconds

    def step(self, seconds: float) -> None:
        self.wall_time += seconds

    def reboot(self) -> None:
        self.boot = self.boot + "+"
        self.boot_time = 5.0

    def message_clock(self) -> clock.MessageClock:
        return clock.MessageClock(lambda: self.wall_time, lambda: self.boot_time, lambda: self.boot)


def open_writer(path, clocks: Clocks, max_age: int = 7 * DAY) -> GroupCommitWriter:
    return GroupCommitWriter(Storage(str(path)), defaults=TopicPolicy(0, 0, max_age, "reject", False),
                             clock=clocks.message_clock())


def close(writer: GroupCommitWriter) -> None:
    writer.close()
    writer.storage.close()


def stored(writer: GroupCommitWriter) -> tuple[int | None, int]:
    """(earliest offset, messages) of topic t after age retention ran."""
    writer.execute(EnforceAge())
    topic = writer.topics["t"]
    return topic.earliest, topic.message_count


def produce(writer: GroupCommitWriter, count: int) -> None:
    writer.execute(Append.to_topic("t", [b"m"] * count))


@pytest.fixture
def clocks() -> Clocks:
    return Clocks(NOW - 100 * DAY)  # the board's clock is 100 days slow (no RTC, no NTP yet)


def test_a_forward_step_deletes_nothing_and_ages_go_on(tmp_path, clocks, caplog):
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 50)
    clocks.wait(3 * DAY)
    with caplog.at_level(logging.WARNING, logger="smq.server.writer"):
        clocks.step(100 * DAY)  # NTP sets the right time
        assert stored(writer) == (1, 50)
        assert stored(writer) == (1, 50)
    steps = [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()]
    assert len(steps) == 1 and "forward by 100d 0h 0m" in steps[0], steps
    clocks.wait(4 * DAY - 10)
    assert stored(writer) == (1, 50)  # 7 days old less 10 s
    clocks.wait(11)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_backward_step_does_not_keep_messages_forever(tmp_path):
    clocks = Clocks(NOW)
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 10)
    clocks.step(-30 * DAY)
    clocks.wait(DAY)
    produce(writer, 10)
    assert stored(writer) == (1, 20)
    clocks.wait(6 * DAY + 1)  # the first ten are 7 days old (and a second)
    assert stored(writer) == (11, 10)
    clocks.wait(DAY)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_step_while_idle_is_followed_by_the_writers_tick(tmp_path, clocks):
    """No write comes after the step: the periodic upkeep moves the stored times."""
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    clocks.step(100 * DAY)
    writer._tick()  # what the writer thread does every second
    clocks.wait(7 * DAY - 10)
    assert stored(writer) == (1, 5)
    close(writer)


def test_at_start_a_clock_behind_the_stored_times_does_not_count_the_downtime(tmp_path, caplog):
    clocks = Clocks(NOW)
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    clocks.wait(2 * DAY)
    produce(writer, 5)
    close(writer)
    # Power cut; the board boots with the time it saved a day before (fake-hwclock).
    clocks.reboot()
    clocks.step(-3 * DAY)
    with caplog.at_level(logging.WARNING, logger="smq.server.writer"):
        writer = open_writer(tmp_path / "q.db", clocks)
    assert any("behind the newest stored message time" in r.getMessage() for r in caplog.records)
    assert stored(writer) == (1, 10)
    clocks.step(10 * DAY)  # NTP, later
    clocks.wait(5 * DAY - 10)  # the first five have been stored for 7 days less 10 s
    assert stored(writer) == (1, 10)
    clocks.wait(11)
    assert stored(writer) == (6, 5)
    close(writer)


def test_at_start_times_written_before_the_clock_was_set_count_from_now(tmp_path, clocks, caplog):
    early = Clocks(clock.RELEASED - 400 * DAY)  # 1970-like: before this version existed
    writer = open_writer(tmp_path / "q.db", early)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    close(writer)
    right = Clocks(NOW)  # rebooted; NTP set the clock before SMQ started
    right.boot = "boot-2"
    with caplog.at_level(logging.WARNING, logger="smq.server.writer"):
        writer = open_writer(tmp_path / "q.db", right)
    assert any("written before the clock was set" in r.getMessage() for r in caplog.records)
    right.wait(7 * DAY - 10)
    assert stored(writer) == (1, 5)
    right.wait(11)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_restart_in_the_same_boot_counts_the_time_stopped(tmp_path):
    clocks = Clocks(NOW)
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    close(writer)
    clocks.wait(8 * DAY)  # the boot clock measured it
    writer = open_writer(tmp_path / "q.db", clocks)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_restart_in_a_new_boot_does_not_count_the_time_stopped(tmp_path, caplog):
    """No clock spans a reboot: 8 days off cannot be told from a clock that was wrong."""
    clocks = Clocks(NOW)
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    clocks.wait(2 * DAY)
    close(writer)  # stopped 2 days after the newest message: those 2 days are not counted
    clocks.wait(8 * DAY)
    clocks.reboot()
    with caplog.at_level(logging.WARNING, logger="smq.server.writer"):
        writer = open_writer(tmp_path / "q.db", clocks)
    [note] = [r.getMessage() for r in caplog.records if "new boot" in r.getMessage()]
    assert "10d 0h 0m" in note and "kept longer, never shorter" in note
    assert stored(writer) == (1, 5)
    clocks.wait(7 * DAY - 10)
    assert stored(writer) == (1, 5)
    clocks.wait(11)  # their age grows while SMQ runs: not kept forever
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_clock_slow_for_a_whole_boot_then_right_after_a_reboot_deletes_nothing(tmp_path):
    """The hostile run's case: a board with no real-time clock runs a whole boot 100 days
    slow (still after this release), and the next boot has NTP's time before SMQ starts."""
    slow = Clocks(NOW + 50 * DAY)
    writer = open_writer(tmp_path / "q.db", slow)
    writer.execute(CreateTopic("t"))
    produce(writer, 50)
    close(writer)
    right = Clocks(NOW + 150 * DAY)
    right.boot = "boot-2"
    writer = open_writer(tmp_path / "q.db", right)
    assert stored(writer) == (1, 50)
    right.wait(7 * DAY - 10)
    assert stored(writer) == (1, 50)
    right.wait(11)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_step_while_stopped_in_the_same_boot_deletes_nothing(tmp_path, clocks, caplog):
    """NTP steps the clock while SMQ is stopped (a restart, an upgrade): the kernel's boot
    id and the boot clock show the step."""
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 50)
    close(writer)
    clocks.wait(60)
    clocks.step(100 * DAY)
    with caplog.at_level(logging.WARNING, logger="smq.server.writer"):
        writer = open_writer(tmp_path / "q.db", clocks)
    assert any("while SMQ was stopped" in r.getMessage() for r in caplog.records)
    assert stored(writer) == (1, 50)
    clocks.wait(7 * DAY - 70)
    assert stored(writer) == (1, 50)
    clocks.wait(11)
    assert stored(writer) == (None, 0)
    close(writer)


def test_a_step_seen_by_a_commit_is_kept_across_a_restart(tmp_path, clocks):
    """The offset that absorbs a step is stored with the commit: a later start goes on."""
    writer = open_writer(tmp_path / "q.db", clocks)
    writer.execute(CreateTopic("t"))
    produce(writer, 5)
    clocks.step(100 * DAY)
    produce(writer, 5)
    close(writer)
    clocks.wait(DAY)  # same boot: the day stopped counts, the stored offset must hold
    writer = open_writer(tmp_path / "q.db", clocks)
    clocks.wait(6 * DAY - 10)
    assert stored(writer) == (1, 10)
    clocks.wait(11)
    assert stored(writer) == (None, 0)
    close(writer)


def test_slewing_is_not_a_step():
    clocks = Clocks(NOW)
    message_clock = clocks.message_clock()
    for _ in range(10_000):  # NTP slews at most 500 ppm: 0.5 ms a second
        clocks.wait(1)
        clocks.step(0.0005)
        assert message_clock.tick() == 0
    assert message_clock.offset == 0


# -- the reproduction, on a real server whose wall clock the test steps ------------

SHIFTED_CLOCK_SERVER = """
import sys, time
from smq import cli
from smq.server import clock
def wall():
    with open(sys.argv[1]) as f:
        return time.time() + float(f.read())
clock.MessageClock.__init__.__defaults__ = (wall, clock._boot_clock, clock._boot_id)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.process
def test_a_real_server_keeps_messages_through_a_clock_step(start_server, tmp_path):
    import sys

    from smq._proto import smq_pb2
    from support.poll import eventually
    offset = tmp_path / "clock-offset"
    offset.write_text(str(-100 * DAY))
    server = start_server("--retention-max-age", "7d", command=[
        sys.executable, "-c", SHIFTED_CLOCK_SERVER, str(offset)])
    stub = server.stub()
    stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
    for _ in range(50):
        stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"m"))
    offset.write_text("0")  # NTP steps the clock 100 days forward
    # The writer reads the clock every second (and at each commit): it logs the step.
    eventually(lambda: "stepped forward by 100d" in server.log(), timeout=15,
               message="the step was not seen")
    # A commit after the step, whose retention sees the new time: nothing is deleted.
    stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"m"))
    info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic="t")).topic
    assert (info.earliest_offset, info.message_count) == (1, 51)


@pytest.mark.process
def test_starting_never_writes_so_a_full_disk_cannot_stop_it(start_server, tmp_path):
    """The clock behind the newest stored time at start (fake-hwclock after a power cut)
    on a filesystem another program filled to the last byte: SMQ starts and serves."""
    import os
    import shutil
    import signal
    import sys

    from support.disks import tmpfs
    from smq._proto import smq_pb2
    with tmpfs(tmp_path / "small", "2m") as mount:
        offset = tmp_path / "clock-offset"
        offset.write_text("0")
        command = [sys.executable, "-c", SHIFTED_CLOCK_SERVER, str(offset)]
        server = start_server("--min-free-space", "0", "--retention-max-age", "7d",
                              db=mount / "q.db", command=command)
        stub = server.stub()
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic="t"))
        for _ in range(20):
            stub.Produce(smq_pb2.ProduceRequest(topic="t", message=b"m" * 1000))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        ballast = os.open(mount / "ballast", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(ballast, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        os.close(ballast)
        assert shutil.disk_usage(mount).free == 0
        offset.write_text(str(-3600))
        server = start_server("--min-free-space", "0", "--retention-max-age", "7d",
                              db=mount / "q.db", command=command)
        info = server.stub().DescribeTopic(smq_pb2.DescribeTopicRequest(topic="t")).topic
        assert (info.earliest_offset, info.message_count) == (1, 20)
        assert "stepped back by 0d 1h 0m (3600 s) while SMQ was stopped" in server.log()
        assert "Traceback" not in server.log()
