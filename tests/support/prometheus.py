"""A real Prometheus for the metrics tests (and scripts/metrics_screenshots.py), and
helpers to read a server's metrics port.

Prometheus runs as Debian's binary (`apt-get install -y prometheus`) with a config, its
TSDB and its log in a temporary directory of its own, listening on a free loopback port;
`close()` stops it and removes that directory, whatever happened. Tests that need it
call `require_prometheus()`: it skips them when the binary is missing, or fails them
when SMQ_REQUIRE_PROMETHEUS=1 (as .ci/run sets).

    with Prometheus({"smq": [metrics_address(server)]}) as prometheus:
        prometheus.wait_scraped("smq", after=time.time())
        prometheus.query('smq_topic_produced_messages_total{topic="a"}')
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from support.poll import eventually

INSTALL_HINT = "prometheus is not installed (CI: apt-get install -y prometheus)"
METRICS_AT = re.compile(r"metrics on http://(\S+)/metrics")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")  # Debian's package: /usr/bin/prometheus


def require_prometheus() -> None:
    """Skip the test when prometheus is missing; fail it when SMQ_REQUIRE_PROMETHEUS=1
    (CI: the metrics scrape test must not go unnoticed, as SMQ_REQUIRE_NATS does)."""
    import pytest
    if prometheus_binary() is None:
        if os.environ.get("SMQ_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{INSTALL_HINT}, and SMQ_REQUIRE_PROMETHEUS=1 requires it")
        pytest.skip(INSTALL_HINT)


def metrics_address(server_log: str) -> str:
    """host:port of the metrics port, from the server's "serving on ..." log line."""
    match = METRICS_AT.search(server_log)
    assert match, f"no 'metrics on http://...' in the server's log:\n{server_log}"
    return match.group(1)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A prometheus process scraping `targets` ({job: [host:port, ...]}) every
    `scrape_interval`, and evaluating the rules file `rules` (YAML) as often; a context
    manager (or call `close()`)."""

    def __init__(self, targets: dict[str, list[str]], scrape_interval: str = "1s",
                 rules: str | None = None) -> None:
        binary = prometheus_binary()
        assert binary, INSTALL_HINT
        self.dir = Path(tempfile.mkdtemp(prefix="smq-prometheus-"))
        self.proc: subprocess.Popen | None = None
        try:
            self.config = self.dir / "prometheus.yml"
            config = _config(targets, scrape_interval)
            if rules is not None:
                (self.dir / "rules.yml").write_text(rules)
                config += "rule_files:\n  - rules.yml\n"
            self.config.write_text(config)
            self._log_path = self.dir / "prometheus.log"
            self.port = self._start(binary)
        except BaseException:
            self.close()
            raise

    def _start(self, binary: str) -> int:
        """Start it on a free port (another one if that was taken meanwhile)."""
        for _ in range(3):
            port = free_port()
            with open(self._log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={self.config}",
                     f"--storage.tsdb.path={self.dir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}"],
                    cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                return port
        raise AssertionError(f"prometheus did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        """True once /-/ready answers 200; False if the process ended (a taken port)."""
        def ready() -> bool | str:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return "exited"
            try:
                return http_get(f"{self.url}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        state = eventually(ready, timeout=timeout, interval=0.1,
                           message=lambda: f"prometheus was not ready:\n{self.log()}")
        return state is True

    def log(self) -> str:
        try:
            return self._log_path.read_text()[-5000:]
        except OSError:
            return "(no log)"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query: [{"metric": {...}, "value": [time, "text"]}].
        A query Prometheus refuses (bad PromQL) raises AssertionError with its error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", \
            f"query {expr!r}: {status} {reply.get('errorType')}: {reply.get('error')}"
        result = reply["data"]["result"]
        return result if isinstance(result, list) else [{"metric": {}, "value": result}]

    def value(self, expr: str) -> float:
        """The value of a query that must return exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, f"query {expr!r}: {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_scraped(self, job: str, after: float, timeout: float = 15.0) -> None:
        """Wait until every target of `job` was scraped successfully by a scrape that
        began at or after `after` (time.time()): what it returned was collected later."""
        def scraped() -> bool:
            # timestamp() of a plain selector is the scrape's start (of an expression it
            # would be the evaluation time); up, read after it, is from that scrape or later.
            times = self.query(f'timestamp(up{{job="{job}"}})')
            if not times or any(float(r["value"][1]) < after for r in times):
                return False
            return all(float(r["value"][1]) == 1 for r in self.query(f'up{{job="{job}"}}'))

        eventually(scraped, timeout=timeout, interval=0.2,
                   message=lambda: f"no good scrape of {job} after {after}: {self.targets()}")

    def targets(self) -> list[dict[str, Any]]:
        """The active targets with their health and last error (for failure messages)."""
        status, body = http_get(f"{self.url}/api/v1/targets")
        if status != 200:
            return [{"error": body}]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
                for t in json.loads(body)["data"]["activeTargets"]]

    def rules(self) -> list[dict[str, Any]]:
        """Every rule of every group as /api/v1/rules reports it (health, lastError,
        state, lastEvaluation, ...)."""
        status, body = http_get(f"{self.url}/api/v1/rules")
        assert status == 200, body
        return [rule for group in json.loads(body)["data"]["groups"] for rule in group["rules"]]

    def close(self) -> None:
        """Stop prometheus (SIGTERM, then SIGKILL) and remove its directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _config(targets: dict[str, list[str]], scrape_interval: str) -> str:
    jobs = "".join(f"  - job_name: {job}\n    static_configs:\n"
                   f"      - targets: {json.dumps(addresses)}\n"
                   for job, addresses in targets.items())
    return (f"global:\n  scrape_interval: {scrape_interval}\n  scrape_timeout: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\nscrape_configs:\n{jobs}")
