#!/usr/bin/env python3
"""Memory abuse of a real SMQ server: the clients of issue 13 (points 5-7) that make a
server hold memory, each scenario against a fresh server, with its RSS measured.

    .venv/bin/python soak/abuse.py                       # every scenario, the issue's numbers
    .venv/bin/python soak/abuse.py --scale 3             # three times as many calls/streams/bytes
    .venv/bin/python soak/abuse.py --server-root ../main --only bulk-1conn,batches
    .venv/bin/python soak/abuse.py --port 8097 --scale 3    # against a running server

Scenarios (at --scale 1; the counts scale, sizes do not):

  bulk-1conn      1 connection x 40 unary BulkRetrieve(limit=10000) of ~3 MiB replies,
                  from a raw HTTP/2 client that never reads (soak/stalled.py)
  bulk-4conn      4 connections x 60 of the same
  subscribe       64 Subscribe streams that never read while 100 MiB are produced
  stream-consume  64 StreamConsume streams likewise
  produce-1conn   10 StreamProduce streams x 30 x 1 MiB on one connection
  produce-60      60 StreamProduce streams x 30 x 1 MiB (10 per connection)
  batches         100 concurrent ProduceBatch calls of 4 MB (4 x 1,000,000 bytes)

For each, a table row: the calls made and how they ended (ok, RESOURCE_EXHAUSTED,
cancelled or reset by the server, still open when the client closed), and the server's
RSS in MiB from /proc/PID/status: idle (VmRSS before the abuse), peak (VmHWM), after
(VmRSS --after seconds once the abusers are gone). The server is this checkout's
`python -m smq` (or --server-root's), started with --server-args, on a free loopback port.

With --port, the scenarios run one after the other against the server already
listening there (on 127.0.0.1; its topics prepared first unless --skip-prepare), and
each prints one JSON line of outcomes: tests/e2e/test_soak_memory.py runs it that way,
beside normal clients, and measures the server itself.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402

from smq._proto import smq_pb2, smq_pb2_grpc  # noqa: E402
from stalled import RESET, StalledConnection  # noqa: E402

MIB = 1024**2
BULK_TOPIC, FLOOD_TOPIC, WRITE_TOPIC = "abuse-bulk", "abuse-flood", "abuse-writes"
BULK_MESSAGES, BULK_SIZE = 10_000, 300
STATUS_NAMES = {"0": "ok", "1": "cancelled", "8": "RESOURCE_EXHAUSTED", "14": "unavailable",
                RESET: "reset"}
CALL_TIMEOUT = 120.0


def rss(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values


def stub_for(port: int, own_connection: bool = True) -> smq_pb2_grpc.SuhaibMessageQueueStub:
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    options.append(("grpc.max_receive_message_length", 64 * MIB))
    return smq_pb2_grpc.SuhaibMessageQueueStub(grpc.insecure_channel(f"127.0.0.1:{port}", options))


def prepare(port: int) -> None:
    """The topics the scenarios use: one of 10,000 messages of 300 bytes to page through,
    one to flood, one to write to (keeping 64 MiB, so the database stays small)."""
    stub = stub_for(port)
    for topic in (BULK_TOPIC, FLOOD_TOPIC, WRITE_TOPIC):
        stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=CALL_TIMEOUT)
    stub.SetTopicPolicy(smq_pb2.SetTopicPolicyRequest(
        topic=WRITE_TOPIC, policy=smq_pb2.TopicPolicy(max_bytes=64 * MIB)), timeout=CALL_TIMEOUT)
    for _ in range(BULK_MESSAGES // 1000):
        stub.ProduceBatch(smq_pb2.ProduceBatchRequest(
            topic=BULK_TOPIC, messages=[b"b" * BULK_SIZE] * 1000), timeout=CALL_TIMEOUT)


def _tally(connections: list[StalledConnection], opened: int, counts: Counter) -> None:
    ended = {}
    for conn in connections:
        ended.update({(id(conn), sid): code for sid, code in conn.statuses().items()})
    for code in ended.values():
        counts[STATUS_NAMES.get(code, f"status {code}")] += 1
    counts["open when closed"] += opened - len(ended)


def unread_calls(port: int, method: str, request: bytes, connections: int, calls_each: int,
                 while_open: Callable[[], None] = lambda: None, hold: float = 3.0) -> Counter:
    """`calls_each` calls of `method` on each of `connections` raw connections that never
    read; `while_open()` runs while they are open, then they stay `hold` seconds more."""
    counts: Counter = Counter()
    conns = [StalledConnection("127.0.0.1", port) for _ in range(connections)]
    time.sleep(0.2)  # the server's SETTINGS (its stream limit) arrive
    opened = 0
    for conn in conns:
        for _ in range(calls_each):
            if conn.call(method, request) is None:
                counts["not sent: stream limit"] += 1
            else:
                opened += 1
    counts["calls"] = opened
    while_open()
    time.sleep(hold)
    _tally(conns, opened, counts)
    for conn in conns:
        conn.close()
    return counts


def bulk_unread(port: int, connections: int, calls_each: int, hold: float) -> Counter:
    request = smq_pb2.BulkRetrieveRequest(topic=BULK_TOPIC, start_offset=1, limit=10_000)
    return unread_calls(port, "BulkRetrieve", request.SerializeToString(), connections, calls_each,
                        hold=hold)


def produce_flood(port: int, mib: int, counts: Counter) -> None:
    """Produce `mib` MiB in batches of 16 x 64 KiB to the flood topic."""
    stub = stub_for(port)
    for n in range(mib):
        payloads = [bytes([n % 256]) * (64 * 1024)] * 16
        try:
            stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic=FLOOD_TOPIC, messages=payloads),
                              timeout=CALL_TIMEOUT)
            counts["flood MiB produced"] += 1
        except grpc.RpcError as exc:
            counts[f"flood produce {exc.code().name}"] += 1


def streams_unread(port: int, method: str, streams: int, mib: int, hold: float) -> Counter:
    """`streams` streams (16 per connection) that never read while `mib` MiB are produced."""
    if method == "Subscribe":
        request = smq_pb2.SubscribeRequest(topic=FLOOD_TOPIC, offset=1)
    else:
        request = smq_pb2.ConsumeRequest(topic=FLOOD_TOPIC, offset=1)
    per_connection = 16
    connections = -(-streams // per_connection)
    flooded: Counter = Counter()
    counts = unread_calls(port, method, request.SerializeToString(), connections, per_connection,
                          lambda: produce_flood(port, mib, flooded), hold)
    return counts + flooded


def _concurrently(count: int, work: Callable[[int], str]) -> Counter:
    """Run work(0..count-1) in `count` threads at once; count what each returns."""
    counts: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        outcome = work(n)
        with lock:
            counts[outcome] += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts["calls"] = count
    return counts


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
        return "ok"
    except grpc.RpcError as exc:
        return exc.code().name if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED else "RESOURCE_EXHAUSTED"


def stream_produce(port: int, streams: int, per_connection: int, messages: int = 30,
                   size: int = MIB) -> Counter:
    """`streams` StreamProduce streams of `messages` x `size` bytes, all at once."""
    stubs = [stub_for(port) for _ in range(-(-streams // per_connection))]
    payload = b"p" * size

    def requests():
        for _ in range(messages):
            yield smq_pb2.ProduceRequest(topic=WRITE_TOPIC, message=payload)

    return _concurrently(streams, lambda n: _outcome(
        lambda: stubs[n // per_connection].StreamProduce(requests(), timeout=CALL_TIMEOUT)))


def batches(port: int, calls: int, channels: int = 10) -> Counter:
    """`calls` concurrent ProduceBatch calls of 4 x 1,000,000 bytes."""
    stubs = [stub_for(port) for _ in range(channels)]
    request = smq_pb2.ProduceBatchRequest(topic=WRITE_TOPIC, messages=[b"q" * 1_000_000] * 4)
    return _concurrently(calls, lambda n: _outcome(
        lambda: stubs[n % channels].ProduceBatch(request, timeout=CALL_TIMEOUT)))


def scenarios(scale: int, hold: float = 3.0) -> dict[str, Callable[[int], Counter]]:
    """Each scenario at `scale`: a function of the server's port. Clients that never
    read stay connected `hold` seconds once their calls are made."""
    return {
        "bulk-1conn": lambda port: bulk_unread(port, 1, 40 * scale, hold),
        "bulk-4conn": lambda port: bulk_unread(port, 4 * scale, 60, hold),
        "subscribe": lambda port: streams_unread(port, "Subscribe", 64 * scale, 100 * scale, hold),
        "stream-consume": lambda port: streams_unread(port, "StreamConsume", 64 * scale,
                                                      100 * scale, hold),
        "produce-1conn": lambda port: stream_produce(port, 10 * scale, 10 * scale),
        "produce-60": lambda port: stream_produce(port, 60 * scale, 10),
        "batches": lambda port: batches(port, 100 * scale),
    }


# -- running them against fresh servers -------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m smq` of a checkout on a free port, with a database in `work`."""

    def __init__(self, root: Path, work: Path, args: list[str]) -> None:
        self.port = free_port()
        self.log_path = work / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMQ_")}
        env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smq", "--dbpath", str(work / "abuse.db"), "--port",
             str(self.port), "--bind", "127.0.0.1", *args],
            cwd=root, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "serving on" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def memory(self) -> dict[str, float]:
        return rss(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def run_scenario(name: str, abuse: Callable[[int], Counter], root: Path, server_args: list[str],
                 after_seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="smq-abuse-") as work:
        server = Server(root, Path(work), server_args)
        try:
            prepare(server.port)
            time.sleep(1)
            idle = server.memory()["VmRSS"]
            started = time.monotonic()
            counts = abuse(server.port)
            seconds = time.monotonic() - started
            time.sleep(after_seconds)
            memory = server.memory()
            stub_for(server.port).Connect(smq_pb2.ConnectRequest(), timeout=30)  # still serving
            log = server.log_path.read_text()
        finally:
            code = server.stop()
    return {"scenario": name, "outcomes": dict(counts), "seconds": round(seconds, 1),
            "idle_mib": round(idle, 1), "peak_mib": round(memory["VmHWM"], 1),
            "after_mib": round(memory["VmRSS"], 1), "exit_code": code,
            "tracebacks": log.count("Traceback")}


def outcome_text(outcomes: dict) -> str:
    calls = outcomes.get("calls", 0)
    rest = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()) if k != "calls" and v)
    return f"{calls} calls: {rest}"


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'scenario':<15} {'idle':>6} {'peak':>7} {'after':>6}  outcomes (RSS in MiB)")
    for row in rows:
        print(f"{row['scenario']:<15} {row['idle_mib']:>6.1f} {row['peak_mib']:>7.1f} "
              f"{row['after_mib']:>6.1f}  {outcome_text(row['outcomes'])}; {row['seconds']} s"
              + (f"; exit code {row['exit_code']}" if row["exit_code"] else "")
              + (f"; {row['tracebacks']} tracebacks in the log" if row["tracebacks"] else ""))


def attach(port: int, names: list[str], chosen: dict[str, Callable[[int], Counter]],
           skip_prepare: bool) -> None:
    """Run the scenarios against the server on `port`, a JSON line of outcomes each."""
    if not skip_prepare:
        prepare(port)
    for name in names:
        started = time.monotonic()
        counts = chosen[name](port)
        print(json.dumps({"scenario": name, "outcomes": dict(counts),
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="multiply the issue's counts (default 1)")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--server-root", default=str(ROOT), help="checkout whose `python -m smq` runs")
    parser.add_argument("--server-args", default="", help="extra server flags, space-separated")
    parser.add_argument("--after", type=float, default=5.0, help="seconds before the after figure")
    parser.add_argument("--hold", type=float, default=3.0,
                        help="seconds clients that never read stay connected (default 3)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--port", type=int, help="abuse the server listening on 127.0.0.1:PORT")
    parser.add_argument("--skip-prepare", action="store_true", help="with --port: topics exist")
    args = parser.parse_args(argv)
    chosen = scenarios(args.scale, args.hold)
    names = [n for n in args.only.split(",") if n] or list(chosen)
    unknown = set(names) - set(chosen)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(chosen)}")
    if args.port:
        attach(args.port, names, chosen, args.skip_prepare)
        return 0
    rows = []
    for name in names:
        row = run_scenario(name, chosen[name], Path(args.server_root), args.server_args.split(),
                           args.after)
        print_table([row], f"[{name}]")
        rows.append(row)
    print_table(rows, f"server {args.server_root} {args.server_args}, scale {args.scale}:")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
