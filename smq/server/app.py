"""The server as a program: the gRPC server factory and the embeddable Server.

    from smq.server import Server, ServerConfig

    with Server(ServerConfig(dbpath="/data/q.db", port=0)) as server:   # port 0: any free port
        print("listening on", server.port)
        ...                                                               # stop() on exit

`create_server` binds the ports (TCP with or without mTLS, the Unix socket) before the
database is touched; `Server` opens the database, starts the writer, the memory budget
and the liveness check, serves, and drains on `stop()`. Called from the main thread
(embedders: the thread that owns the Server).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import stat
import threading
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from .. import exposure, tls
from .._proto import smq_pb2
from ..domain import TopicPolicy, plural, tcp_address
from ..errors import CertificateError, ConfigError, StartupError
from . import malloc
from .access import Gate, load_gate
from .budget import MemoryBudget, minimum_limit
from .config import SETTINGS_BY_FIELD, ServerConfig, group_id
from .handlers import lenient_handler
from .liveness import LivenessMonitor
from .pool import FairPool
from .reflecting import Reflection
from .service import PAGE_BYTES, Limits, QueueService
from .servicer import MAX_BATCH_BYTES, SERVICE_NAME, Servicer
from .storage import Storage, StorageOptions

if TYPE_CHECKING:  # imported when metrics are asked for: prometheus_client takes ~0.1 s
    from ..metrics_http import MetricsListener
    from .metrics import ServerMetrics

log = logging.getLogger(__name__)

ENVELOPE_BYTES = 64 * 1024  # room for the topic name and framing around a payload
QUEUED_CALLS_PER_WORKER = 4  # calls that may wait for a thread before RESOURCE_EXHAUSTED


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """mTLS credentials, or None for plaintext. Refuses missing, unreadable or invalid files."""
    if not config.server_enable_mtls:
        return None
    try:
        files = tls.load(
            ("--server-cert", config.server_cert),
            ("--server-key", config.server_key),
            ("--server-ca-cert", config.server_ca_cert),
            server_side=True,
        )
    except CertificateError as exc:
        raise StartupError(f"mTLS is enabled but {exc}") from None
    return grpc.ssl_server_credentials(
        [(files.key, files.cert)], root_certificates=files.ca, require_client_auth=True
    )


def exposure_warnings(
    config: ServerConfig, port: int, metrics_port: int | None = None
) -> list[str]:
    """What this server leaves open, one line each (smq.exposure): its private key or
    its .env file holding a secret readable by every user of the device, TCP writes
    open to anyone who can reach `port` and metrics served on `metrics_port` beyond
    loopback (those two unless --quiet-open-network)."""
    key = [(SETTINGS_BY_FIELD["server_key"].label, config.server_key)]
    lines = exposure.readable_secrets(key if config.server_enable_mtls else [], config.env_file)
    open_to_writes = config.allow_remote_writes and not config.server_enable_mtls
    if open_to_writes and not config.quiet_open_network and not exposure.is_loopback(config.bind):
        lines.append(
            f"serving plaintext TCP on {tcp_address(config.bind, port)} with remote writes "
            f"allowed: anyone who can reach port {port} may write and delete (to close it: "
            "--bind 127.0.0.1, --server-enable-mtls or --allow-remote-writes=false; to "
            "silence this warning: --quiet-open-network)"
        )
    metrics_bind = config.metrics_bind or config.bind
    metrics_open = metrics_port is not None and not exposure.is_loopback(metrics_bind)
    if metrics_port is not None and metrics_open and not config.quiet_open_network:
        lines.append(
            f"serving metrics on {tcp_address(metrics_bind, metrics_port)} over "
            "plain HTTP to anyone who can reach it, whatever mTLS and the ACL allow: "
            "topic and consumer names, rates (to keep them on this device: "
            "--metrics-bind 127.0.0.1; to silence this warning: --quiet-open-network)"
        )
    return lines


def send_limit(config: ServerConfig) -> int:
    """The largest answer the server may send (gRPC's max_send_message_length), in bytes."""
    return max(config.max_message_size, PAGE_BYTES) + ENVELOPE_BYTES


def create_server(
    config: ServerConfig, credentials: grpc.ServerCredentials | None
) -> tuple[grpc.Server, int]:
    """A grpc.Server bound to TCP with `credentials` (None: plaintext) and to the Unix
    socket, with no services yet and not started. Returns it and the TCP port (useful
    with port 0). Binding first means a busy port is refused before the database is touched."""
    threads = config.workers + config.max_streams
    server = grpc.server(
        # grpc only submits to its executor; the stubs ask for a ThreadPoolExecutor.
        FairPool(threads, receive_slots=config.workers),  # type: ignore[arg-type]
        maximum_concurrent_rpcs=threads + QUEUED_CALLS_PER_WORKER * config.workers,
        options=[
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            (
                "grpc.max_receive_message_length",
                max(config.max_message_size, MAX_BATCH_BYTES) + ENVELOPE_BYTES,
            ),
            ("grpc.max_send_message_length", send_limit(config)),
            # One connection may not hold every thread: a client that opens calls and
            # never sends their requests would otherwise lock everyone else out.
            ("grpc.max_concurrent_streams", config.max_streams + max(config.workers // 2, 1)),
            ("grpc.keepalive_time_ms", 60_000),  # notice dead stream clients (power cuts)
            ("grpc.keepalive_timeout_ms", 20_000),
            # No flow-control windows grown by BDP probing: a stream may then have only
            # 64 KiB unread beyond the message its handler asked for (with it, 60
            # StreamProduce streams of 1 MiB messages took 250 MiB before a handler saw them).
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    address = tcp_address(config.bind, config.port)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {address}: {exc} (is another server using it?)"
        ) from None
    if port == 0:
        raise StartupError(f"cannot listen on {address} (is another server using it?)")
    if config.unix_socket:
        _bind_unix_socket(server, config.unix_socket, config.unix_socket_group)
    return server, port


def _bind_unix_socket(server: grpc.Server, path: str, group: str) -> None:
    """Listen on the Unix socket, mode 0600 (0660 for `group`) whatever the umask: its
    callers may always write. It is created under a umask that leaves only the owner
    (gRPC binds it here, not at start), so it is never wider, not even for a moment."""
    _remove_stale_socket(path)
    umask = os.umask(0o177)  # process-wide: no other thread creates files this early
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    except RuntimeError as exc:
        bound, reason = 0, str(exc)
    else:
        reason = "bind failed"
    finally:
        os.umask(umask)
    if not bound:
        raise StartupError(f"cannot listen on Unix socket {path!r}: {reason}")
    try:
        if group:
            os.chown(path, -1, group_id(group))
        os.chmod(path, 0o660 if group else 0o600)
    except OSError as exc:
        to_group = f" to group {group!r} (the server's user must belong to it)" if group else ""
        raise StartupError(
            f"cannot give the Unix socket {path!r}{to_group}: {exc.strerror}"
        ) from None


def add_services(
    server: grpc.Server,
    config: ServerConfig,
    service: QueueService,
    health_servicer: health.HealthServicer,
    budget: MemoryBudget,
    gate: Gate | None = None,
    metrics: ServerMetrics | None = None,
) -> None:
    """SMQ, health and reflection on one server; SMQ's calls charge `budget`, pass
    `gate` (the access rules; None: every call is admitted) and are counted in
    `metrics` (if any)."""
    counts = {} if metrics is None else {"calls": metrics.calls, "delivered": metrics.delivered}
    servicer = Servicer(
        service,
        config.heartbeat_interval,
        config.durability,
        send_limit(config),
        budget,
        gate,
        **counts,  # type: ignore[arg-type]
    )
    server.add_generic_rpc_handlers((lenient_handler(servicer, budget=budget),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflecting = Reflection(
        (smq_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR),
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        service,
        **({} if metrics is None else {"calls": metrics.calls}),
    )
    # As reflection_pb2_grpc registers it, but requests are read by Reflection.request,
    # which refuses a large one before it is parsed.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                reflection.SERVICE_NAME,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        reflecting.ServerReflectionInfo,
                        request_deserializer=Reflection.request,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file that no server listens on any more (one killed left it).
    StartupError if one does: a second server must not take a running one's socket."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # refused: nobody listens
        return
    finally:
        probe.close()
    raise StartupError(f"the Unix socket {path!r} is in use by a running server")


def _socket_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_memory_budget(config: ServerConfig) -> None:
    """The budget must hold the largest request the server accepts; ConfigError if not."""
    largest = max(config.max_message_size, MAX_BATCH_BYTES) + ENVELOPE_BYTES
    if config.memory_budget < minimum_limit(largest):
        raise ConfigError(
            "--memory-budget (SMQ_MEMORY_BUDGET)",
            str(config.memory_budget),
            f"too small for requests of {largest} bytes (--max-message-size "
            f"{config.max_message_size}): at least {minimum_limit(largest)}",
        )


class Server:
    """An SMQ server: database, writer, gRPC ports. `start()`, then `stop()` (or `with`)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        check_memory_budget(config)
        self.gate = load_gate(config)  # a bad ACL file refuses the start, before anything else
        malloc.tune()  # before the threads (gRPC's, the writer) first allocate
        self.budget = MemoryBudget(
            config.memory_budget, stall_seconds=config.stall_timeout, on_tick=malloc.Trimmer().tick
        )
        # Refuse bad certificate files and a busy port before the database is touched.
        self._grpc, self.port = create_server(config, server_credentials(config))
        self._socket = _socket_identity(config.unix_socket) if config.unix_socket else None
        self.metrics, self._metrics_port = self._metrics_listener(config)
        self.health = health.HealthServicer()
        self._serving: bool | None = None
        service: QueueService | None = None
        try:
            storage = Storage(
                config.dbpath,
                StorageOptions(
                    durability=config.durability,
                    readers=min(config.workers, 8),
                    startup_check=config.startup_check,
                    on_corrupt=config.on_corrupt,
                    max_db_size=config.max_db_size,
                    min_free_space=config.min_free_space,
                ),
            )
            service = QueueService(
                storage,
                Limits(
                    max_message_size=config.max_message_size,
                    max_streams=config.max_streams,
                    allow_remote_writes=config.allow_remote_writes,
                    max_consumers_per_topic=config.max_consumers_per_topic,
                    topic_defaults=TopicPolicy(
                        config.retention_max_messages,
                        config.retention_max_bytes,
                        math.ceil(config.retention_max_age),
                        config.on_full,
                        keep_uncommitted=False,
                    ),
                ),
            )
            self.service = service
            self.liveness = LivenessMonitor(service.liveness_problem, config.health_check_interval)
            self.liveness.add_listener(self._set_health)
            if self.metrics is not None:
                self.metrics.attach(service, self.budget, self.health_problem)
            add_services(
                self._grpc, config, service, self.health, self.budget, self.gate, self.metrics
            )
        except BaseException:
            if service is not None:
                service.close()  # stops the writer thread too, then closes the database
            elif "storage" in locals():
                storage.close()
            self._grpc.stop(None)
            if self._metrics_port is not None:
                self._metrics_port.stop()
            self._remove_own_socket()
            raise
        self._stopped = threading.Event()

    def _metrics_listener(
        self, config: ServerConfig
    ) -> tuple[ServerMetrics | None, MetricsListener | None]:
        """The metrics and their port (bound now: a taken one refuses the start), if asked
        for; it serves once the server starts."""
        if config.metrics_port is None:
            return None, None
        from ..metrics_http import MetricsListener
        from .metrics import ServerMetrics

        metrics = ServerMetrics(config.metrics_max_topics)
        listener = MetricsListener(
            config.metrics_bind or config.bind,
            config.metrics_port,
            metrics.registry,
            self.health_problem,
        )
        return metrics, listener

    @property
    def metrics_port(self) -> int | None:
        """The metrics port (useful with --metrics-port 0), or None without metrics."""
        return None if self._metrics_port is None else self._metrics_port.port

    def health_problem(self) -> str | None:
        """What /healthz reports: None while the liveness check passes, else why not."""
        if self._stopped.is_set():
            return "shutting down"
        return self.liveness.problem

    def _remove_own_socket(self) -> None:
        path = self.config.unix_socket
        if path and _socket_identity(path) == self._socket:
            os.unlink(path)  # ours still: not one another server put there meanwhile

    def start(self) -> Server:
        self._grpc.start()
        if self._metrics_port is not None:
            self._metrics_port.start()
        self.budget.start()
        self._set_health(True)
        self.liveness.start()
        # The warnings come first: "serving on" is the last line of a start (tests and
        # scripts wait for it).
        ignored = self.config.ignored_tls_settings()
        if ignored:
            log.warning(
                "%s given but --server-enable-mtls (SERVER_ENABLE_MTLS) is off: serving "
                "plaintext, the certificate files are not used",
                ", ".join(ignored),
            )
        for line in exposure_warnings(self.config, self.port, self.metrics_port):
            log.warning("%s", line)
        log.info(
            "serving on %s (%s, database %s, durability %s)",
            self.addresses(),
            "mTLS" if self.config.server_enable_mtls else "plaintext",
            self.config.dbpath,
            self.config.durability,
        )
        return self

    def _set_health(self, serving: bool) -> None:
        """What the health service answers for SMQ (and for ""): it follows the liveness
        check. Draining overrides it (HealthServicer ignores this from then on)."""
        if serving != self._serving:  # each set() is sent to every Watch: only changes
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)

    def reload_access(self) -> None:
        """Read the ACL file again (SIGHUP): a valid one replaces the rules at once, an
        invalid one leaves them as they were; either way one line in the log."""
        self.gate.reload()

    def addresses(self) -> str:
        where = tcp_address(self.config.bind, self.port)
        if self.config.unix_socket:
            where += f" and unix:{self.config.unix_socket}"
        if self._metrics_port is not None:
            where += f", metrics on http://{self._metrics_port.address}/metrics"
        return where

    def status_line(self) -> str:
        """One line for `systemctl status`: where it listens and what it stores."""
        topics = self.service.topics()
        stored = sum(t.message_count for t in topics)
        return (
            f"serving on {self.addresses()}; {plural(len(topics), 'topic')}, "
            f"{plural(stored, 'message')} stored"
        )

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, end streams with UNAVAILABLE, give in-flight calls
        `grace` seconds, then finish queued writes, checkpoint and close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown_grace if grace is None else grace
        self.liveness.stop()
        self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        self._grpc.stop(grace).wait()
        if self._metrics_port is not None:  # before the database closes: no scrape reads it
            self._metrics_port.stop()
        self.budget.stop()
        self.service.close()
        self._remove_own_socket()
        log.info("stopped")

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
