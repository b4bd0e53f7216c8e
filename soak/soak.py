#!/usr/bin/env python3
"""SMQ soak: a real server under mixed load for N minutes, restarted now and then
with SIGTERM or kill -9, with every delivered message checked.

    .venv/bin/python soak/soak.py --minutes 10          # after ./dev test set up .venv

It starts the server itself (this checkout's `python -m smq`, or --server-cmd) on a
free loopback port with a database in a fresh work directory, and runs at once:

- producers: unary Produce, ProduceBatch and StreamProduce, to four topics (one with
  a retention policy of 1,000 messages, so retention trims all along);
- consumers: StreamConsume and Subscribe, each remembering its offset across restarts;
  every message must come at the next offset (no gap, no repeat; on the retention
  topic a skip forward is allowed and counted) with an intact payload (each payload
  carries its CRC-32);
- a reader doing Consume and BulkRetrieve at random offsets, checking payloads;
- a trimmer (DeleteUntilOffset below what every consumer has read) and topic churn
  (DeleteTopic, CreateTopic: offsets must go on);
- a restarter: every --restart-every seconds (with jitter) a SIGTERM (the exit code
  must be 0) or a kill -9, alternately. After each restart no acknowledged message
  may be missing: each topic's latest offset is at least the highest acknowledged,
  and each producer's last acknowledged message reads back unchanged.

Every --interval seconds it prints one line (messages, errors, server RSS, database
size) and at the end a summary line and a JSON file (--json, default in the work
directory). Errors while the server is down for a restart (and 5 s after) are
expected and counted apart; any other error, and any broken check, is a failure:
the exit code is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from smq._proto import smq_pb2, smq_pb2_grpc  # noqa: E402

TOPICS = ["soak-0", "soak-1", "soak-2", "soak-r"]
RETENTION_TOPIC, RETENTION_MAX = "soak-r", 1_000
CHURN_TOPIC = "soak-churn"
CALL_TIMEOUT = 60.0
AFTER_RESTART_GRACE = 5.0  # errors this long after the server is back still count as expected
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


def make_payload(rng: random.Random, pid: int, seq: int) -> bytes:
    size = 8_000 if rng.random() < 0.01 else rng.choice([0, 20, 200, 600]) + rng.randrange(200)
    body = rng.randbytes(size)
    return f"{pid}:{seq}:{zlib.crc32(body):08x}:".encode() + body


def intact(data: bytes) -> bool:
    try:
        pid, seq, crc, body = data.split(b":", 3)
        return int(crc, 16) == zlib.crc32(body)
    except ValueError:
        return False


def process_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    values[key] = int(value.split()[0])
    except OSError:
        pass
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="smq-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.db = self.work / "soak.db"
        self.port = free_port()
        self.lock = threading.Lock()
        self.stop = threading.Event()  # stop the load (producers, reader, trimmer, churn, restarts)
        self.done = threading.Event()  # stop the consumers (after they caught up)
        self.up = threading.Event()  # the server serves
        self.back_at = 0.0  # when it last came back
        self.proc: subprocess.Popen | None = None
        self.lives = 0
        self.counts: Counter = Counter()
        self.expected_errors: Counter = Counter()
        self.unexpected: list[str] = []
        self.violations: list[str] = []
        self.restarts: list[dict] = []
        self.intervals: list[dict] = []
        self.max_acked: dict[str, int] = {t: 0 for t in TOPICS}
        self.last_acked: dict[int, tuple[str, int, bytes]] = {}  # pid -> (topic, offset, payload)
        self.cursors: dict[str, list["Consumer"]] = {t: [] for t in TOPICS}
        self.started = time.monotonic()

    # -- the server ---------------------------------------------------------------

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_server(self) -> None:
        self.lives += 1
        command = self.args.server_cmd.split() if self.args.server_cmd else [sys.executable, "-m", "smq"]
        log = open(self.work / f"server-{self.lives}.log", "w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMQ_")}
        env["PYTHONPATH"] = str(ROOT)
        for attempt in range(20):
            self.proc = subprocess.Popen(
                [*command, "--dbpath", str(self.db), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--durability", "full", "--heartbeat-interval", "2", "--shutdown-grace", "3",
                 "--max-streams", "64"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.proc.poll() is None:
                if "serving on" in (self.work / f"server-{self.lives}.log").read_text():
                    self.back_at = time.monotonic()
                    self.up.set()
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            text = (self.work / f"server-{self.lives}.log").read_text()
            if "cannot listen" in text:  # someone took the port meanwhile: move
                self.port = free_port()
                continue
            raise SystemExit(f"the server did not start:\n{text[-2000:]}")
        raise SystemExit("no free port for the server")

    def restart(self, kind: str) -> None:
        """SIGTERM or kill -9, then start again on the same file and port."""
        before = {t: self.max_acked[t] for t in TOPICS}
        last = dict(self.last_acked)
        rss = process_status(self.proc.pid)
        self.up.clear()
        began = time.monotonic()
        if kind == "SIGTERM":
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.violation("the server did not stop within 30 s of SIGTERM")
                self.proc.kill()
                code = self.proc.wait()
            if code != 0:
                self.violation(f"exit code {code} after SIGTERM")
        else:
            self.proc.kill()
            code = self.proc.wait()
        self.start_server()
        self.restarts.append({"at_s": round(began - self.started, 1), "kind": kind, "exit_code": code,
                              "downtime_s": round(time.monotonic() - began, 2),
                              "rss_before_mib": round(rss.get("VmRSS", 0) / 1024, 1),
                              "hwm_before_mib": round(rss.get("VmHWM", 0) / 1024, 1)})
        self.check_nothing_lost(before, last, kind)

    def check_nothing_lost(self, max_acked: dict[str, int], last: dict, kind: str) -> None:
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(self.address()))
        for topic, acked in max_acked.items():
            info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic), timeout=CALL_TIMEOUT).topic
            if info.next_offset - 1 < acked:
                self.violation(f"after {kind}: {topic} latest {info.next_offset - 1} < acknowledged {acked}")
        for pid, (topic, offset, payload) in last.items():
            try:
                got = stub.Consume(smq_pb2.ConsumeRequest(topic=topic, offset=offset), timeout=CALL_TIMEOUT)
                if got.message != payload:
                    self.violation(f"after {kind}: {topic}/{offset} changed")
            except grpc.RpcError as exc:
                earliest = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic),
                                              timeout=CALL_TIMEOUT).topic.earliest_offset
                if not (exc.code() == grpc.StatusCode.NOT_FOUND and (earliest == 0 or offset < earliest)):
                    self.violation(f"after {kind}: acknowledged {topic}/{offset} unreadable: {exc.code()}")
        with self.lock:
            self.counts["acked messages re-checked after restarts"] += len(last)

    # -- bookkeeping --------------------------------------------------------------

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(f"[{time.monotonic() - self.started:7.1f}s] {text}")
        print("VIOLATION:", text, flush=True)

    def error(self, who: str, exc: grpc.RpcError) -> None:
        """Classify an RPC error: expected while the server restarts, else a failure."""
        code = exc.code()
        restarting = not self.up.is_set() or time.monotonic() - self.back_at < AFTER_RESTART_GRACE
        with self.lock:
            if restarting or self.stop.is_set():
                self.expected_errors[code.name] += 1
            else:
                self.unexpected.append(f"[{time.monotonic() - self.started:7.1f}s] {who}: "
                                       f"{code.name} {exc.details()}")
        if not restarting and not self.stop.is_set():
            print(f"UNEXPECTED ERROR: {who}: {code.name} {exc.details()}", flush=True)
        time.sleep(0.2)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def acked(self, pid: int, topic: str, offset: int, payload: bytes, n: int) -> None:
        with self.lock:
            self.counts["acked"] += n
            self.max_acked[topic] = max(self.max_acked[topic], offset)
            self.last_acked[pid] = (topic, offset, payload)

    def stub(self) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        self.up.wait()
        return smq_pb2_grpc.SuhaibMessageQueueStub(
            grpc.insecure_channel(self.address(), options=CHANNEL_OPTIONS))

    def throttle(self, per_second: float) -> None:
        time.sleep(random.expovariate(per_second * self.args.rate))


# -- workers ------------------------------------------------------------------------

def producer(soak: Soak, kind: str, pid: int) -> None:
    rng = random.Random(pid * 7919 + soak.args.seed)
    seq = 0
    stub = soak.stub()
    while not soak.stop.is_set():
        topic = rng.choice(TOPICS)
        try:
            if kind == "unary":
                seq += 1
                payload = make_payload(rng, pid, seq)
                offset = stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=payload),
                                      timeout=CALL_TIMEOUT).offset
                soak.acked(pid, topic, offset, payload, 1)
                soak.throttle(150)
            elif kind == "batch":
                payloads = [make_payload(rng, pid, seq + i) for i in range(1, rng.randint(1, 100) + 1)]
                seq += len(payloads)
                reply = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic=topic, messages=payloads),
                                          timeout=CALL_TIMEOUT)
                if reply.last_offset - reply.first_offset + 1 != len(payloads):
                    soak.violation(f"batch of {len(payloads)} got {reply.first_offset}..{reply.last_offset}")
                soak.acked(pid, topic, reply.last_offset, payloads[-1], len(payloads))
                soak.throttle(15)
            else:
                payloads = [make_payload(rng, pid, seq + i) for i in range(1, rng.randint(1, 400) + 1)]
                seq += len(payloads)
                reply = stub.StreamProduce(
                    (smq_pb2.ProduceRequest(topic=topic, message=p) for p in payloads), timeout=CALL_TIMEOUT)
                soak.acked(pid, topic, reply.offset, payloads[-1], len(payloads))
                soak.throttle(4)
        except grpc.RpcError as exc:
            soak.error(f"{kind} producer {pid}", exc)
            stub = soak.stub()


class Consumer:
    def __init__(self, soak: Soak, topic: str, subscribe: bool) -> None:
        self.soak = soak
        self.topic = topic
        self.subscribe = subscribe
        self.cursor = 1
        soak.cursors[topic].append(self)

    def take(self, offset: int, data: bytes) -> None:
        soak = self.soak
        if offset != self.cursor:
            if offset > self.cursor and self.topic == RETENTION_TOPIC:
                soak.count("skipped by retention", offset - self.cursor)
            elif offset > self.cursor and self.cursor == 1:
                pass  # first start after trims: begins at the earliest
            else:
                soak.violation(f"consumer of {self.topic} expected {self.cursor}, got {offset}")
        if not intact(data):
            soak.violation(f"consumer of {self.topic}: damaged payload at {offset}")
        self.cursor = offset + 1
        soak.count("consumed")

    def run(self) -> None:
        soak = self.soak
        while not soak.done.is_set():
            stub = soak.stub()
            try:
                if self.subscribe:
                    stream = stub.Subscribe(smq_pb2.SubscribeRequest(
                        topic=self.topic, offset=self.cursor, max_messages=1000))
                    for reply in stream:
                        for message in reply.messages:
                            self.take(message.offset, message.message)
                        if soak.done.is_set():
                            stream.cancel()
                else:
                    stream = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=self.topic, offset=self.cursor))
                    for reply in stream:
                        if reply.offset != -1:
                            self.take(reply.offset, reply.message)
                        if soak.done.is_set():
                            stream.cancel()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED or not soak.done.is_set():
                    soak.error(f"consumer of {self.topic}", exc)


def reader(soak: Soak) -> None:
    rng = random.Random(soak.args.seed + 1)
    stub = soak.stub()
    while not soak.stop.is_set():
        topic = rng.choice(TOPICS)
        try:
            info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic), timeout=CALL_TIMEOUT).topic
            if info.message_count:
                offset = rng.randint(info.earliest_offset, info.latest_offset)
                try:
                    got = stub.Consume(smq_pb2.ConsumeRequest(topic=topic, offset=offset), timeout=CALL_TIMEOUT)
                    if got.offset != offset or not intact(got.message):
                        soak.violation(f"Consume {topic}/{offset}: wrong or damaged")
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:  # trimmed meanwhile: fine
                        raise
                page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(
                    topic=topic, start_offset=offset, limit=200), timeout=CALL_TIMEOUT)
                offsets = [m.offset for m in page.messages]
                if offsets and (offsets != list(range(offsets[0], offsets[0] + len(offsets)))
                                or not all(intact(m.message) for m in page.messages)):
                    soak.violation(f"BulkRetrieve {topic} from {offset}: hole or damage")
                soak.count("random reads", 1 + len(offsets))
            soak.throttle(20)
        except grpc.RpcError as exc:
            soak.error("reader", exc)
            stub = soak.stub()


def trimmer(soak: Soak) -> None:
    """Trim below what every consumer of the topic has read (keeping 2,000 more)."""
    stub = soak.stub()
    while not soak.stop.wait(5):
        for topic in TOPICS:
            until = min(c.cursor for c in soak.cursors[topic]) - 2_000
            if until < 1:
                continue
            try:
                stub.DeleteUntilOffset(smq_pb2.DeleteUntilOffsetRequest(topic=topic, offset=until),
                                       timeout=CALL_TIMEOUT)
                soak.count("trims")
            except grpc.RpcError as exc:
                soak.error("trimmer", exc)
                stub = soak.stub()


def churner(soak: Soak) -> None:
    """Create, fill, delete and re-create a topic: its offsets must go on."""
    stub = soak.stub()
    expected_next = None
    while not soak.stop.wait(10):
        try:
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=CHURN_TOPIC), timeout=CALL_TIMEOUT)
            reply = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(
                topic=CHURN_TOPIC, messages=[b"churn"] * 10), timeout=CALL_TIMEOUT)
            if expected_next is not None and reply.first_offset < expected_next:
                soak.violation(f"{CHURN_TOPIC} re-created: offset {reply.first_offset} reused "
                               f"(expected >= {expected_next})")
            expected_next = reply.last_offset + 1
            stub.DeleteTopic(smq_pb2.DeleteTopicRequest(topic=CHURN_TOPIC), timeout=CALL_TIMEOUT)
            soak.count("topic churns")
        except grpc.RpcError as exc:
            soak.error("churner", exc)
            stub = soak.stub()


def restarter(soak: Soak) -> None:
    rng = random.Random(soak.args.seed + 2)
    kinds = ["SIGTERM", "kill -9"]
    count = 0
    while True:
        every = soak.args.restart_every
        if soak.stop.wait(every * rng.uniform(0.6, 1.4)) or every <= 0:
            return
        soak.restart(kinds[count % 2])
        count += 1


# -- reporting ------------------------------------------------------------------------

def file_mib(path: Path) -> float:
    try:
        return path.stat().st_size / 1024**2
    except OSError:
        return 0.0


def sample(soak: Soak, previous: dict) -> dict:
    status = process_status(soak.proc.pid) if soak.proc else {}
    with soak.lock:
        counts = dict(soak.counts)
        row = {
            "t_s": round(time.monotonic() - soak.started, 1),
            "acked": counts.get("acked", 0), "consumed": counts.get("consumed", 0),
            "random_reads": counts.get("random reads", 0), "trims": counts.get("trims", 0),
            "restarts": len(soak.restarts), "expected_errors": sum(soak.expected_errors.values()),
            "unexpected_errors": len(soak.unexpected), "violations": len(soak.violations),
            "server_pid": soak.proc.pid if soak.proc else None,
            "rss_mib": round(status.get("VmRSS", 0) / 1024, 1),
            "hwm_mib": round(status.get("VmHWM", 0) / 1024, 1),
            "threads": status.get("Threads", 0),
            "db_mib": round(file_mib(soak.db), 1), "wal_mib": round(file_mib(Path(f"{soak.db}-wal")), 1),
        }
    span = row["t_s"] - previous.get("t_s", 0) or 1
    row["acked_per_s"] = round((row["acked"] - previous.get("acked", 0)) / span)
    row["consumed_per_s"] = round((row["consumed"] - previous.get("consumed", 0)) / span)
    return row


def line(row: dict) -> str:
    return (f"[{row['t_s']:7.1f}s] acked {row['acked']:>9} ({row['acked_per_s']:>5}/s)  consumed "
            f"{row['consumed']:>9} ({row['consumed_per_s']:>5}/s)  reads {row['random_reads']:>7}  "
            f"trims {row['trims']:>4}  restarts {row['restarts']:>2} | errors: expected "
            f"{row['expected_errors']:>4} unexpected {row['unexpected_errors']} violations "
            f"{row['violations']} | server rss {row['rss_mib']:6.1f} MiB hwm {row['hwm_mib']:6.1f} "
            f"threads {row['threads']:>3} | db {row['db_mib']:6.1f} MiB wal {row['wal_mib']:5.1f} MiB")


def final_checks(soak: Soak) -> dict:
    """Consumers catch up; every stored message is contiguous and intact; clean stop;
    integrity_check."""
    stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(soak.address()))
    result = {}
    for topic in TOPICS:
        info = stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=topic), timeout=CALL_TIMEOUT).topic
        behind = [c.cursor for c in soak.cursors[topic] if c.cursor <= info.latest_offset]
        if behind:
            soak.violation(f"{topic}: consumers at {behind} never reached the latest {info.latest_offset}")
        offset, scanned = info.earliest_offset, 0
        while info.message_count and offset <= info.latest_offset:
            page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=topic, start_offset=offset,
                                                                 limit=10_000), timeout=CALL_TIMEOUT)
            for message in page.messages:
                if message.offset != offset or not intact(message.message):
                    soak.violation(f"final scan {topic}: hole or damage at {offset}")
                    break
                offset += 1
                scanned += 1
            if not page.messages:
                soak.violation(f"final scan {topic}: nothing at {offset}")
                break
        result[topic] = {"earliest": info.earliest_offset, "latest": info.latest_offset,
                         "scanned": scanned}
    soak.done.set()
    soak.proc.send_signal(signal.SIGTERM)
    code = soak.proc.wait(60)
    if code != 0:
        soak.violation(f"final SIGTERM: exit code {code}")
    import apsw
    conn = apsw.Connection(str(soak.db))
    try:
        result["integrity_check"] = conn.execute("PRAGMA integrity_check").get
    finally:
        conn.close()
    if result["integrity_check"] != "ok":
        soak.violation(f"integrity_check: {result['integrity_check']}")
    logs = "".join(p.read_text() for p in sorted(soak.work.glob("server-*.log")))
    result["server_log_tracebacks"] = logs.count("Traceback")
    result["server_log_errors"] = sum(1 for l in logs.splitlines() if l.startswith("ERROR"))
    if result["server_log_tracebacks"] or result["server_log_errors"]:
        soak.violation(f"server logs: {result['server_log_errors']} ERROR lines, "
                       f"{result['server_log_tracebacks']} tracebacks")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run the load")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between report lines")
    parser.add_argument("--restart-every", type=float, default=90.0,
                        help="mean seconds between restarts (SIGTERM and kill -9 alternately); 0: never")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="load multiplier (1: about 1,600 messages/s acknowledged on 2 cores)")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument("--workdir", help="where the database, server logs and JSON go (default: a new temp dir)")
    parser.add_argument("--json", help="JSON report path (default: <workdir>/soak.json)")
    parser.add_argument("--server-cmd", help="server command instead of this checkout's `python -m smq`")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database after a pass (always kept after a failure)")
    args = parser.parse_args()

    soak = Soak(args)
    print(f"soak: {args.minutes} min, seed {args.seed}, work dir {soak.work}", flush=True)
    soak.start_server()
    setup = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(soak.address()))
    for topic in TOPICS:
        setup.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=CALL_TIMEOUT)
    setup.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic=RETENTION_TOPIC, policy=smq_pb2.TopicPolicy(max_messages=RETENTION_MAX)), timeout=CALL_TIMEOUT)

    consumers = [Consumer(soak, t, subscribe=False) for t in TOPICS]
    consumers += [Consumer(soak, TOPICS[0], subscribe=True), Consumer(soak, RETENTION_TOPIC, subscribe=True)]
    workers = [threading.Thread(target=c.run, daemon=True) for c in consumers]
    for pid, kind in enumerate(["unary", "unary", "batch", "stream"], 1):
        workers.append(threading.Thread(target=producer, args=(soak, kind, pid), daemon=True))
    workers += [threading.Thread(target=f, args=(soak,), daemon=True)
                for f in (reader, trimmer, churner, restarter)]
    for worker in workers:
        worker.start()

    previous: dict = {}
    end = soak.started + args.minutes * 60
    try:
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            row = sample(soak, previous)
            soak.intervals.append(row)
            print(line(row), flush=True)
            previous = row
    except KeyboardInterrupt:
        print("interrupted: stopping the load", flush=True)
    load_seconds = time.monotonic() - soak.started

    # Stop producing, let the restarter finish, let consumers catch up, then check.
    soak.stop.set()
    for worker in workers[len(consumers):]:
        worker.join(120)
    soak.up.wait(120)
    deadline = time.monotonic() + 120
    stub = smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(soak.address()))
    latest = {t: stub.DescribeTopic(smq_pb2.DescribeTopicRequest(topic=t), timeout=CALL_TIMEOUT).topic.latest_offset
              for t in TOPICS}
    while time.monotonic() < deadline and any(c.cursor <= latest[c.topic] for c in consumers):
        time.sleep(0.2)
    final = final_checks(soak)
    for worker in workers[:len(consumers)]:
        worker.join(10)

    rss = [r["rss_mib"] for r in soak.intervals if r["rss_mib"]]
    summary = {
        "result": "PASS" if not (soak.violations or soak.unexpected) else "FAIL",
        "minutes": round(load_seconds / 60, 2), "seed": args.seed,
        "acked_messages": soak.counts["acked"], "acked_per_s": round(soak.counts["acked"] / load_seconds),
        "consumed_messages": soak.counts["consumed"], "random_reads": soak.counts["random reads"],
        "skipped_by_retention": soak.counts["skipped by retention"], "trims": soak.counts["trims"],
        "topic_churns": soak.counts["topic churns"],
        "acked_rechecked_after_restarts": soak.counts["acked messages re-checked after restarts"],
        "restarts": len(soak.restarts),
        "restarts_sigterm": sum(r["kind"] == "SIGTERM" for r in soak.restarts),
        "restarts_kill9": sum(r["kind"] == "kill -9" for r in soak.restarts),
        "expected_errors_during_restarts": dict(soak.expected_errors),
        "unexpected_errors": len(soak.unexpected), "violations": len(soak.violations),
        "server_rss_mib": {"min": min(rss, default=0), "median": round(statistics.median(rss), 1) if rss else 0,
                           "max": max(rss, default=0)},
        "server_peak_hwm_mib": max([r["hwm_mib"] for r in soak.intervals]
                                   + [r["hwm_before_mib"] for r in soak.restarts], default=0),
        "final": final,
    }
    report = {"summary": summary, "intervals": soak.intervals, "restarts": soak.restarts,
              "unexpected_errors": soak.unexpected, "violations": soak.violations,
              "config": {k: v for k, v in vars(args).items()}, "workdir": str(soak.work)}
    json_path = Path(args.json) if args.json else soak.work / "soak.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    for text in soak.unexpected[:20] + soak.violations[:20]:
        print("  ", text)
    print(f"SOAK {summary['result']}: {summary['minutes']} min, {summary['acked_messages']} messages acked "
          f"({summary['acked_per_s']}/s), {summary['consumed_messages']} deliveries and "
          f"{summary['random_reads']} random reads checked, {summary['restarts']} restarts "
          f"({summary['restarts_sigterm']} SIGTERM, {summary['restarts_kill9']} kill -9), "
          f"{summary['violations']} violations, {summary['unexpected_errors']} unexpected errors "
          f"({sum(soak.expected_errors.values())} expected during restarts); server RSS MiB "
          f"min/median/max {summary['server_rss_mib']['min']}/{summary['server_rss_mib']['median']}/"
          f"{summary['server_rss_mib']['max']}, peak {summary['server_peak_hwm_mib']}; "
          f"integrity {final['integrity_check']}; JSON {json_path}", flush=True)
    if summary["result"] == "PASS" and not args.keep:
        for path in soak.work.glob("soak.db*"):
            path.unlink()
        print(f"(database removed after a pass; --keep keeps it; logs and JSON stay in {soak.work})")
    return 0 if summary["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
