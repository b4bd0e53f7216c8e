"""Crashes under load: kill -9 of the server at a random moment, again and again, on
the same database file, with concurrent producers (Produce, ProduceBatch,
StreamProduce) and consumers (StreamConsume, Subscribe) running.

kill -9 is a crash of the process, not a cut of the power: the kernel still writes
out everything SQLite had written, fsynced or not. It proves the commit protocol
(nothing acknowledged is lost, nothing half-written is visible, offsets are never
reused) but not that the fsyncs reach the disk; `--durability full` (used here)
fsyncs the WAL before every acknowledgement.

After every kill, on a copy of the files (the server is dead): `PRAGMA
integrity_check` is ok; each topic's offsets are 1..max with no hole and its stored
next_offset is max + 1; every acknowledged message is at its offset with its exact
payload; every message a consumer was sent, or an earlier check found, is still
there unchanged; every stored payload is one a producer sent, exactly once; a
ProduceBatch is there whole or not at all; a StreamProduce is there as a prefix
(whole if acknowledged). After the restart a new message gets max + 1, and each
consumer resumes from the offset it remembers and sees no gap. Now and then the
server is killed again while it starts up on the crashed file.

SMQ_POWERCUT_CYCLES sets the number of kills (default 20, about a minute);
SMQ_POWERCUT_SEED the random seed (printed).
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import time
import zlib
from pathlib import Path

import apsw
import grpc

from support.poll import eventually
from smq._proto import smq_pb2, smq_pb2_grpc
from smq.server.topic_state import committed_topics, stored_messages

CYCLES = int(os.environ.get("SMQ_POWERCUT_CYCLES", "20"))
SEED = int(os.environ.get("SMQ_POWERCUT_SEED", str(random.randrange(1 << 30))))
TOPICS = ["pc-0", "pc-1", "pc-2"]
CALL_TIMEOUT = 60.0  # generous: only a hang should ever reach it


def payload(pid: int, seq: int) -> bytes:
    """The message producer `pid` sends as its `seq`-th: its ids, then reproducible bytes."""
    rng = random.Random(pid * 1_000_003 + seq)
    size = 16_000 if rng.random() < 0.01 else rng.choice([0, 10, 100, 700]) + rng.randrange(300)
    return f"{pid}:{seq}:".encode() + rng.randbytes(size)


def parse(data: bytes) -> tuple[int, int] | None:
    """(pid, seq) of a payload built by `payload`, or None if it is not exactly one."""
    try:
        pid, seq, _ = data.split(b":", 2)
        ids = int(pid), int(seq)
    except ValueError:
        return None
    return ids if payload(*ids) == data else None


class Ledger:
    """What the clients sent, what was acknowledged, and what is known committed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: set[tuple[int, int]] = set()
        self.acked: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, offset) -> ids
        self.batches: list[tuple[str, list[tuple[int, int]]]] = []
        self.streams: list[tuple[str, list[tuple[int, int]], int | None]] = []  # last offset if acked
        # (topic, offset) -> (crc32 of the payload, ids): known committed, must never change
        self.committed: dict[tuple[str, int], tuple[int, tuple[int, int] | None]] = {}
        self.problems: list[str] = []
        self.delivered = 0  # messages consumers received (each checked)
        self.next_pid = 1

    def pid(self) -> int:
        with self.lock:
            self.next_pid += 1
            return self.next_pid

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def ack(self, topic: str, offset: int, ids: tuple[int, int]) -> None:
        with self.lock:
            if (topic, offset) in self.acked:
                self.problems.append(f"offset {topic}/{offset} acknowledged twice")
            self.acked[(topic, offset)] = ids

    def seen_committed(self, topic: str, offset: int, data: bytes) -> None:
        crc = zlib.crc32(data)
        with self.lock:
            known = self.committed.setdefault((topic, offset), (crc, None))
            if known[0] != crc:
                self.problems.append(f"{topic}/{offset} changed content")

    def acknowledged(self) -> int:
        """Messages acknowledged: each of an acknowledged stream, not only its last."""
        return len(self.acked) + sum(len(ids) - 1 for _, ids, last in self.streams if last is not None)


class Cycle:
    """One server life: the clients run until it is killed."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.killed = threading.Event()
        self.threads: list[threading.Thread] = []
        self.calls: list[grpc.Future] = []

    def stub(self) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        return smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(self.address))

    def spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=(self, *args), daemon=True)
        thread.start()
        self.threads.append(thread)

    def failed(self, ledger: Ledger, who: str, exc: grpc.RpcError) -> None:
        if not self.killed.is_set():
            ledger.problem(f"{who}: {exc.code()} {exc.details()} before the kill")


def produce_unary(cycle: Cycle, ledger: Ledger, rng: random.Random) -> None:
    stub, pid, seq = cycle.stub(), ledger.pid(), 0
    while not cycle.killed.is_set():
        seq += 1
        topic = rng.choice(TOPICS)
        with ledger.lock:
            ledger.sent.add((pid, seq))
        try:
            reply = stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=payload(pid, seq)),
                                 timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return cycle.failed(ledger, f"Produce {pid}:{seq}", exc)
        ledger.ack(topic, reply.offset, (pid, seq))


def produce_batches(cycle: Cycle, ledger: Ledger, rng: random.Random) -> None:
    stub, pid, seq = cycle.stub(), ledger.pid(), 0
    while not cycle.killed.is_set():
        topic = rng.choice(TOPICS)
        ids = [(pid, seq + i) for i in range(1, rng.randint(1, 60) + 1)]
        seq += len(ids)
        with ledger.lock:
            ledger.sent.update(ids)
            ledger.batches.append((topic, ids))
        try:
            reply = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(
                topic=topic, messages=[payload(*i) for i in ids]), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return cycle.failed(ledger, f"ProduceBatch {pid}", exc)
        if reply.last_offset - reply.first_offset + 1 != len(ids):
            ledger.problem(f"batch of {len(ids)} acked as {reply.first_offset}..{reply.last_offset}")
        for index, one in enumerate(ids):
            ledger.ack(topic, reply.first_offset + index, one)


def produce_streams(cycle: Cycle, ledger: Ledger, rng: random.Random) -> None:
    stub, pid, seq = cycle.stub(), ledger.pid(), 0
    while not cycle.killed.is_set():
        topic = rng.choice(TOPICS)
        ids = [(pid, seq + i) for i in range(1, rng.randint(1, 300) + 1)]
        seq += len(ids)
        with ledger.lock:
            ledger.sent.update(ids)
            entry = len(ledger.streams)
            ledger.streams.append((topic, ids, None))
        try:
            reply = stub.StreamProduce(
                (smq_pb2.ProduceRequest(topic=topic, message=payload(*i)) for i in ids),
                timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return cycle.failed(ledger, f"StreamProduce {pid}", exc)
        with ledger.lock:
            ledger.streams[entry] = (topic, ids, reply.offset)
        ledger.ack(topic, reply.offset, ids[-1])


class Consumer:
    """Remembers the next offset it wants across server lives; never skips one."""

    def __init__(self, topic: str, subscribe: bool) -> None:
        self.topic = topic
        self.subscribe = subscribe
        self.cursor = 1
        self.resumes = 0

    def take(self, ledger: Ledger, offset: int, data: bytes) -> None:
        if offset != self.cursor:
            ledger.problem(f"consumer of {self.topic} wanted {self.cursor}, got {offset} "
                           f"(after {self.resumes} resumes)")
        if parse(data) is None:
            ledger.problem(f"consumer of {self.topic} got a malformed payload at {offset}")
        ledger.seen_committed(self.topic, offset, data)
        with ledger.lock:
            ledger.delivered += 1
        self.cursor = offset + 1

    def run(self, cycle: Cycle, ledger: Ledger) -> None:
        stub = cycle.stub()
        self.resumes += 1
        if self.subscribe:
            stream = stub.Subscribe(smq_pb2.SubscribeRequest(
                topic=self.topic, offset=self.cursor, max_messages=500))
        else:
            stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=self.topic, offset=self.cursor))
        cycle.calls.append(stream)
        try:
            for reply in stream:
                if self.subscribe:
                    for message in reply.messages:
                        self.take(ledger, message.offset, message.message)
                elif reply.offset != -1:
                    self.take(ledger, reply.offset, reply.message)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                cycle.failed(ledger, f"consumer of {self.topic}", exc)


def read_copy(db: Path, scratch: Path) -> tuple[str, list[tuple[str, int, bytes]], dict[str, int]]:
    """integrity_check, every stored message and each topic's next_offset, read from a
    copy of the database and its WAL (opening it recovers the WAL, as a restart would)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copyfile(f"{db}{suffix}", scratch / f"copy.db{suffix}")
    conn = apsw.Connection(str(scratch / "copy.db"))
    try:
        integrity = conn.execute("PRAGMA integrity_check").get
        rows = stored_messages(conn)
        # as the server loads them: the topic rows plus the rows appended since they were saved
        next_offsets = {name: t.next_offset for name, t in committed_topics(conn).items()}
    finally:
        conn.close()
    return integrity, rows, next_offsets


def verify_after_crash(ledger: Ledger, db: Path, scratch: Path, cycle: int) -> dict[str, int]:
    """Check the file against the ledger; returns each topic's highest stored offset."""
    integrity, rows, next_offsets = read_copy(db, scratch)
    where = f"after kill {cycle}"
    assert integrity == "ok", f"{where}: integrity_check: {integrity}"
    stored: dict[tuple[str, int], tuple[int, int]] = {}
    position: dict[tuple[int, int], tuple[str, int]] = {}
    for topic, offset, data in rows:
        crc = zlib.crc32(data)
        known_crc, ids = ledger.committed.get((topic, offset), (crc, None))
        if known_crc != crc:
            ledger.problem(f"{where}: {topic}/{offset} changed content")
            continue
        if ids is None:  # not checked before (same crc: same bytes, checked already)
            ids = parse(data)
            if ids is None or ids not in ledger.sent:
                ledger.problem(f"{where}: {topic}/{offset} holds a payload nobody sent: {data[:40]!r}")
                continue
        if ids in position:
            ledger.problem(f"{where}: message {ids} stored twice: {position[ids]} and {topic}/{offset}")
        stored[(topic, offset)] = ids
        position[ids] = (topic, offset)
        ledger.committed[(topic, offset)] = (crc, ids)
    latest = {}
    for topic in TOPICS:
        offsets = sorted(o for t, o in stored if t == topic)
        latest[topic] = offsets[-1] if offsets else 0
        if offsets != list(range(1, len(offsets) + 1)):
            missing = sorted(set(range(1, latest[topic] + 1)) - set(offsets))
            ledger.problem(f"{where}: {topic} has holes: {missing[:10]}")
        if next_offsets.get(topic) != latest[topic] + 1:
            ledger.problem(f"{where}: {topic} next_offset {next_offsets.get(topic)}, "
                           f"latest stored {latest[topic]}")
    for key in ledger.committed.keys() - stored.keys():
        ledger.problem(f"{where}: committed message {key} is gone")
    for key, ids in ledger.acked.items():
        if stored.get(key) != ids:
            ledger.problem(f"{where}: acknowledged {ids} at {key} but found {stored.get(key)}")
    for topic, ids in ledger.batches:
        places = [position.get(i) for i in ids]
        if any(places) and places != [(topic, places[0][1] + k) for k in range(len(ids))]:
            ledger.problem(f"{where}: batch of {len(ids)} to {topic} stored as {places[:5]}...")
    for topic, ids, last in ledger.streams:
        places = [position.get(i) for i in ids]
        kept = len([p for p in places if p])
        offsets = [p[1] for p in places[:kept] if p]
        if (places[kept:] != [None] * (len(ids) - kept) or offsets != sorted(offsets)
                or any(p[0] != topic for p in places[:kept] if p)):
            ledger.problem(f"{where}: stream to {topic} not stored as an ordered prefix")
        if last is not None and (kept != len(ids) or places[-1] != (topic, last)):
            ledger.problem(f"{where}: acknowledged stream to {topic} (last {last}) incomplete")
    return latest


def test_kill_9_under_load_loses_nothing_acknowledged(start_server, tmp_path, request):
    rng = random.Random(SEED)
    db = tmp_path / "smq.db"
    flags = ("--durability", "full", "--heartbeat-interval", "0.5", "--shutdown-grace", "1")
    ledger = Ledger()
    consumers = [Consumer(t, subscribe=False) for t in TOPICS] + [Consumer(TOPICS[0], subscribe=True)]
    server = start_server(*flags, db=db)
    for topic in TOPICS:
        server.stub().CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=CALL_TIMEOUT)
    probe_pid, probe_seq, early_kills = ledger.pid(), 0, 0
    for number in range(1, CYCLES + 1):
        cycle = Cycle(server.address)
        for consumer in consumers:
            cycle.spawn(consumer.run, ledger)
        for produce in (produce_unary, produce_unary, produce_batches, produce_streams):
            cycle.spawn(produce, ledger, random.Random(rng.random()))
        time.sleep(rng.choice([0.05, 0.3]) + rng.random() * 2.0)
        cycle.killed.set()
        server.kill()
        for thread in cycle.threads:
            thread.join(CALL_TIMEOUT)
            assert not thread.is_alive(), "a client hung after the kill"
        latest = verify_after_crash(ledger, db, tmp_path / "check", number)
        assert not ledger.problems, f"seed {SEED}, kill {number}:\n" + "\n".join(ledger.problems[:20])

        if rng.random() < 0.25:  # sometimes crash it again while it recovers and starts
            early = start_server(*flags, db=db, wait=False)
            time.sleep(rng.random() * 0.5)
            early.kill()
            early_kills += 1
        server = start_server(*flags, db=db)
        stub = server.stub()
        for topic in TOPICS:  # offsets go on above everything ever stored (so ever acknowledged)
            info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic), timeout=CALL_TIMEOUT).topic
            assert info.next_offset == latest[topic] + 1 and info.latest_offset == latest[topic]
            probe_seq += 1
            ledger.sent.add((probe_pid, probe_seq))
            offset = stub.Produce(smq_pb2.ProduceRequest(
                topic=topic, message=payload(probe_pid, probe_seq)), timeout=CALL_TIMEOUT).offset
            assert offset == latest[topic] + 1, (topic, offset, latest[topic])
            ledger.ack(topic, offset, (probe_pid, probe_seq))

    # Last life: consumers catch up with everything, then a clean stop.
    final = {t: stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic=t)).offset for t in TOPICS}
    cycle = Cycle(server.address)
    for consumer in consumers:
        cycle.spawn(consumer.run, ledger)
    try:
        eventually(lambda: all(c.cursor > final[c.topic] for c in consumers), timeout=120,
                   interval=0.1, message="the consumers did not catch up")
    finally:
        cycle.killed.set()
        for call in cycle.calls:
            call.cancel()
        for thread in cycle.threads:
            thread.join(CALL_TIMEOUT)
    assert [c.cursor for c in consumers] == [final[c.topic] + 1 for c in consumers]
    assert not ledger.problems, "\n".join(ledger.problems[:20])
    assert server.terminate() == 0
    conn = apsw.Connection(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").get == "ok"
    finally:
        conn.close()

    stored = sum(final.values())
    in_doubt_kept = stored - ledger.acknowledged()
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[powercut] seed {SEED}: {CYCLES} kill -9 cycles survived (+{early_kills} kills during "
              f"start-up); {ledger.acknowledged()} "
              f"acknowledged messages verified after every kill ({stored} stored, {in_doubt_kept} "
              f"of them in flight at a kill), {ledger.delivered} consumer deliveries checked, "
              f"{sum(c.resumes for c in consumers)} consumer resumes, 0 lost")
