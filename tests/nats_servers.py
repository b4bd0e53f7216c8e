"""Real `nats-server` processes for the forwarder's tests: one server or a 3-node
JetStream cluster, on loopback ports, each with its own store in the test's temp dir.

Debian's package installs the binary as /usr/sbin/nats-server (`apt-get install -y
nats-server`); tests that need it skip with that hint when it is missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "nats-server is not installed (CI: apt-get install -y nats-server)"


def nats_server_binary() -> str | None:
    """The nats-server on PATH; Debian puts it in /usr/sbin, not on every user's PATH."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together so that none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsServer:
    """One nats-server with JetStream. `start()` (again after `stop()`/`kill()`) keeps
    its ports and its store, like a machine that reboots."""

    def __init__(self, workdir: Path, name: str, client_port: int, *,
                 cluster_port: int | None = None, routes: list[int] | None = None,
                 cluster_name: str = "smqtest", extra_config: str = "") -> None:
        self.name = name
        self.port = client_port
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "nats.conf"
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{client_port}",
            f"jetstream {{ store_dir: '{self.dir / 'store'}', max_memory_store: 64MB, "
            "max_file_store: 1GB }",
        ]
        if cluster_port is not None:
            route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes or [])
            lines.append(f"cluster {{ name: {cluster_name}, listen: 127.0.0.1:{cluster_port}, "
                         f"routes: [{route_urls}] }}")
        lines.append(extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "NatsServer":
        binary = nats_server_binary()
        assert binary, INSTALL_HINT
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([binary, "-c", str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server {self.name} exited {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nats-server {self.name} did not listen in {timeout}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a clean shutdown); SIGKILL if it does not end in time."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


class NatsCluster:
    """Three clustered nats-servers (JetStream meta group of three)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        client_ports, cluster_ports = ports[:size], ports[size:]
        self.servers = [
            NatsServer(workdir, f"n{i + 1}", client_ports[i], cluster_port=cluster_ports[i],
                       routes=[p for j, p in enumerate(cluster_ports) if j != i])
            for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> "NatsCluster":
        for server in self.servers:
            server.start(wait=False)
        for server in self.servers:
            server.wait_listening()
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate()` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def environ_without_nats() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
