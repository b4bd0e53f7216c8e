#!/usr/bin/env python3
"""What the server's metrics cost, measured piece by piece (bench.py's metrics on/off
comparison measures the sum, end to end, through the machine's noise):

    .venv/bin/python bench/metrics_costs.py [--quick]

  per call     status.py's wrapper around a handler that does nothing, counting into
               tallies.CallStats (metrics on) and into NoCallStats (off): the difference
               is what every call pays with metrics on
  per commit   GroupCommitWriter._count_commit on a one-topic commit (paid with metrics
               on or off: the writer always counts)
  per scrape   a server with --metrics-port 0 (two topics, some traffic) answering GET
               /metrics back to back: its CPU time per scrape (/proc/PID/stat), the size
  idle         a server left idle, with and without --metrics-port 0: its CPU time and
               context switches (every thread's, /proc/PID/task) per second

The code timings are the best of several runs (the least disturbed by the rest of the
machine); the server figures are medians of several runs, interleaved. It prints a
table; nothing here fails on a figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
from smq._proto import smq_pb2  # noqa: E402
from smq.server import status, writer  # noqa: E402
from smq.server.tallies import NO_CALL_STATS, CallStats, CommitStats  # noqa: E402


def best_us(function, number: int, repeat: int) -> float:
    """Microseconds per call of function(), the best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


class Handlers:
    """A servicer's shape as status.py's wrapper sees it: `calls`, `admit`, one method."""

    def __init__(self, calls: Any) -> None:
        self.calls = calls

    def admit(self, name: str, message: Any, context: Any) -> None:
        pass

    @status.rpc
    def Produce(self, message: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        return message


class Context:
    """The little of grpc.ServicerContext the wrapper asks of a call that succeeds."""

    def is_active(self) -> bool:
        return True


def per_call(number: int, repeat: int) -> dict[str, float]:
    on, off, request, context = Handlers(CallStats()), Handlers(NO_CALL_STATS), object(), Context()
    return {"on_us": best_us(lambda: on.Produce(request, context), number, repeat),
            "off_us": best_us(lambda: off.Produce(request, context), number, repeat)}


def per_commit(number: int, repeat: int) -> float:
    options = types.SimpleNamespace(durability="full")
    stand_in = types.SimpleNamespace(
        topics={"t": types.SimpleNamespace(next_offset=105)}, _first_written={"t": 101},
        _retained_out={}, stats=CommitStats(), deleted=[],
        storage=types.SimpleNamespace(options=options, commit_seconds=0.0003, commit_wrote=True))
    # _count_committed, not _count_commit: that one would log a stand-in's error and go on.
    return best_us(lambda: writer.GroupCommitWriter._count_committed(stand_in, time.monotonic()),
                   number, repeat)


def start_server(workdir: Path, metrics: bool) -> tuple[bench.ServerProcess, bench.Scraper | None]:
    command = bench.smq_command("full") + bench.metrics_flags(metrics)
    server = bench.ServerProcess("smq", command, Path(tempfile.mkdtemp(dir=workdir)))
    server.start()
    match = bench.METRICS_AT.search(server.log())
    if bool(match) != metrics:
        server.stop()
        raise RuntimeError(f"metrics are {'off' if metrics else 'on'}:\n{server.log()}")
    return server, bench.Scraper(match.group(1), int(match.group(2)), 1.0) if match else None


def per_scrape(workdir: Path, scrapes: int) -> dict[str, float]:
    server, scraper = start_server(workdir, metrics=True)
    assert scraper is not None
    try:
        for topic in ("mu", "mb"):
            server.stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=30)
        for _ in range(100):
            server.stub.Produce(smq_pb2.ProduceRequest(topic="mu", message=b"x" * 100), timeout=30)
        server.stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic="mb", messages=[b"x" * 100] * 100),
                                 timeout=30)
        size = len(scraper.scrape())
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        for _ in range(scrapes):
            scraper.scrape()
        elapsed, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    finally:
        server.stop()
    return {"cpu_ms": cpu / scrapes * 1000, "wall_ms": elapsed / scrapes * 1000, "bytes": size}


def switches(pid: int) -> int:
    """Context switches of every thread of a process so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines()
                     if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return total


def idle(workdir: Path, metrics: bool, seconds: float) -> dict[str, float]:
    server, _ = start_server(workdir, metrics)
    try:
        time.sleep(1.0)  # past the start-up
        cpu0, switches0 = server.cpu_seconds(), switches(server.proc.pid)
        time.sleep(seconds)
        cpu, n = server.cpu_seconds() - cpu0, switches(server.proc.pid) - switches0
    finally:
        server.stop()
    return {"cpu_ms_per_s": cpu / seconds * 1000, "switches_per_s": n / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: proves it works")
    parser.add_argument("--runs", type=int, help="runs of each server figure (default 3)")
    args = parser.parse_args(argv)
    number, repeat = (2_000, 3) if args.quick else (100_000, 15)
    runs = args.runs or (1 if args.quick else 3)
    scrapes, idle_seconds = (5, 1.0) if args.quick else (200, 10.0)

    call = per_call(number, repeat)
    commit = per_commit(number, repeat)
    scrape_runs, idle_runs = [], {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="smq-metrics-costs-") as tmp:
        for _ in range(runs):
            scrape_runs.append(per_scrape(Path(tmp), scrapes))
            for metrics in (False, True):
                idle_runs[metrics].append(idle(Path(tmp), metrics, idle_seconds))

    def median(runs_: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs_)

    rows = [
        ("per call, CallStats (metrics on)", f"{call['on_us']:.2f} us"),
        ("per call, NoCallStats (metrics off)", f"{call['off_us']:.2f} us"),
        ("per call, added by metrics", f"{call['on_us'] - call['off_us']:.2f} us"),
        ("per commit, _count_commit (on or off)", f"{commit:.2f} us"),
        ("per scrape, server CPU", f"{median(scrape_runs, 'cpu_ms'):.2f} ms"),
        ("per scrape, wall (from this process)", f"{median(scrape_runs, 'wall_ms'):.2f} ms"),
        ("per scrape, size", f"{median(scrape_runs, 'bytes'):,.0f} bytes"),
        ("idle server CPU, metrics off / on",
         f"{median(idle_runs[False], 'cpu_ms_per_s'):.1f} / "
         f"{median(idle_runs[True], 'cpu_ms_per_s'):.1f} ms/s"),
        ("idle server context switches, off / on",
         f"{median(idle_runs[False], 'switches_per_s'):.0f} / "
         f"{median(idle_runs[True], 'switches_per_s'):.0f} per s"),
    ]
    print(f"what metrics cost: code best of {repeat}x{number:,} calls; servers (durability "
          f"full) medians of {runs} run(s)")
    bench.print_columns([("figure", "value"), *rows], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
