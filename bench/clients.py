#!/usr/bin/env python3
"""How fast the Python clients produce and read, against one fresh SMQ server.

    .venv/bin/python bench/clients.py [--repeat 5] [--seconds 2] [--mode normal|full]
                                      [--catchup 100000] [--json FILE]

The server runs in its own process (`python -m smq` on a new database, default
durability unless --mode), the clients in this one: what is measured is the client
library, with the server beside it on the same machine. Every figure runs --repeat
times, interleaved, and the table gives the median (min-max) of messages per second,
100-byte payloads, each to a topic of its own:

  sync produce                 Client.produce, one call at a time
  sync produce_many(100)       Client.produce_many(batch_size=100)
  Producer, 1 thread           Producer.send from one thread, then flush
  Producer, 8 threads          Producer.send from 8 threads, then flush
  async produce                AsyncClient.produce, one awaited at a time
  async produce, 200 in flight AsyncClient.produce, 200 concurrent tasks
  sync subscribe catch-up      Client.subscribe over --catchup stored messages
  async subscribe catch-up     AsyncClient.subscribe over the same messages

and the ratios the client issue asks for. A measurement, not a test: nothing fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench import ServerProcess, smq_command  # noqa: E402  (bench/bench.py)

from smq.client import AsyncClient, Client, Producer  # noqa: E402

PAYLOAD = b"x" * 100
CONCURRENCY = 200
THREADS = 8


class Run:
    """One server and the clients on it; each figure writes to a topic of its own."""

    def __init__(self, address: str, seconds: float, catchup: str) -> None:
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.client = Client(host, self.port, timeout=60)
        self.seconds = seconds
        self.catchup = catchup
        self.topics = 0

    def topic(self) -> str:
        self.topics += 1
        name = f"bench-{self.topics}"
        self.client.create_topic(name)
        return name

    def timed(self, send_some: Callable[[str], int]) -> float:
        """Messages per second of send_some(topic) -> messages, called until --seconds pass."""
        topic = self.topic()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < self.seconds:
            count += send_some(topic)
        return count / (time.perf_counter() - started)

    # -- figures ---------------------------------------------------------------------------

    def sync_produce(self) -> float:
        def some(topic: str) -> int:
            for _ in range(100):
                self.client.produce(topic, PAYLOAD)
            return 100
        return self.timed(some)

    def sync_produce_many(self) -> float:
        return self.timed(lambda topic: sum(map(len, self.client.produce_many(
            topic, [PAYLOAD] * 1000, batch_size=100))))

    def producer(self, threads: int) -> float:
        topic = self.topic()
        per_thread = int(self.seconds * 150_000 / threads) + 1  # about --seconds at the target
        with Producer(self.client) as producer:
            def work() -> None:
                for _ in range(per_thread):
                    producer.send(topic, PAYLOAD)

            workers = [threading.Thread(target=work) for _ in range(threads)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            producer.flush()
            elapsed = time.perf_counter() - started
        return per_thread * threads / elapsed

    def async_produce(self, in_flight: int) -> float:
        async def main() -> float:
            async with AsyncClient(self.host, self.port, timeout=60) as client:
                topic = self.topic()
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < self.seconds:
                    if in_flight == 1:
                        for _ in range(100):
                            await client.produce(topic, PAYLOAD)
                        count += 100
                    else:
                        await asyncio.gather(*(client.produce(topic, PAYLOAD)
                                               for _ in range(in_flight)))
                        count += in_flight
                return count / (time.perf_counter() - started)
        return asyncio.run(main())

    def sync_subscribe(self) -> float:
        total = self.client.get_latest_offset(self.catchup)
        started = time.perf_counter()
        for message in self.client.subscribe(self.catchup, 0):
            if message.offset == total:
                break
        return total / (time.perf_counter() - started)

    def async_subscribe(self) -> float:
        total = self.client.get_latest_offset(self.catchup)

        async def main() -> float:
            async with AsyncClient(self.host, self.port, timeout=60) as client:
                started = time.perf_counter()
                async for message in client.subscribe(self.catchup, 0):
                    if message.offset == total:
                        break
                return total / (time.perf_counter() - started)
        return asyncio.run(main())


FIGURES: dict[str, Callable[[Run], float]] = {
    "sync produce": Run.sync_produce,
    "sync produce_many(100)": Run.sync_produce_many,
    "Producer, 1 thread": lambda run: run.producer(1),
    f"Producer, {THREADS} threads": lambda run: run.producer(THREADS),
    "async produce": lambda run: run.async_produce(1),
    f"async produce, {CONCURRENCY} in flight": lambda run: run.async_produce(CONCURRENCY),
    "sync subscribe catch-up": Run.sync_subscribe,
    "async subscribe catch-up": Run.async_subscribe,
}

# (figure, over figure, at least): the client issue's targets on this machine
RATIOS = [
    (f"Producer, {THREADS} threads", "sync produce_many(100)", 1.2),
    (f"async produce, {CONCURRENCY} in flight", "sync produce", 2.0),
    ("async subscribe catch-up", "sync subscribe catch-up", 0.8),
]
ABSOLUTE = {f"Producer, {THREADS} threads": 150_000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each timed figure")
    parser.add_argument("--mode", default="full", help="the server's --durability (default full)")
    parser.add_argument("--catchup", type=int, default=100_000, help="messages to read back")
    parser.add_argument("--json", help="write every sample here")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {name: [] for name in FIGURES}
    with tempfile.TemporaryDirectory(prefix="smq-bench-clients-") as tmp:
        server = ServerProcess("smq", smq_command(args.mode), Path(tmp))
        server.start()
        try:
            run = Run(server.address, args.seconds, "catchup")
            run.client.create_topic("catchup")
            run.client.produce_many("catchup", [PAYLOAD] * args.catchup)
            for repeat in range(args.repeat):
                for name, figure in FIGURES.items():
                    samples[name].append(figure(run))
                    print(f"# run {repeat + 1}: {name}: {samples[name][-1]:,.0f} msg/s",
                          file=sys.stderr)
            run.client.close()
        finally:
            server.stop()

    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\n100-byte messages, durability {args.mode}, median of {args.repeat} runs")
    print(f"{'figure':<32} {'msg/s':>10}   {'min-max':>21}")
    for name, values in samples.items():
        print(f"{name:<32} {medians[name]:>10,.0f}   {min(values):>9,.0f}-{max(values):<11,.0f}")
    print(f"\n{'ratio':<58} {'value':>6} {'target':>7}  met")
    for name, over, least in RATIOS:
        ratio = medians[name] / medians[over]
        print(f"{name + ' / ' + over:<58} {ratio:>6.2f} {'>= ' + str(least):>7}  "
              f"{'yes' if ratio >= least else 'NO'}")
    for name, least in ABSOLUTE.items():
        print(f"{name + ' (msg/s)':<58} {medians[name]:>6,.0f} {'>= ' + format(least, ','):>7}  "
              f"{'yes' if medians[name] >= least else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
