#!/usr/bin/env python3
"""The screenshots of docs/metrics.md: SMQ's metrics in Prometheus' own graph page.

    .venv/bin/python scripts/metrics_screenshots.py [--seconds 120] [--out docs/images]

Starts a server (`python -m smq --metrics-port 0` on a new database in a temporary
directory), Debian's prometheus scraping it every 2 s (tests/support/prometheus.py), and
load for --seconds: a producer of "sensors" at a rate going round a sine (20-60
messages/s over a minute, one Produce each), a producer of "events" in bursts
(ProduceBatch of 10: 100 messages/s for 10 s of every 30, else 10), and a durable
subscriber of "sensors" (consumer "archiver") that takes 25 ms a message, so that its
lag grows while the rate is above 40 and shrinks below. Then, the load still running,
headless Chromium renders Prometheus' classic graph page for each figure into --out
(metrics-*.png), and pngquant and optipng, where installed, make the files smaller.

Needs prometheus and chromium (apt-get install -y --no-install-recommends prometheus
chromium; pngquant optipng optional). Everything it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers: servers and prometheus

from smq.client import Client  # noqa: E402
from smq.errors import SMQError  # noqa: E402
from support.prometheus import Prometheus, metrics_address  # noqa: E402
from support.servers import ServerProcess  # noqa: E402

# name: (expr, what the page shows)
FIGURES = {
    "metrics-produced-rate": "rate(smq_topic_produced_messages_total[30s])",
    "metrics-fsync-p99": "histogram_quantile(0.99, rate(smq_fsync_duration_seconds_bucket[30s]))",
    "metrics-consumer-lag": "smq_consumer_lag_messages",
}


def paced(stop: threading.Event, rate: Callable[[float], float], send: Callable[[], None]) -> None:
    """Call send() at rate(t) calls per second (t: seconds since the start) until stop."""
    start = time.monotonic()
    due = start
    while not stop.is_set():
        send()
        due += 1 / rate(time.monotonic() - start)
        pause = due - time.monotonic()
        if pause > 0:
            stop.wait(pause)


def load(port: int, stop: threading.Event) -> list[threading.Thread]:
    """The producers and the subscriber (module docstring), as started threads."""
    def sensors() -> None:
        with Client("127.0.0.1", port) as client:
            paced(stop, lambda t: 40 + 20 * math.sin(2 * math.pi * t / 60),
                  lambda: client.produce("sensors", b'{"t": 21.5}'))

    def events() -> None:
        with Client("127.0.0.1", port) as client:
            paced(stop, lambda t: (100 if t % 30 < 10 else 10) / 10,
                  lambda: client.produce_batch("events", [b"door opened"] * 10))

    def archiver() -> None:
        with Client("127.0.0.1", port) as client:
            try:
                for _message in client.subscribe("sensors", consumer="archiver", page_size=50,
                                                  reconnect=False):
                    if stop.is_set():
                        return
                    time.sleep(0.025)
            except SMQError:
                if not stop.is_set():
                    raise

    with Client("127.0.0.1", port) as client:
        client.create_topic("sensors")
        client.create_topic("events")
    threads = [threading.Thread(target=f, daemon=True) for f in (sensors, events, archiver)]
    for thread in threads:
        thread.start()
    return threads


def screenshot(chromium: str, url: str, path: Path) -> None:
    subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox",
                    "--hide-scrollbars", f"--screenshot={path}", "--window-size=1400,900",
                    "--virtual-time-budget=10000", url],
                   check=True, capture_output=True, timeout=120)
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--output", str(path),
                        "--quality=60-90", str(path)], check=False)
    if shutil.which("optipng"):
        subprocess.run(["optipng", "-quiet", "-o2", str(path)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="how long the load runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smq-screenshots-") as tmp:
        server = ServerProcess(["--dbpath", f"{tmp}/smq.db", "--port", "0", "--bind", "127.0.0.1",
                                "--metrics-port", "0"], Path(tmp)).wait_serving()
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            with Prometheus({"smq": [metrics_address(server.log())]}, "2s") as prometheus:
                threads = load(server.port, stop)
                print(f"load for {args.seconds:g} s; Prometheus at {prometheus.url}", flush=True)
                time.sleep(args.seconds)
                range_input = f"{max(1, math.ceil(args.seconds / 60))}m"
                for name, expr in FIGURES.items():
                    query = urllib.parse.urlencode({"g0.expr": expr, "g0.tab": "0",
                                                    "g0.range_input": range_input})
                    path = args.out / f"{name}.png"
                    screenshot(chromium, f"{prometheus.url}/classic/graph?{query}", path)
                    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                          f"{path.stat().st_size // 1024} KB", flush=True)
        finally:
            stop.set()
            server.terminate()
            server.close()
            for thread in threads:
                thread.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
