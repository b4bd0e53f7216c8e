#!/usr/bin/env python3
"""SMQ throughput benchmark, measured against a raw grpcio ceiling in the same run.

    .venv/bin/python bench/bench.py [--quick] [--repeat N] [--json FILE]
                                    [--sizes 100,10240] [--modes full,normal]
                                    [--only metrics|wear] [--metrics-rounds N]
                                    [--wear-only] [--wear-messages 3000,20000,20000]

For every payload size it starts bench/raw_server.py (the same service over grpcio with
no storage: the ceiling), and for every durability mode a fresh SMQ server (`python -m
smq` on a new database in a temporary directory), each `--repeat` times, interleaved
so that the machine's noise hits both alike. Against each server it runs the same
phases with clients in separate processes (so no client GIL caps the server):

  unary_1 / unary_4    Produce, one call at a time per client, 1 and 4 client processes
  stream_produce       one StreamProduce stream
  produce_batch(_4)    ProduceBatch calls of --batch messages, one client (and four)
  stream_consume       StreamConsume from offset 1 of a pre-filled topic (catch-up)
  subscribe            Subscribe (server's page size) over the same topic
  bulk_retrieve        BulkRetrieve pages of --bulk-limit over the same topic
  latency              Produce at --latency-rate msg/s; a Subscribe and a StreamConsume
                       subscriber compute arrival - send (time.monotonic_ns in the payload)

and reads the server process's /proc/PID: start-up time (spawn -> Connect answers),
idle VmRSS after start-up, VmHWM (peak) at the end, and CPU time per phase (reported as
server CPU microseconds per message). SMQ's GetServerInfo counters, taken around each
write phase, give messages per commit.

Flash wear: per mode and write pattern, a fresh SMQ server takes a fixed number of
messages (--wear-messages) one Produce at a time, over one StreamProduce or in
ProduceBatch calls; the server's write_bytes (/proc/PID/io) from a quiet moment before
them to its exit after them (SIGTERM; wait4's ru_oublock, the same count: so every
checkpoint of what they wrote counts, the last one at the clean stop included), divided
by the messages acknowledged: bytes written per message.
With redis-server on PATH, the same figure for redis (AOF, appendfsync always and
everysec) taking XADDs one at a time and --batch per pipelined round trip. --wear-only
runs just these (fast, for iterating on the storage).

The cost of metrics (--metrics-port): per mode, three fresh SMQ servers with the same
settings are started together, "off", "on" (--metrics-port 0) and "off2" (a second
"off": how far two arms differ with no change at all). In each round, unary Produce (4
clients, one message per call) goes to each of them in turn for --duration (the other
two wait idle), then ProduceBatch (one client, --batch per call), the arms in a
different order each round (all six in turn), --metrics-rounds times (default 3; 15
with --only metrics; quick 1): the arms compared ran seconds apart, so the machine's
drift falls on them alike. While the on server is measured, a thread of the benchmark
fetches its /metrics every --scrape-interval seconds, as Prometheus would. Payloads are
the smallest of --sizes. Its table: per workload and mode the median msg/s off and on,
the change (of the medians, and the median of the rounds' own ratios), both arms'
range, and off2's change from off; then the same for the server's CPU time per
message. --only metrics runs just this.

It prints one table (figure, size, mode, SMQ median, raw median, ratio SMQ/raw, target,
met?) and writes every sample to --json. Figures are medians over the repeats (the peak
RSS is the maximum). The targets are those of the throughput issue, checked for 100-byte
payloads in full durability only. This is a measurement, not a test: nothing here
fails on a slow figure.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import http.client
import itertools
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from smq._proto import smq_pb2, smq_pb2_grpc  # noqa: E402

RAW_SERVER = Path(__file__).resolve().parent / "raw_server.py"
LISTENING = re.compile(r"serving on \S+:(\d+)")
METRICS_AT = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024**2),
                  ("grpc.max_send_message_length", 16 * 1024**2)]
# Environment names the server reads; none of the caller's may leak into a run.
SERVER_ENV_NAMES = ("DB_PATH", "PORT", "SERVER_ENABLE_MTLS", "SERVER_CERT_FILE", "SERVER_KEY_FILE",
                    "SERVER_CA_CERT_FILE", "ALLOW_REMOTE_WRITES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                    "WATCHDOG_PID")
LATENCY_WARMUP = 10  # first messages of the latency phase, not counted
MiB = 1024**2
# Flash wear: the write patterns, and the most payload each writes (a cap on --wear-messages
# for large messages: 10 KiB payloads get 1000, 3000, 3000 messages).
WEAR_PATTERNS = ("unary", "stream", "batch")
WEAR_PAYLOAD_CAP = {"unary": 10 * MiB, "stream": 30 * MiB, "batch": 30 * MiB}
WEAR_QUIET_S, WEAR_SETTLE_MAX_S = 0.5, 3.0  # write_bytes unchanged this long; wait at most
REDIS_FSYNC = ("always", "everysec")  # the AOF's appendfsync, one redis-server run each
PR_SET_PDEATHSIG = 1
try:  # looked up here, so that a freshly forked child only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies, so that no server or client
    outlives an interrupted benchmark."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# -- figures and targets ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    smq_only: bool = False
    aggregate: str = "median"  # or "max"


@dataclasses.dataclass(frozen=True)
class Check:
    kind: str  # "min" | "max" (on the SMQ value) | "ratio_min" (on SMQ/raw)
    bound: float

    def holds(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.kind == "ratio_min" else value
        if subject is None:
            return None
        return subject <= self.bound if self.kind == "max" else subject >= self.bound

    def text(self, unit: str) -> str:
        if self.kind == "ratio_min":
            return f">={self.bound:.0%} raw"
        sign = "<=" if self.kind == "max" else ">="
        return f"{sign}{fmt(self.bound, unit)}"


def figures(batch: int, bulk_limit: int, rate: int) -> list[Figure]:
    return [
        Figure("unary_1", "Produce unary, 1 client", "msg/s"),
        Figure("unary_4", "Produce unary, 4 clients", "msg/s"),
        Figure("msgs_per_commit_4", "messages per commit, 4 unary clients", "msg", smq_only=True),
        Figure("stream_produce", "StreamProduce", "msg/s"),
        Figure("produce_batch", f"ProduceBatch ({batch}/call)", "msg/s"),
        Figure("produce_batch_4", f"ProduceBatch ({batch}/call), 4 clients", "msg/s"),
        Figure("stream_consume", "StreamConsume catch-up", "msg/s"),
        Figure("subscribe", "Subscribe catch-up", "msg/s"),
        Figure("bulk_retrieve", f"BulkRetrieve (limit {bulk_limit})", "msg/s"),
        Figure("latency_subscribe_p50", f"latency p50 -> Subscribe @{rate}/s", "ms", False),
        Figure("latency_subscribe_p99", f"latency p99 -> Subscribe @{rate}/s", "ms", False),
        Figure("latency_stream_p50", f"latency p50 -> StreamConsume @{rate}/s", "ms", False),
        Figure("latency_stream_p99", f"latency p99 -> StreamConsume @{rate}/s", "ms", False),
        Figure("startup_s", "start-up (spawn -> Connect)", "s", False),
        Figure("idle_rss_mib", "idle RSS", "MiB", False),
        Figure("peak_rss_mib", "peak RSS (max over runs)", "MiB", False, aggregate="max"),
        *wear_figures(batch),
    ]


def wear_figures(batch: int) -> list[Figure]:
    return [Figure(f"wear_{pattern}", f"bytes written per message, {wear_label(pattern, batch)}",
                   "B/msg", False, smq_only=True) for pattern in WEAR_PATTERNS]


def wear_label(pattern: str, batch: int) -> str:
    return {"unary": "unary", "stream": "StreamProduce",
            "batch": f"ProduceBatch ({batch}/call)"}[pattern]


# The targets: 100-byte payloads, default (full) durability.
TARGET_SIZE, TARGET_MODE = 100, "full"
TARGETS: dict[str, list[Check]] = {
    "unary_4": [Check("ratio_min", 0.80)],
    "msgs_per_commit_4": [Check("min", 2.0)],
    "stream_produce": [Check("ratio_min", 0.85)],
    "produce_batch": [Check("min", 100_000), Check("ratio_min", 0.50)],
    "stream_consume": [Check("ratio_min", 0.85)],
    "subscribe": [Check("min", 150_000)],
    "bulk_retrieve": [Check("min", 150_000)],
    "latency_subscribe_p50": [Check("max", 2.0)],
    "latency_subscribe_p99": [Check("max", 10.0)],
    "latency_stream_p50": [Check("max", 2.0)],
    "latency_stream_p99": [Check("max", 10.0)],
    "idle_rss_mib": [Check("max", 0.0)],  # bound set from the raw server: see evaluate()
    "peak_rss_mib": [Check("max", 96.0)],
}
IDLE_RSS_SLACK = 1.15  # idle RSS within 15% of the bare grpcio + apsw process


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("msg/s", "B/msg"):
        return f"{value:,.0f}"
    if unit in ("ms", "msg"):
        return f"{value:.2f}"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:.1f}"


# -- clients (each in its own process) ------------------------------------------------

def client_main(role: str, address: str, params: dict, barrier, results) -> None:
    """Entry point of a client process: connect, wait for the others, run, report."""
    die_with_parent()
    try:
        channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)
        stub.Connect(smq_pb2.ConnectRequest(), timeout=30, wait_for_ready=True)
        cpu0 = time.process_time()
        report = ROLES[role](stub, params, barrier)
        results.put(("ok", {**report, "client_cpu_s": time.process_time() - cpu0}))
        channel.close()
    except BaseException as exc:  # report, and free the others from the barrier
        results.put(("error", f"{role}: {exc!r}\n{traceback.format_exc()}"))
        barrier.abort()


def payload_of(size: int) -> bytes:
    return (b"smq-bench-" * (size // 10 + 1))[:size]


def role_unary(stub, p, barrier) -> dict:
    request = smq_pb2.ProduceRequest(topic=p["topic"], message=payload_of(p["size"]))
    produce = stub.Produce
    barrier.wait()
    t0 = time.monotonic()
    end, n = t0 + p["duration"], 0
    while time.monotonic() < end:
        produce(request)
        n += 1
    return {"messages": n, "t0": t0, "t1": time.monotonic()}


def role_stream_produce(stub, p, barrier) -> dict:
    request = smq_pb2.ProduceRequest(topic=p["topic"], message=payload_of(p["size"]))
    sent = [0]

    def requests():
        end = time.monotonic() + p["duration"]
        while time.monotonic() < end:
            for _ in range(100):
                yield request
            sent[0] += 100

    barrier.wait()
    t0 = time.monotonic()
    last = stub.StreamProduce(requests(), timeout=p["duration"] + 120).offset
    return {"messages": sent[0], "t0": t0, "t1": time.monotonic(), "last_offset": last}


def role_produce_batch(stub, p, barrier) -> dict:
    request = smq_pb2.ProduceBatchRequest(topic=p["topic"],
                                          messages=[payload_of(p["size"])] * p["batch"])
    produce = stub.ProduceBatch
    barrier.wait()
    t0 = time.monotonic()
    end, n = t0 + p["duration"], 0
    while time.monotonic() < end:
        produce(request)
        n += p["batch"]
    return {"messages": n, "t0": t0, "t1": time.monotonic()}


def role_stream_consume(stub, p, barrier) -> dict:
    barrier.wait()
    t0 = time.monotonic()
    call = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=p["topic"], offset=1),
                              timeout=p["timeout"])
    n = 0
    for response in call:
        if response.offset > 0:
            n += 1
            if response.offset >= p["count"]:
                break
    t1 = time.monotonic()
    call.cancel()
    return {"messages": n, "t0": t0, "t1": t1}


def role_subscribe(stub, p, barrier) -> dict:
    barrier.wait()
    t0 = time.monotonic()
    call = stub.Subscribe(smq_pb2.SubscribeRequest(topic=p["topic"], offset=1,
                                                   max_messages=p["max_messages"]),
                          timeout=p["timeout"])
    n = pages = 0
    for page in call:
        n += len(page.messages)
        pages += 1
        if page.next_offset > p["count"]:
            break
    t1 = time.monotonic()
    call.cancel()
    return {"messages": n, "t0": t0, "t1": t1, "pages": pages}


def role_bulk_retrieve(stub, p, barrier) -> dict:
    retrieve = stub.BulkRetrieve
    barrier.wait()
    t0 = time.monotonic()
    n = calls = 0
    offset = 1
    while offset <= p["count"]:
        page = retrieve(smq_pb2.BulkRetrieveRequest(topic=p["topic"], start_offset=offset,
                                                    limit=p["limit"]))
        n += page.count
        calls += 1
        offset = page.next_offset
    return {"messages": n, "t0": t0, "t1": time.monotonic(), "calls": calls}


def role_latency_producer(stub, p, barrier) -> dict:
    padding = payload_of(max(p["size"] - 8, 0))
    produce = stub.Produce
    barrier.wait()
    t0 = time.monotonic()
    for i in range(p["count"]):
        delay = t0 + i / p["rate"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        produce(smq_pb2.ProduceRequest(
            topic=p["topic"], message=time.monotonic_ns().to_bytes(8, "big") + padding))
    return {"messages": p["count"], "t0": t0, "t1": time.monotonic()}


def role_latency_subscriber(stub, p, barrier) -> dict:
    """Subscribes before the producer starts; latencies in microseconds."""
    if p["kind"] == "subscribe":
        call = stub.Subscribe(smq_pb2.SubscribeRequest(topic=p["topic"], offset=1),
                              timeout=p["timeout"])
    else:
        call = stub.StreamConsume(smq_pb2.ConsumeRequest(topic=p["topic"], offset=1),
                                  timeout=p["timeout"])
    barrier.wait()
    latencies: list[float] = []
    seen = 0
    for response in call:
        now = time.monotonic_ns()
        batch = (response.messages if p["kind"] == "subscribe"
                 else ([response] if response.offset > 0 else []))
        for message in batch:
            seen = max(seen, message.offset)
            if message.offset > LATENCY_WARMUP:
                latencies.append((now - int.from_bytes(message.message[:8], "big")) / 1000)
        if seen >= p["count"]:
            break
    call.cancel()
    return {"messages": len(latencies), "kind": p["kind"], "latencies_us": latencies}


ROLES = {
    "unary": role_unary, "stream_produce": role_stream_produce,
    "produce_batch": role_produce_batch, "stream_consume": role_stream_consume,
    "subscribe": role_subscribe, "bulk_retrieve": role_bulk_retrieve,
    "latency_producer": role_latency_producer, "latency_subscriber": role_latency_subscriber,
}


# -- flash wear: fixed counts of messages, written from the benchmark's own process -----
# Each returns the messages the server acknowledged (the topics are fresh: offsets from 1).

def wear_unary(stub, topic: str, payload: bytes, count: int, batch: int) -> int:
    request = smq_pb2.ProduceRequest(topic=topic, message=payload)
    for _ in range(count):
        stub.Produce(request, timeout=30)
    return count


def wear_stream(stub, topic: str, payload: bytes, count: int, batch: int) -> int:
    request = smq_pb2.ProduceRequest(topic=topic, message=payload)
    return stub.StreamProduce(itertools.repeat(request, count), timeout=count / 100 + 60).offset


def wear_batch(stub, topic: str, payload: bytes, count: int, batch: int) -> int:
    request = smq_pb2.ProduceBatchRequest(topic=topic, messages=[payload] * batch)
    acked = 0
    for _ in range(count // batch):
        response = stub.ProduceBatch(request, timeout=60)
        acked += response.last_offset - response.first_offset + 1
    return acked


WEAR_WRITERS = {"unary": wear_unary, "stream": wear_stream, "batch": wear_batch}


class Resp:
    """A tiny RESP2 client for the redis peer: commands out, replies in (PING, XADD)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    @staticmethod
    def encode(*args: bytes | str) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
        return b"".join(parts)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode(errors='replace')}")
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self.reader.read(int(rest) + 2)[:-2]
        if kind == b"*":
            return None if int(rest) < 0 else [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"redis: unexpected reply {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def redis_xadd(conn: Resp, key: str, payload: bytes, count: int, per_trip: int) -> int:
    """XADD `count` entries, `per_trip` commands per round trip (1: one at a time, no
    pipelining); returns the entries redis acknowledged with an ID."""
    command = Resp.encode("XADD", key, "*", "m", payload)
    acked = 0
    for _ in range(count // per_trip):
        conn.send(command * per_trip)
        acked += sum(1 for _ in range(per_trip) if conn.reply())
    return acked


# -- the server under test -------------------------------------------------------------

def write_bytes(pid: int) -> int:
    """The bytes a process (all its threads) caused to be sent to the storage layer: pages
    it dirtied in files, counted once per page until written back (/proc/PID/io)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^write_bytes:\s+(\d+)", text, re.MULTILINE).group(1))


def settled_write_bytes(pid: int) -> tuple[int, bool]:
    """write_bytes once it has not changed for WEAR_QUIET_S (or after WEAR_SETTLE_MAX_S:
    then False), so that what a phase's writes cause soon after (checkpoints) counts."""
    start = since = time.monotonic()
    last = write_bytes(pid)
    while True:
        time.sleep(0.05)
        now, value = time.monotonic(), write_bytes(pid)
        if value != last:
            last, since = value, now
        elif now - since >= WEAR_QUIET_S:
            return value, True
        if now - start >= WEAR_SETTLE_MAX_S:
            return value, False


def written_until_exit(proc: subprocess.Popen) -> int:
    """Stop a server (SIGTERM) and return all it wrote in its life: the write_bytes of
    the exited process, from wait4's ru_oublock (the same count, in 512-byte units), so
    that what its last writes cause (the checkpoint at a clean stop) counts too."""
    proc.send_signal(signal.SIGTERM)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_oublock * 512


def measure_wear(proc: subprocess.Popen, size: int, write) -> dict:
    """Bytes written per acknowledged message by `write()` (which returns the count):
    from a quiet moment before it to the server's exit, which it is stopped for (so that
    its checkpoints count, however many messages the WAL holds)."""
    before, _ = settled_write_bytes(proc.pid)
    t0 = time.monotonic()
    acked = write()
    elapsed = time.monotonic() - t0
    after = written_until_exit(proc)
    if not acked:
        raise RuntimeError("no message acknowledged")
    per_message = (after - before) / acked
    return {"value": per_message, "bytes": after - before, "messages": acked,
            "elapsed_s": elapsed, "settled": True, "x_payload": per_message / size}


def machine_cpu() -> tuple[float, float] | None:
    """CPU seconds every process of the machine has used (user, nice, system, irq,
    softirq), and the hypervisor's steal, from /proc/stat; None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick, fields[7] / tick


def terminate(proc: subprocess.Popen | None) -> None:
    """Stop a child still running: SIGTERM, then SIGKILL after 30 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """redis-server with an append-only file and nothing else on disk, in `workdir`."""

    def __init__(self, executable: str, fsync: str, workdir: Path) -> None:
        self.port = free_port()
        self.command = [executable, "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "yes", "--appendfsync", fsync,
                        "--dir", str(workdir), "--daemonize", "no"]
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.conn: Resp | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.conn = self.ping()
                return
            except (OSError, RuntimeError) as exc:  # not listening yet, or -LOADING
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = self.log_path.read_text(errors="replace")
                    raise RuntimeError(
                        f"redis-server did not start ({exc}):\n{log_text}") from exc
                time.sleep(0.02)

    def ping(self) -> Resp:
        conn = Resp(self.port)
        try:
            conn.send(Resp.encode("PING"))
            conn.reply()
        except BaseException:
            conn.close()
            raise
        return conn

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        terminate(self.proc)


class ServerProcess:
    """A server child process: started, measured through /proc, stopped."""

    def __init__(self, kind: str, command: list[str], workdir: Path,
                 source: Path = ROOT) -> None:
        self.kind = kind
        self.command = command
        self.source = source  # the checkout whose smq package runs
        self.workdir = workdir
        self.log_path = workdir / f"{kind}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: smq_pb2_grpc.SuhaibMessageQueueStub | None = None
        self.address = ""
        self._spawned = 0.0  # monotonic time of spawn()

    def start(self, timeout: float = 30.0) -> float:
        """Spawn; return the seconds until Connect answers."""
        t0 = time.perf_counter()
        self.spawn()
        self.connect(timeout)
        return time.perf_counter() - t0

    def spawn(self) -> None:
        """Start the process; `connect()` waits for it. Servers started together are all
        spawned before any is connected to: a fork (preexec_fn) while a channel of this
        process is busy can fail in the child before it runs the server (gRPC's epoll
        poller: "Bad file descriptor")."""
        env = {k: v for k, v in os.environ.items()
               if k not in SERVER_ENV_NAMES and not k.startswith("SMQ_")}
        env["PYTHONPATH"] = str(self.source) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        self._spawned = time.monotonic()

    def connect(self, timeout: float = 30.0) -> None:
        """Wait until the spawned server listens, then until Connect answers."""
        deadline = self._spawned + timeout
        while True:
            match = LISTENING.search(self.log())
            if match:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status = ("still running" if self.proc.poll() is None
                          else f"exit status {self.proc.returncode}")
                raise RuntimeError(f"{self.kind} server did not start ({status}):\n{self.log()}")
            time.sleep(0.002)
        self.address = f"127.0.0.1:{match.group(1)}"
        self.channel = grpc.insecure_channel(self.address, options=CLIENT_OPTIONS)
        self.stub = smq_pb2_grpc.SuhaibMessageQueueStub(self.channel)
        self.stub.Connect(smq_pb2.ConnectRequest(), timeout=timeout, wait_for_ready=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, field: str) -> float:
        """A VmRSS/VmHWM-style field of /proc/PID/status, in MiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def info(self) -> smq_pb2.GetServerInfoResponse:
        return self.stub.GetServerInfo(smq_pb2.GetServerInfoRequest(), timeout=30)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        terminate(self.proc)


# -- metrics on and off ------------------------------------------------------------------

METRICS_ARMS = ("off", "on", "off2")  # off2: a second "off", the noise of a null change
METRICS_ORDERS = list(itertools.permutations(METRICS_ARMS))  # one per round, in turn
METRICS_WORKLOADS = ("unary", "batch")
METRICS_LOSS_MAX = 0.03  # the metrics issue: Produce and ProduceBatch lose at most 3%
METRICS_CALLS = re.compile(rb"^smq_rpcs_total\{([^}]*)\} (\S+)$", re.MULTILINE)


def metrics_flags(on: bool) -> list[str]:
    """The server's flags for metrics on (any free port) or off: said explicitly (before
    b30e9f8, a server without --metrics-port served metrics all the same)."""
    return ["--metrics-port", "0" if on else "off"]


def metrics_label(workload: str, batch: int) -> str:
    return {"unary": "Produce unary, 4 clients",
            "batch": f"ProduceBatch ({batch}/call), 1 client"}[workload]


class Scraper:
    """Fetches http://host:port/metrics every `interval` seconds from a thread of its own,
    as Prometheus would (one request per connection), between each `start()` and `stop()`;
    counts the scrapes that answered 200 with SMQ's call counts in them, and those that
    did not, over all of them."""

    def __init__(self, host: str, port: int, interval: float) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.ok = 0
        self.failed: list[str] = []
        self.seconds: list[float] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Scraper:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="scraper",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def report(self) -> dict:
        return {"scrapes": self.ok, "scrape_failures": len(self.failed),
                "scrape_errors": self.failed[:3], "scrape_bytes": self.bytes,
                "scrape_ms_median": (statistics.median(self.seconds) * 1000
                                     if self.seconds else None)}

    def scrape(self) -> bytes:
        """One GET /metrics: the body (raises on anything but a 200)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return body

    def calls(self) -> dict[str, float]:
        """Calls finished OK by method, as a scrape now reads them."""
        counts = {}
        for labels, value in METRICS_CALLS.findall(self.scrape()):
            label = dict(re.findall(r'(\w+)="([^"]*)"', labels.decode()))
            if label.get("code") == "OK":
                counts[label["method"]] = float(value)
        return counts

    def _run(self, stop: threading.Event) -> None:
        due = time.monotonic()
        while not stop.wait(max(due - time.monotonic(), 0)):
            t0 = time.perf_counter()
            try:
                body = self.scrape()
                if b"smq_rpcs_total" not in body:
                    raise RuntimeError("no smq_rpcs_total in the answer")
                self.ok += 1
                self.bytes += len(body)
                self.seconds.append(time.perf_counter() - t0)
            except Exception as exc:
                self.failed.append(repr(exc))
            due += self.interval


# -- phases ----------------------------------------------------------------------------

def smq_command(mode: str) -> list[str]:
    """A fresh SMQ server on bench.db in its working directory. Which checkout's smq it runs
    is ServerProcess's `source`, put first on its PYTHONPATH."""
    return [sys.executable, "-m", "smq", "--dbpath", "bench.db", "--port", "0",
            "--bind", "127.0.0.1", "--durability", mode]


@dataclasses.dataclass
class Settings:
    repeat: int
    sizes: list[int]
    modes: list[str]
    duration: float
    batch: int
    bulk_limit: int
    catchup_count: int
    catchup_bytes: int
    latency_rate: int
    latency_seconds: float
    settle: float
    raw: bool
    baseline: Path | None = None  # another checkout's smq, measured alongside (A/B)
    wear_messages: tuple[int, int, int] = (3000, 20000, 20000)  # unary, stream, batch
    wear_only: bool = False
    redis: str | None = None  # the redis-server executable of the peer, if any
    metrics_only: bool = False
    metrics_rounds: int = 3  # rounds of the metrics on/off comparison (0: none)
    scrape_interval: float = 1.0

    @property
    def metrics_size(self) -> int:
        return min(self.sizes)

    def catchup(self, size: int) -> int:
        return max(100, min(self.catchup_count, self.catchup_bytes // size))

    def wear_count(self, pattern: str, size: int) -> int:
        """Messages of a wear pattern: --wear-messages, at most WEAR_PAYLOAD_CAP of payload,
        rounded down to hundreds (and to whole batches)."""
        count = min(dict(zip(WEAR_PATTERNS, self.wear_messages))[pattern],
                    WEAR_PAYLOAD_CAP[pattern] // size)
        if count > 100:
            count -= count % 100
        if pattern == "batch":
            return max(1, count // self.batch) * self.batch
        return max(1, count)


class Bench:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.workdir = workdir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["grpc", "smq._proto.smq_pb2_grpc"])
        self.samples: list[dict] = []
        self.errors: list[str] = []

    def clients(self, server: ServerProcess, specs: list[tuple[str, dict]],
                timeout: float) -> tuple[list[dict], dict]:
        """Run client processes together; returns their reports and the server's deltas
        (CPU seconds, GetServerInfo counters) from the moment they all were ready."""
        barrier = self.ctx.Barrier(len(specs) + 1)
        results = self.ctx.Queue()
        procs = [self.ctx.Process(target=client_main, args=(role, server.address, params,
                                                            barrier, results), daemon=True)
                 for role, params in specs]
        for proc in procs:
            proc.start()
        try:
            barrier.wait(timeout=60)
        except Exception:
            pass  # a client failed before the start; its report says why
        cpu0, machine0, own0 = server.cpu_seconds(), machine_cpu(), time.process_time()
        info0 = server.info() if server.kind != "raw" else None
        reports, errors = [], []
        deadline = time.monotonic() + timeout
        for _ in procs:
            try:
                status, body = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception:
                errors.append("a client did not finish in time")
                break
            (reports if status == "ok" else errors).append(body)
        delta: dict[str, float] = {"server_cpu_s": server.cpu_seconds() - cpu0}
        machine1 = machine_cpu()
        if machine0 and machine1:
            # The CPU the rest of the machine took meanwhile: what else competed.
            delta["steal_s"] = machine1[1] - machine0[1]
            delta["others_cpu_s"] = max(0.0, machine1[0] - machine0[0] - delta["server_cpu_s"]
                                        - sum(r.get("client_cpu_s", 0) for r in reports)
                                        - (time.process_time() - own0))
        if info0 is not None:
            info1 = server.info()
            delta["commits"] = info1.commits - info0.commits
            delta["committed_messages"] = info1.committed_messages - info0.committed_messages
            delta["committed_writes"] = info1.committed_writes - info0.committed_writes
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if errors:
            raise RuntimeError("; ".join(errors))
        return reports, delta

    def throughput(self, server, name, specs, timeout) -> dict:
        reports, delta = self.clients(server, specs, timeout)
        messages = sum(r["messages"] for r in reports)
        elapsed = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
        result = {"value": messages / elapsed, "messages": messages, "elapsed_s": elapsed,
                  "server_cpu_us_per_msg": delta["server_cpu_s"] / messages * 1e6 if messages else None,
                  **delta}
        if delta.get("commits"):
            result["msgs_per_commit"] = delta["committed_messages"] / delta["commits"]
        return result

    def run_server(self, kind: str, size: int, mode: str, repeat: int) -> None:
        s = self.s
        if kind != "raw":
            command = smq_command(mode)
        else:
            command = [sys.executable, str(RAW_SERVER), "--port", "0", "--bind", "127.0.0.1"]
        rundir = Path(tempfile.mkdtemp(prefix=f"{kind}-{size}-{mode}-", dir=self.workdir))
        server = ServerProcess(kind, command, rundir,
                               self.s.baseline if kind == "base" else ROOT)
        where = {"server": kind, "size": size, "mode": mode, "repeat": repeat}

        def record(figure: str, value: float | None, **detail: Any) -> None:
            self.samples.append({**where, "figure": figure, "value": value, **detail})

        def phase(figure: str, run) -> None:
            try:
                run()
            except Exception as exc:
                message = f"{kind} size={size} mode={mode} repeat={repeat} {figure}: {exc}"
                self.errors.append(message)
                print("  ERROR " + message.splitlines()[0], file=sys.stderr)
                record(figure, None, error=str(exc))
            # Which phase makes the peak: the server's memory after each one.
            record(f"rss_after_{figure}", None, rss_mib=server.status("VmRSS"),
                   hwm_mib=server.status("VmHWM"))

        label = f"{kind} {size}B{'' if kind == 'raw' else ' ' + mode} #{repeat + 1}"
        t_phase = time.monotonic()
        try:
            record("startup_s", server.start())
            time.sleep(s.settle)
            record("idle_rss_mib", server.status("VmRSS"))
            catchup = s.catchup(size)
            for topic in ("u1", "u4", "sp", "pb", "catch", "lat"):
                server.stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=30)
            common = {"size": size, "duration": s.duration}
            timeout = s.duration + 120

            def write_phase(figure, specs):
                result = self.throughput(server, figure, specs, timeout)
                record(figure, result.pop("value"), **result)
                if figure == "unary_4" and "msgs_per_commit" in result:
                    record("msgs_per_commit_4", result["msgs_per_commit"])

            phase("unary_1", lambda: write_phase("unary_1", [("unary", {**common, "topic": "u1"})]))
            phase("unary_4", lambda: write_phase(
                "unary_4", [("unary", {**common, "topic": "u4"})] * 4))
            phase("stream_produce", lambda: write_phase(
                "stream_produce", [("stream_produce", {**common, "topic": "sp"})]))
            phase("produce_batch", lambda: write_phase(
                "produce_batch", [("produce_batch", {**common, "topic": "pb", "batch": s.batch})]))
            phase("produce_batch_4", lambda: write_phase(
                "produce_batch_4",
                [("produce_batch", {**common, "topic": "pb", "batch": s.batch})] * 4))

            # A topic of `catchup` messages, read from offset 1 by each kind of reader.
            request = smq_pb2.ProduceBatchRequest(topic="catch", messages=[payload_of(size)] * 100)
            for _ in range(catchup // 100):
                server.stub.ProduceBatch(request, timeout=60)
            read = {"topic": "catch", "count": catchup // 100 * 100, "timeout": timeout}
            phase("stream_consume", lambda: write_phase(
                "stream_consume", [("stream_consume", read)]))
            phase("subscribe", lambda: write_phase(
                "subscribe", [("subscribe", {**read, "max_messages": 0})]))
            phase("bulk_retrieve", lambda: write_phase(
                "bulk_retrieve", [("bulk_retrieve", {**read, "limit": s.bulk_limit})]))

            def latency():
                count = LATENCY_WARMUP + int(s.latency_rate * s.latency_seconds)
                p = {"topic": "lat", "size": max(size, 8), "count": count,
                     "rate": s.latency_rate, "timeout": s.latency_seconds + 120}
                reports, delta = self.clients(server, [
                    ("latency_subscriber", {**p, "kind": "subscribe"}),
                    ("latency_subscriber", {**p, "kind": "stream"}),
                    ("latency_producer", p)], timeout=p["timeout"])
                for report in reports:
                    if "latencies_us" not in report:
                        continue
                    kind_ = report["kind"]
                    lat = sorted(report["latencies_us"])
                    for q, name in ((0.50, "p50"), (0.99, "p99")):
                        record(f"latency_{kind_}_{name}", percentile(lat, q) / 1000,
                               samples=len(lat))
                    record(f"latency_{kind_}_all_us", None, latencies_us=[round(x, 1) for x in lat])
            phase("latency", latency)
            record("peak_rss_mib", server.status("VmHWM"))
        except Exception as exc:
            message = f"{kind} size={size} mode={mode} repeat={repeat}: {exc}"
            self.errors.append(message)
            print("  ERROR " + message, file=sys.stderr)
        finally:
            server.stop()
        print(f"  {label}: done in {time.monotonic() - t_phase:.1f}s", file=sys.stderr)

    def run_metrics(self, mode: str) -> None:
        """The metrics comparison in one mode: the three arms' servers (fresh, with the same
        settings, and --metrics-port 0 for "on") all started, then in each round unary
        Produce goes to each arm in turn, then ProduceBatch, the arms in that round's order.
        The on server is scraped during its phases (it is idle during the others')."""
        s, size = self.s, self.s.metrics_size
        servers: dict[str, ServerProcess] = {}
        scraper: Scraper | None = None
        made = dict.fromkeys(METRICS_WORKLOADS, 0)  # by the on server's clients
        label = f"metrics {size}B {mode}"
        try:
            for arm in METRICS_ARMS:  # all spawned first: see ServerProcess.spawn
                command = smq_command(mode) + metrics_flags(arm == "on")
                rundir = Path(tempfile.mkdtemp(prefix=f"metrics-{arm}-{size}-{mode}-",
                                               dir=self.workdir))
                servers[arm] = ServerProcess("smq", command, rundir)
                servers[arm].spawn()
            for arm, server in servers.items():
                server.connect()
                if bool(METRICS_AT.search(server.log())) != (arm == "on"):
                    raise RuntimeError(f"the {arm} server has metrics "
                                       f"{'off' if arm == 'on' else 'on'}:\n{server.log()}")
                for topic in ("mu", "mb"):
                    server.stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=30)
            match = METRICS_AT.search(servers["on"].log())
            if not match:
                raise RuntimeError(f"no metrics address in the server's log:\n"
                                   f"{servers['on'].log()}")
            scraper = Scraper(match.group(1), int(match.group(2)), s.scrape_interval)
            time.sleep(s.settle)
            common = {"size": size, "duration": s.duration}
            workloads = {
                "unary": [("unary", {**common, "topic": "mu"})] * 4,
                "batch": [("produce_batch", {**common, "topic": "mb", "batch": s.batch})]}
            for repeat in range(s.metrics_rounds):
                t0 = time.monotonic()
                for workload in METRICS_WORKLOADS:
                    for arm in METRICS_ORDERS[repeat % len(METRICS_ORDERS)]:
                        where = {"server": "metrics", "size": size, "mode": mode,
                                 "repeat": repeat, "arm": arm, "figure": f"metrics_{workload}"}
                        if arm == "on":
                            scraper.start()
                        try:
                            result = self.throughput(servers[arm], where["figure"],
                                                     workloads[workload], s.duration + 120)
                        except Exception as exc:
                            self.error(f"{label} {arm} round {repeat + 1} {workload}: {exc}")
                            self.samples.append({**where, "value": None, "error": str(exc)})
                            continue
                        finally:
                            if arm == "on":
                                scraper.stop()
                        if arm == "on":
                            made[workload] += result["messages"]
                        self.samples.append({**where, **result})
                print(f"  {label} round {repeat + 1}: done in {time.monotonic() - t0:.1f}s",
                      file=sys.stderr)
            # A last scrape: the calls it counts, beside those the clients made.
            counted, scrapes = scraper.calls(), scraper.report()
            self.samples.append({
                "server": "metrics", "size": size, "mode": mode, "repeat": None, "arm": "on",
                "figure": "metrics_scrapes", "value": scrapes["scrapes"], **scrapes,
                "counted_produce": counted.get("Produce", 0),
                "counted_produce_batch": counted.get("ProduceBatch", 0),
                "made_produce": made["unary"], "made_produce_batch": made["batch"] // s.batch})
            if scrapes["scrape_failures"]:
                self.error(f"{label}: {scrapes['scrape_failures']} scrape(s) failed: "
                           f"{scrapes['scrape_errors'][0]}")
        except Exception as exc:
            self.error(f"{label}: {exc}")
        finally:
            if scraper is not None:
                scraper.stop()
            for server in servers.values():
                server.stop()

    def run_wear(self, kind: str, size: int, mode: str, repeat: int) -> None:
        """Flash wear: each pattern alone, on a fresh server and topic, until it stops."""
        t0 = time.monotonic()
        for pattern in WEAR_PATTERNS:
            rundir = Path(tempfile.mkdtemp(prefix=f"{kind}-wear-{pattern}-{size}-{mode}-",
                                           dir=self.workdir))
            server = ServerProcess(kind, smq_command(mode), rundir,
                                   self.s.baseline if kind == "base" else ROOT)
            try:
                server.start()
                server.stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=f"wear-{pattern}"),
                                        timeout=30)
                write = functools.partial(
                    WEAR_WRITERS[pattern], server.stub, f"wear-{pattern}", payload_of(size),
                    self.s.wear_count(pattern, size), self.s.batch)
                self.wear_phase(kind, size, mode, repeat, pattern, server.proc, write)
            except Exception as exc:
                self.error(f"{kind} wear size={size} mode={mode} repeat={repeat}: {exc}")
            finally:
                server.stop()
        print(f"  {kind} wear {size}B {mode} #{repeat + 1}: done in "
              f"{time.monotonic() - t0:.1f}s", file=sys.stderr)

    def run_redis(self, size: int, fsync: str, repeat: int) -> None:
        """The peer's flash wear: XADD one at a time, and --batch per pipelined round trip."""
        rundir = Path(tempfile.mkdtemp(prefix=f"redis-{size}-{fsync}-", dir=self.workdir))
        t0 = time.monotonic()
        for pattern, per_trip in (("unary", 1), ("batch", self.s.batch)):
            (rundir / pattern).mkdir()
            server = RedisProcess(self.s.redis, fsync, rundir / pattern)
            try:
                server.start()
                write = functools.partial(redis_xadd, server.conn, f"wear-{pattern}",
                                          payload_of(size), self.s.wear_count(pattern, size),
                                          per_trip)
                self.wear_phase("redis", size, fsync, repeat, pattern, server.proc, write,
                                per_trip=per_trip)
            except Exception as exc:
                self.error(f"redis size={size} appendfsync={fsync} repeat={repeat}: {exc}")
            finally:
                server.stop()
        print(f"  redis {size}B appendfsync {fsync} #{repeat + 1}: done in "
              f"{time.monotonic() - t0:.1f}s", file=sys.stderr)

    def wear_phase(self, server: str, size: int, mode: str, repeat: int, pattern: str,
                   proc: subprocess.Popen, write, **detail: Any) -> None:
        figure = f"wear_{pattern}"
        where = {"server": server, "size": size, "mode": mode, "repeat": repeat,
                 "figure": figure}
        try:
            result = measure_wear(proc, size, write)
        except Exception as exc:
            self.error(f"{server} size={size} mode={mode} repeat={repeat} {figure}: {exc}")
            self.samples.append({**where, "value": None, "error": str(exc)})
            return
        self.samples.append({**where, **result, **detail})

    def error(self, message: str) -> None:
        self.errors.append(message)
        print("  ERROR " + message.splitlines()[0], file=sys.stderr)

    def run(self) -> None:
        if not self.s.metrics_only:
            self.run_main()
        if self.s.metrics_rounds:
            for mode in self.s.modes:
                self.run_metrics(mode)

    def run_main(self) -> None:
        for repeat in range(self.s.repeat):
            for size in self.s.sizes:
                if self.s.raw and not self.s.wear_only:
                    self.run_server("raw", size, "-", repeat)
                for mode in self.s.modes:
                    for kind in ("smq", "base") if self.s.baseline else ("smq",):
                        if not self.s.wear_only:
                            self.run_server(kind, size, mode, repeat)
                        self.run_wear(kind, size, mode, repeat)
                if self.s.redis:
                    for fsync in REDIS_FSYNC:
                        self.run_redis(size, fsync, repeat)


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the report -------------------------------------------------------------------------

def aggregate(samples: list[dict], figure: Figure, server: str, size: int,
              mode: str) -> float | None:
    values = [x["value"] for x in samples
              if x["figure"] == figure.key and x["server"] == server and x["size"] == size
              and (server == "raw" or x["mode"] == mode) and x["value"] is not None]
    if not values:
        return None
    return max(values) if figure.aggregate == "max" else statistics.median(values)


def evaluate(settings: Settings, samples: list[dict], batch: int, bulk_limit: int,
             rate: int) -> list[dict]:
    rows = []
    for size in settings.sizes:
        for mode in settings.modes:
            for figure in figures(batch, bulk_limit, rate):
                if settings.wear_only and not figure.key.startswith("wear_"):
                    continue
                smq = aggregate(samples, figure, "smq", size, mode)
                raw = None if figure.smq_only else aggregate(samples, figure, "raw", size, mode)
                ratio = smq / raw if smq is not None and raw else None
                checks = TARGETS.get(figure.key, []) if (size, mode) == (TARGET_SIZE, TARGET_MODE) else []
                if figure.key == "idle_rss_mib" and checks:
                    checks = [Check("ratio_max", IDLE_RSS_SLACK)]
                target_text, met = [], []
                for check in checks:
                    if check.kind == "ratio_max":
                        target_text.append(f"<={check.bound - 1:.0%} over raw")
                        met.append(None if ratio is None else ratio <= check.bound)
                    else:
                        target_text.append(check.text(figure.unit))
                        met.append(check.holds(smq, ratio))
                base = aggregate(samples, figure, "base", size, mode) if settings.baseline else None
                rows.append({
                    "figure": figure.key, "label": figure.label, "unit": figure.unit,
                    "size": size, "mode": mode, "smq": smq, "raw": raw, "ratio": ratio,
                    "base": base, "vs_base": smq / base if smq is not None and base else None,
                    "target": " & ".join(target_text),
                    "met": None if not met else (None if None in met else all(met))})
    return rows


def print_table(rows: list[dict], out=sys.stdout) -> None:
    header = ("figure", "size", "mode", "SMQ median", "raw median", "ratio", "target", "met?")
    with_base = any(r.get("base") is not None for r in rows)
    if with_base:
        header += ("baseline", "SMQ/base")
    lines = [header]
    for r in rows:
        line = (
            f"{r['label']} [{r['unit']}]", f"{r['size']}B", r["mode"], fmt(r["smq"], r["unit"]),
            fmt(r["raw"], r["unit"]), "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
            r["target"] or "", "" if not r["target"] else {True: "yes", False: "NO", None: "?"}[r["met"]])
        if with_base:
            line += (fmt(r["base"], r["unit"]),
                     "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if j in (0, 2, 6, 7) else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(line, widths))).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def metrics_rows(settings: Settings, samples: list[dict]) -> list[dict]:
    """Per mode and workload: each arm's runs (msg/s, server CPU us/msg), their medians,
    on's change from off, and off2's (the noise of the comparison); each change both as
    the ratio of the medians and as the median of the rounds' ratios (paired: the arms of
    a round ran within a minute of each other, so slower drift cancels)."""
    rows = []
    for mode in settings.modes:
        for workload in METRICS_WORKLOADS:
            by_arm = {arm: {x["repeat"]: x for x in samples if x["server"] == "metrics"
                            and x["figure"] == f"metrics_{workload}" and x["mode"] == mode
                            and x["arm"] == arm and x["value"] is not None}
                      for arm in METRICS_ARMS}
            row: dict[str, Any] = {
                "workload": workload, "label": metrics_label(workload, settings.batch),
                "mode": mode, "size": settings.metrics_size,
                "runs": {arm: [x["value"] for x in runs.values()] for arm, runs in by_arm.items()}}
            for key, figure in (("", "value"), ("cpu_", "server_cpu_us_per_msg")):
                median = {arm: median_or_none([x.get(figure) for x in runs.values()])
                          for arm, runs in by_arm.items()}
                row[f"{key}median"] = median
                for name, arm in (("change", "on"), ("noise", "off2")):
                    row[f"{key}{name}"] = relative(median[arm], median["off"])
                    row[f"{key}{name}_paired"] = median_or_none([
                        relative(by_arm[arm][r].get(figure), x.get(figure))
                        for r, x in by_arm["off"].items() if r in by_arm[arm]])
            rows.append(row)
    noise = max((abs(r[k]) for r in rows for k in ("noise", "noise_paired") if r[k] is not None),
                default=0.0)
    for row in rows:
        row["met"] = metrics_verdict(row, noise)
    return rows


def metrics_verdict(row: dict, noise: float) -> bool | None:
    """True if on lost at most METRICS_LOSS_MAX by both measures of the change; False if it
    lost more by both, and more than `noise` (the most off2 differs from off in any row of
    the run); None (cannot tell) otherwise."""
    changes = [row["change"], row["change_paired"]]
    if None in changes:
        return None
    if min(changes) >= -METRICS_LOSS_MAX:
        return True
    if max(changes) < -METRICS_LOSS_MAX and -max(changes) > noise:
        return False
    return None


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def relative(value: float | None, base: float | None) -> float | None:
    return value / base - 1 if value is not None and base else None


def print_metrics_table(settings: Settings, rows: list[dict], samples: list[dict],
                        out=sys.stdout) -> None:
    def pct(value):
        return "-" if value is None else f"{value:+.1%}"

    def runs(values):
        return f"{min(values):,.0f}-{max(values):,.0f}" if values else "-"

    rounds = max((len(r["runs"]["on"]) for r in rows), default=0)
    measured = [x for x in samples if x["server"] == "metrics"
                and x.get("others_cpu_s") is not None and x.get("elapsed_s")]
    others = [x["others_cpu_s"] / x["elapsed_s"] for x in measured]
    steal = [x["steal_s"] / x["elapsed_s"] for x in measured]
    print(f"\nmetrics on vs off ({settings.metrics_size}B, medians of {rounds} round(s); "
          f"three servers started together, measured in turn; on: --metrics-port 0 and a "
          f"scrape of /metrics every {settings.scrape_interval:g}s while measured; off2: a "
          f"second off, the noise; paired: median of the rounds' own ratios"
          + (f"; other processes used {statistics.median(others):.2f} (max {max(others):.2f})"
             f" of the {os.cpu_count()} cores meanwhile, and the hypervisor took (steal) "
             f"{statistics.median(steal):.2f} (max {max(steal):.2f})" if others else "")
          + ")", file=out)
    lines = [("workload", "mode", "off msg/s", "on msg/s", "change", "paired", "off runs",
              "on runs", "off2 vs off", "paired", "target", "met?")]
    for r in rows:
        lines.append((r["label"], r["mode"], fmt(r["median"]["off"], "msg/s"),
                      fmt(r["median"]["on"], "msg/s"), pct(r["change"]),
                      pct(r["change_paired"]), runs(r["runs"]["off"]), runs(r["runs"]["on"]),
                      pct(r["noise"]), pct(r["noise_paired"]), f"loss <={METRICS_LOSS_MAX:.0%}",
                      {True: "yes", False: "NO", None: "?"}[r["met"]]))
    print_columns(lines, out, left=(0, 1, 10, 11))
    print(f"met?: yes, on lost at most {METRICS_LOSS_MAX:.0%} by both measures; NO, more by "
          f"both, and more than off2 differs from off in any row; ?, this run cannot tell",
          file=out)
    noise = [abs(v) for r in rows for v in (r["noise"], r["noise_paired"]) if v is not None]
    if noise and max(noise) >= METRICS_LOSS_MAX:
        print(f"note: off2 differs from off by up to {max(noise):.1%} with nothing changed: "
              f"changes of that size are noise in this run (more --metrics-rounds, or a "
              f"quieter machine, narrow it)", file=out)
    print("\nserver CPU per message (us, median), metrics on vs off", file=out)
    lines = [("workload", "mode", "off", "on", "change", "paired", "off2 vs off", "paired")]
    for r in rows:
        cpu = r["cpu_median"]
        lines.append((r["label"], r["mode"], fmt(cpu["off"], "us"), fmt(cpu["on"], "us"),
                      pct(r["cpu_change"]), pct(r["cpu_change_paired"]), pct(r["cpu_noise"]),
                      pct(r["cpu_noise_paired"])))
    print_columns(lines, out, left=(0, 1))
    scrapes = [x for x in samples if x["figure"] == "metrics_scrapes"]
    if scrapes:
        times = [x["scrape_ms_median"] for x in scrapes if x["scrape_ms_median"] is not None]
        exact = [x["mode"] for x in scrapes if x["counted_produce"] == x["made_produce"]
                 and x["counted_produce_batch"] == x["made_produce_batch"]]
        print(f"scrapes: {sum(x['scrapes'] for x in scrapes)} answered, "
              f"{sum(x['scrape_failures'] for x in scrapes)} failed"
              + (f", median {statistics.median(times):.1f} ms and "
                 f"{statistics.median(x['scrape_bytes'] / max(x['scrapes'], 1) for x in scrapes):,.0f}"
                 f" bytes each" if times else "")
              + f"; the last scrape counted every Produce and ProduceBatch call the on "
              f"server's clients made: {', '.join(exact) or 'in no mode'}"
              + ("" if len(exact) == len(scrapes) else
                 f" (not in {', '.join(x['mode'] for x in scrapes if x['mode'] not in exact)})"),
              file=out)


def print_cpu_table(settings: Settings, samples: list[dict], out=sys.stdout) -> None:
    """Where the time goes: server CPU per message, and messages per commit, by phase."""
    phases = ("unary_1", "unary_4", "stream_produce", "produce_batch", "produce_batch_4",
              "stream_consume", "subscribe", "bulk_retrieve")

    def median_of(key, server, size, mode, phase):
        values = [x[key] for x in samples if x["figure"] == phase and x["server"] == server
                  and x["size"] == size and (server == "raw" or x["mode"] == mode)
                  and x.get(key) is not None]
        return statistics.median(values) if values else None

    with_base = any(x["server"] == "base" for x in samples)
    print("\nserver CPU per message (us, median) and messages per commit, by phase", file=out)
    print(f"{'phase':16} {'size':>6} {'mode':6} {'SMQ us/msg':>10} {'raw us/msg':>10} "
          f"{'SMQ-raw':>8} {'msg/commit':>10}"
          + (f" {'base us/msg':>11} {'base m/c':>8}" if with_base else ""), file=out)
    for size in settings.sizes:
        for mode in settings.modes:
            for name in phases:
                smq = median_of("server_cpu_us_per_msg", "smq", size, mode, name)
                raw = median_of("server_cpu_us_per_msg", "raw", size, mode, name)
                mpc = median_of("msgs_per_commit", "smq", size, mode, name)
                diff = f"{smq - raw:8.1f}" if smq is not None and raw is not None else f"{'-':>8}"
                line = (f"{name:16} {size:>5}B {mode:6} {fmt(smq, 'us'):>10} {fmt(raw, 'us'):>10} "
                        f"{diff} {fmt(mpc, 'msg'):>10}")
                if with_base:
                    base = median_of("server_cpu_us_per_msg", "base", size, mode, name)
                    base_mpc = median_of("msgs_per_commit", "base", size, mode, name)
                    line += f" {fmt(base, 'us'):>11} {fmt(base_mpc, 'msg'):>8}"
                print(line, file=out)


def print_memory_table(settings: Settings, samples: list[dict], out=sys.stdout) -> None:
    """The server's peak memory (VmHWM, MiB, max over runs) as it stood after each phase."""
    phases = ("unary_1", "unary_4", "stream_produce", "produce_batch", "produce_batch_4",
              "stream_consume", "subscribe", "bulk_retrieve", "latency")
    print("\nserver peak RSS (VmHWM, MiB, max over runs) after each phase", file=out)
    short = {"unary_1": "unary1", "unary_4": "unary4", "stream_produce": "streamprod",
             "produce_batch": "batch1", "produce_batch_4": "batch4", "stream_consume": "streamcons",
             "subscribe": "subscribe", "bulk_retrieve": "bulk", "latency": "latency"}
    print(f"{'server':6} {'size':>6} {'mode':6} " + " ".join(f"{short[p]:>10}" for p in phases),
          file=out)
    for server in ("raw", "smq", "base"):
        for size in settings.sizes:
            for mode in (["-"] if server == "raw" else settings.modes):
                cells = []
                for phase in phases:
                    values = [x["hwm_mib"] for x in samples if x["figure"] == f"rss_after_{phase}"
                              and x["server"] == server and x["size"] == size and x["mode"] == mode]
                    cells.append(f"{max(values):10.1f}" if values else f"{'-':>10}")
                if any(c.strip() != "-" for c in cells):
                    print(f"{server:6} {size:>5}B {mode:6} " + " ".join(cells), file=out)


def wear_median(samples: list[dict], server: str, pattern: str, size: int,
                mode: str) -> float | None:
    values = [x["value"] for x in samples if x["figure"] == f"wear_{pattern}"
              and x["server"] == server and x["size"] == size and x["mode"] == mode
              and x["value"] is not None]
    return statistics.median(values) if values else None


def print_columns(lines: list[tuple[str, ...]], out, left: tuple[int, ...] = (0,)) -> None:
    """Aligned: the `left` columns (the first) to the left, the others to the right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) if j in left else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(line, widths))).rstrip(), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)


def print_wear_tables(settings: Settings, samples: list[dict], redis_skipped: str | None,
                      out=sys.stdout) -> None:
    """Bytes written per message as multiples of the payload, then beside redis's."""
    smq = [(server, mode) for server in ("smq", "base") for mode in settings.modes
           if any(x["server"] == server and x["figure"].startswith("wear_") for x in samples)]
    labels = {pattern: wear_label(pattern, settings.batch) for pattern in WEAR_PATTERNS}
    names = {"smq": "SMQ", "base": "base"}

    def cell(server, pattern, size, mode, bytes_too=False):
        value = wear_median(samples, server, pattern, size, mode)
        if value is None:
            return "-"
        return f"{value:,.0f} ({value / size:.1f}x)" if bytes_too else f"{value / size:.1f}x"

    print("\nbytes written per message (x payload): medians of the server's write_bytes "
          "(/proc/PID/io) per message, checkpoints included", file=out)
    lines = [("pattern", "size", *(f"{names[server]} {mode}" for server, mode in smq))]
    for pattern in WEAR_PATTERNS:
        for size in settings.sizes:
            lines.append((labels[pattern], f"{size}B",
                          *(cell(server, pattern, size, mode) for server, mode in smq)))
    print_columns(lines, out)
    values = [x["value"] for x in samples if x["figure"].startswith("wear_")
              and x["server"] != "redis" and x["value"] is not None]
    if values and not any(values):
        print("  (no bytes written at all: is --workdir on tmpfs?)", file=out)
    unsettled = sum(1 for x in samples if x["figure"].startswith("wear_")
                    and x.get("settled") is False)
    if unsettled:
        print(f"  ({unsettled} measurement(s) still writing {WEAR_SETTLE_MAX_S:.0f} s after "
              f"the phase: they may miss some writes; see 'settled' in --json)", file=out)

    if redis_skipped:
        print(f"\nbytes written per message: SMQ vs redis: the redis peer was skipped "
              f"({redis_skipped})", file=out)
        return
    print(f"\nbytes written per message: SMQ vs redis [B/msg (x payload)], medians; redis: "
          f"AOF, XADD one at a time (unary), {settings.batch} XADDs pipelined per round trip "
          f"(ProduceBatch), no StreamProduce counterpart", file=out)
    lines = [("pattern", "size", *(f"{names[server]} {mode}" for server, mode in smq),
              *(f"redis {fsync}" for fsync in REDIS_FSYNC))]
    for pattern in WEAR_PATTERNS:
        for size in settings.sizes:
            lines.append((labels[pattern], f"{size}B",
                          *(cell(server, pattern, size, mode, True) for server, mode in smq),
                          *(cell("redis", pattern, size, fsync, True) for fsync in REDIS_FSYNC)))
    print_columns(lines, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (tiny phases, 1 repeat): proves the script works")
    parser.add_argument("--repeat", type=int, help="runs of every figure (default 3; quick 1)")
    parser.add_argument("--json", default="bench-results.json", help="where to write all samples")
    parser.add_argument("--sizes", default="100,10240", help="payload sizes in bytes")
    parser.add_argument("--modes", default="full,normal", help="SMQ durability modes")
    parser.add_argument("--duration", type=float, help="seconds per write phase (default 2)")
    parser.add_argument("--batch", type=int, default=100, help="messages per ProduceBatch call")
    parser.add_argument("--bulk-limit", type=int, default=10_000, help="BulkRetrieve page limit")
    parser.add_argument("--catchup", type=int, help="messages in the catch-up topic (default "
                        "100000, at most 100 MiB of payload)")
    parser.add_argument("--latency-rate", type=int, default=200, help="msg/s of the latency phase")
    parser.add_argument("--latency-seconds", type=float, help="length of the latency phase (default 5)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-gRPC ceiling")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure the smq package of another checkout (e.g. `git "
                             "archive main smq | tar -x -C DIR`), interleaved: an A/B comparison")
    parser.add_argument("--workdir", help="keep server databases and logs here (default: a temp dir)")
    parser.add_argument("--wear-only", action="store_true",
                        help="only the flash-wear phases: bytes written per message (fast)")
    parser.add_argument("--only", choices=("metrics", "wear"),
                        help="run only this part: metrics, the metrics on/off comparison; "
                             "wear, the same as --wear-only")
    parser.add_argument("--metrics-rounds", type=int,
                        help="rounds of the metrics on/off comparison, each arm once per round "
                             "(default 3; 15 with --only metrics; quick 1; 0: none)")
    parser.add_argument("--scrape-interval", type=float, default=1.0,
                        help="seconds between scrapes of /metrics while metrics are on")
    parser.add_argument("--wear-messages", metavar="U,S,B",
                        help="messages per wear pattern: unary, StreamProduce, ProduceBatch "
                             "(default 3000,20000,20000; quick 200,1000,1000), at most 10 MiB "
                             "of payload for unary and 30 MiB for the others (10 KiB: "
                             "1000,3000,3000)")
    parser.add_argument("--no-redis", action="store_true",
                        help="skip the redis peer of the wear phases (run when redis-server "
                             "is on PATH)")
    args = parser.parse_args(argv)
    wear_only = args.wear_only or args.only == "wear"
    metrics_only = args.only == "metrics"
    if wear_only and metrics_only:
        parser.error("--wear-only and --only metrics exclude each other")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    quick = args.quick
    settings = Settings(
        repeat=args.repeat or (1 if quick else 3),
        sizes=[int(x) for x in args.sizes.split(",") if x],
        modes=[x.strip() for x in args.modes.split(",") if x.strip()],
        duration=args.duration or (0.3 if quick else 2.0),
        batch=args.batch, bulk_limit=args.bulk_limit,
        catchup_count=args.catchup or (2_000 if quick else 100_000),
        catchup_bytes=(20 if quick else 100) * MiB,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds or (0.3 if quick else 5.0),
        settle=0.2 if quick else 1.0, raw=not args.no_raw,
        baseline=Path(args.baseline).resolve() if args.baseline else None,
        wear_messages=wear_messages(args.wear_messages, quick), wear_only=wear_only,
        redis=None if args.no_redis or metrics_only else shutil.which("redis-server"),
        metrics_only=metrics_only,
        metrics_rounds=(0 if wear_only else args.metrics_rounds if args.metrics_rounds is not None
                        else 1 if quick else 15 if metrics_only else 3),
        scrape_interval=args.scrape_interval)
    redis_skipped = ("--no-redis" if args.no_redis
                     else None if settings.redis else "redis-server is not on PATH")
    if metrics_only and settings.metrics_rounds < 1:
        parser.error("--only metrics needs --metrics-rounds of at least 1")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="smq-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(settings, workdir)
        metrics_part = (f"metrics on/off: {settings.metrics_rounds} round(s) of "
                        f"{settings.metrics_size}B" if settings.metrics_rounds else "")
        if metrics_only:
            print(f"SMQ benchmark, metrics only: modes {settings.modes}, "
                  f"{settings.duration}s per write phase, {metrics_part}", file=sys.stderr)
        else:
            print(f"SMQ benchmark: sizes {settings.sizes}, modes {settings.modes}, "
                  f"{settings.repeat} repeat(s), "
                  + ("" if settings.wear_only else f"{settings.duration}s per write phase, ")
                  + f"wear messages {settings.wear_messages} (unary, stream, batch), redis peer "
                  + (settings.redis or f"skipped: {redis_skipped}")
                  + (f", {metrics_part}" if metrics_part else ""), file=sys.stderr)
        bench.run()
    rows = [] if metrics_only else evaluate(settings, bench.samples, settings.batch,
                                            settings.bulk_limit, settings.latency_rate)
    metrics = metrics_rows(settings, bench.samples) if settings.metrics_rounds else []
    if settings.wear_only:
        print(f"\nSMQ flash wear, medians of {settings.repeat} run(s)")
    elif not metrics_only:
        print(f"\nSMQ vs raw grpcio (no storage), medians of {settings.repeat} run(s); "
              f"ratio = SMQ/raw; targets for {TARGET_SIZE}B, {TARGET_MODE} durability")
    if not metrics_only:
        print_table(rows)
    if not settings.wear_only and not metrics_only:
        print_cpu_table(settings, bench.samples)
        print_memory_table(settings, bench.samples)
    if not metrics_only:
        print_wear_tables(settings, bench.samples, redis_skipped)
    if metrics:
        print_metrics_table(settings, metrics, bench.samples)
    report = {
        "command": [sys.executable, *sys.argv] if argv is None else ["bench.py", *argv],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "grpcio": grpc.__version__,
                    "loadavg_at_end": os.getloadavg()},
        "settings": dataclasses.asdict(settings), "rows": rows, "metrics_rows": metrics,
        "samples": bench.samples,
        "redis": redis_version(settings.redis) if settings.redis else f"skipped: {redis_skipped}",
        "errors": bench.errors,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"\nall samples: {args.json}")
    if bench.errors:
        print(f"\n{len(bench.errors)} error(s):", file=sys.stderr)
        for error in bench.errors:
            print("  " + error, file=sys.stderr)
        return 1
    return 0


def wear_messages(option: str | None, quick: bool) -> tuple[int, int, int]:
    if not option:
        return (200, 1000, 1000) if quick else (3000, 20000, 20000)
    counts = tuple(int(x) for x in option.split(","))
    if len(counts) != 3 or min(counts) < 1:
        raise SystemExit("--wear-messages: three positive counts, e.g. 3000,20000,20000")
    return counts[0], counts[1], counts[2]


def redis_version(executable: str) -> str:
    try:
        return subprocess.run([executable, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{executable}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
