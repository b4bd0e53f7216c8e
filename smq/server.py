"""The gRPC face of SMQ: a thin servicer, the server factory, and an embeddable Server.

    from smq.config import Config
    from smq.server import Server

    with Server(Config(dbpath="/data/q.db", port=0)) as server:   # port 0: any free port
        print("listening on", server.port)
        ...                                                        # stop() on exit

Each servicer method unpacks the request, calls QueueService and packs the reply;
SMQ errors become gRPC statuses in one place (`STATUS_OF`/`_abort`).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from . import __version__, encoding, malloc
from ._proto import smq_pb2, smq_pb2_grpc
from .budget import REPLY_COPIES, CallMemory, MemoryBudget, Writes, held_page_cost, minimum_limit
from .client_transport import tcp_address
from .config import Config, group_id
from .errors import ConfigError, ResourceExhausted, SMQError, StartupError
from .handlers import Encoded, charge, decoded, lenient_handler, release
from .liveness import LivenessMonitor
from .list_pages import Listing, PageRequest, page_of
from .pool import FairPool
from .service import (PAGE_BYTES, STREAM_PAGE_BYTES, STREAM_PAGE_MESSAGES, ConsumerState, Follower,
                      Limits, QueueService, page_messages)
from .storage import Storage, StorageOptions, TopicPolicy, TopicState

log = logging.getLogger(__name__)

SERVICE_NAME = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"].full_name
HEARTBEAT = smq_pb2.ConsumeResponse(message=b"", offset=-1).SerializeToString()
ENVELOPE_BYTES = 64 * 1024  # room for the topic name and framing around a payload
MAX_BATCH_BYTES = 4 * 1024**2  # a ProduceBatch request may carry this much even with small messages
MAX_BATCH_MESSAGES = 10_000  # and at most this many messages (a million empty ones is a weapon)
QUEUED_CALLS_PER_WORKER = 4  # calls that may wait for a thread before RESOURCE_EXHAUSTED
STATUS_OF = {code.name: code for code in grpc.StatusCode}  # an SMQError's `code` -> status


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Answer the call with the status for exc (never a traceback to the client)."""
    if isinstance(exc, SMQError):
        if exc.code == "INTERNAL":
            log.error("%s", exc)
        context.abort(STATUS_OF[exc.code], str(exc))
    if not context.is_active():
        # The client went away, or shutdown cancelled the call: nobody to answer. End the
        # call all the same, or grpc tries to send the handler's None as the reply and
        # logs a traceback.
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, "internal server error (see the server log)")


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map SMQ errors raised by a unary or client-streaming handler to statuses."""
    @functools.wraps(method)
    def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, decoded(request), context)
        except Exception as exc:
            _abort(context, exc)
        finally:
            release(request)  # the handler is done with it
    return handler


def streaming_rpc(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """The same for server-streaming handlers (generators)."""
    @functools.wraps(method)
    def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            message = decoded(request)
            release(request)  # a small request: not held for the whole stream
            yield from method(self, message, context)
        except Exception as exc:
            _abort(context, exc)
    return handler


def is_local(context: grpc.ServicerContext) -> bool:
    """True for callers on the Unix socket."""
    return context.peer().startswith("unix:")


class Servicer(smq_pb2_grpc.SuhaibMessageQueueServicer):
    """SuhaibMessageQueue over QueueService."""

    def __init__(self, service: QueueService, heartbeat_interval: float, durability: str,
                 send_limit: int, budget: MemoryBudget) -> None:
        self.service = service
        self.budget = budget
        self.heartbeat_interval = heartbeat_interval
        self.durability = durability
        self.send_limit = send_limit  # list pages fit it (see list_pages)
        self.started = time.monotonic()

    @rpc
    def Connect(self, request, context):
        return smq_pb2.ConnectResponse()

    @rpc
    def CreateTopic(self, request, context):
        self.service.check_may_write(is_local(context))
        return smq_pb2.CreateTopicResponse(created=self.service.create_topic(request.topic))

    @rpc
    def GetEarliestOffset(self, request, context):
        return smq_pb2.GetEarliestOffsetResponse(offset=self.service.earliest_offset(request.topic))

    @rpc
    def GetLatestOffset(self, request, context):
        return smq_pb2.GetLatestOffsetResponse(offset=self.service.latest_offset(request.topic))

    @rpc
    def Produce(self, request, context):
        self.service.check_may_write(is_local(context))
        return smq_pb2.ProduceResponse(offset=self.service.produce(request.topic, request.message))

    @rpc
    def StreamProduce(self, request_iterator, context):
        self.service.check_may_write(is_local(context))
        with self.service.stream_slot(), Writes() as writes:
            last = self.service.produce_stream(_messages(request_iterator, writes),
                                               committed=writes.committed)
        return smq_pb2.ProduceResponse(offset=last)

    @rpc
    def Consume(self, request, context):
        payload = self.service.consume(request.topic, request.offset)
        return smq_pb2.ConsumeResponse(message=payload, offset=request.offset)

    @streaming_rpc
    def StreamConsume(self, request, context):
        with self._consumer_slot(context, request.topic), self._reply_memory(context) as memory:
            follower = self._follow(context, request.topic, request.offset, memory,
                                    STREAM_PAGE_MESSAGES, STREAM_PAGE_BYTES)
            while not follower.cancelled:
                yield from self._consume_replies(follower, memory)

    @staticmethod
    def _consume_replies(follower: Follower, memory: CallMemory) -> Iterator[Any]:
        """A heartbeat, or the next page's messages one by one: the page stays alive in
        this generator only, charged until its last message is taken."""
        page = follower.next_page()
        if page == []:
            yield HEARTBEAT
        if not page:
            return
        memory.hold(held_page_cost(page))
        for offset, payload in page:
            memory.sending()
            yield Encoded(encoding.consume_response(offset, payload))
            memory.sent()
        memory.taken()

    def _consumer_slot(self, context: grpc.ServicerContext, topic: str):
        """A stream place owned by this connection and topic (see QueueService.stream_slot).
        Unix-socket callers all share one peer name, so none of them is ever evicted.
        A stream for a missing topic fails here, before it could end another one."""
        self.service.describe(topic)
        peer = context.peer()
        owner = None if peer.startswith("unix:") else (peer, topic)
        return self.service.stream_slot(owner, context.cancel)

    def _reply_memory(self, context: grpc.ServicerContext) -> CallMemory:
        """The call's share of the memory budget, released when the call ends (whatever
        ends it), or when the `with` block of a stream's handler does."""
        peer = context.peer()
        memory = self.budget.open_call(None if peer.startswith("unix:") else peer, context.cancel)
        if not context.add_callback(memory.close):
            memory.close()  # the call already ended
        return memory

    def _follow(self, context: grpc.ServicerContext, topic: str, offset: int, memory: CallMemory,
                page_messages: int = 0, page_bytes: int = PAGE_BYTES) -> Follower:
        """A follower that the end of the call (cancel, deadline, disconnect) wakes and ends,
        reading pages as large as the memory budget lets this call build."""
        follower = self.service.follow(topic, offset, self.heartbeat_interval, page_messages,
                                       page_bytes, memory)
        if not context.add_callback(follower.cancel):
            follower.cancel()  # the call already ended: nothing would wake it later
        return follower

    @rpc
    def DeleteUntilOffset(self, request, context):
        self.service.check_may_write(is_local(context))
        self.service.trim(request.topic, request.offset)
        return smq_pb2.DeleteUntilOffsetResponse()

    @rpc
    def ProduceBatch(self, request, context):
        self.service.check_may_write(is_local(context))
        if len(request.messages) > MAX_BATCH_MESSAGES:  # before a Python object per message
            raise ResourceExhausted(f"a batch holds at most {MAX_BATCH_MESSAGES} messages, "
                                    f"not {len(request.messages)}: split it")
        first, last = self.service.produce_batch(request.topic, list(request.messages))
        return smq_pb2.ProduceBatchResponse(first_offset=first, last_offset=last)

    @streaming_rpc
    def Subscribe(self, request, context):
        with self._consumer_slot(context, request.topic), self._reply_memory(context) as memory:
            follower = self._follow(context, request.topic, request.offset, memory,
                                    request.max_messages)
            while True:
                reply = self._subscribe_reply(follower, memory)
                if reply is None:
                    return
                yield reply
                memory.taken()

    @staticmethod
    def _subscribe_reply(follower: Follower, memory: CallMemory) -> Encoded | None:
        """The next page as an encoded SubscribeResponse, charged until the client takes
        it; None once the stream is cancelled. The page itself dies here."""
        page = follower.next_page()
        if page is None:
            return None
        reply = encoding.subscribe_response(page, follower.cursor)
        memory.hold(REPLY_COPIES * len(reply))
        return Encoded(reply)

    @rpc
    def ListTopics(self, request, context):
        page = page_of(TOPICS, self.service.topics(), page_request(request), self.send_limit)
        return smq_pb2.ListTopicsResponse(topics=page.messages, next_page_token=page.next_token)

    @rpc
    def DescribeTopic(self, request, context):
        return smq_pb2.DescribeTopicResponse(topic=topic_info(self.service.describe(request.topic)))

    @rpc
    def DeleteTopic(self, request, context):
        self.service.check_may_write(is_local(context))
        self.service.delete_topic(request.topic)
        return smq_pb2.DeleteTopicResponse()

    @rpc
    def SetTopicPolicy(self, request, context):
        self.service.check_may_write(is_local(context))
        return policy_reply(*self.service.set_policy(request.topic, policy_from(request.policy)))

    @rpc
    def GetTopicPolicy(self, request, context):
        return policy_reply(*self.service.policy(request.topic))

    @rpc
    def CommitOffset(self, request, context):
        self.service.commit_offset(request.consumer, request.topic, request.offset)
        return smq_pb2.CommitOffsetResponse()

    @rpc
    def GetCommittedOffset(self, request, context):
        return smq_pb2.GetCommittedOffsetResponse(
            offset=self.service.committed_offset(request.consumer, request.topic))

    @rpc
    def ListConsumers(self, request, context):
        page = page_of(CONSUMERS, self.service.consumers(request.topic, request.consumer),
                       page_request(request), self.send_limit)
        return smq_pb2.ListConsumersResponse(consumers=page.messages,
                                             next_page_token=page.next_token)

    @rpc
    def DeleteConsumer(self, request, context):
        self.service.check_may_write(is_local(context))
        self.service.delete_consumer(request.consumer, request.topic)
        return smq_pb2.DeleteConsumerResponse()

    @rpc
    def GetServerInfo(self, request, context):
        writer = self.service.writer
        topics = self.service.topics()
        return smq_pb2.GetServerInfoResponse(
            version=__version__, durability=self.durability,
            max_message_size=self.service.limits.max_message_size,
            uptime_seconds=time.monotonic() - self.started, commits=writer.commits,
            committed_writes=writer.committed_ops, committed_messages=writer.committed_messages,
            topics=len(topics), stored_messages=sum(t.message_count for t in topics),
            stored_bytes=sum(t.stored_bytes for t in topics))

    @rpc
    def BulkRetrieve(self, request, context):
        memory = self._reply_memory(context)
        max_bytes, count = memory.take_page(PAGE_BYTES, page_messages(request.limit))
        reply = self._bulk_retrieve_reply(request, count, max_bytes)
        memory.hold(REPLY_COPIES * len(reply))  # until the call ends: the client took it
        return reply

    def _bulk_retrieve_reply(self, request: Any, count: int, max_bytes: int) -> bytes:
        """The page, encoded as a BulkRetrieveResponse; the page itself dies here."""
        page = self.service.read(request.topic, request.start_offset, count, max_bytes)
        return encoding.bulk_retrieve_response(page.messages, page.next_offset)


def _messages(requests: Iterator[Any], writes: Writes) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of each StreamProduce request; each one's budget charge goes to
    `writes`, to be released once it is committed."""
    for request in requests:
        message = decoded(request)
        taken = charge(request)
        if taken is not None:
            writes.add(taken)
        item = (message.topic, message.message)
        del request, message  # the parsed request, a second copy of the payload, goes now
        yield item


def topic_info(topic: TopicState) -> smq_pb2.TopicInfo:
    return smq_pb2.TopicInfo(
        name=topic.name, earliest_offset=topic.earliest or 0, latest_offset=topic.latest or 0,
        message_count=topic.message_count, stored_bytes=topic.stored_bytes,
        next_offset=topic.next_offset, created_at=topic.created_at)


def consumer_info(consumer: ConsumerState) -> smq_pb2.ConsumerInfo:
    return smq_pb2.ConsumerInfo(
        consumer=consumer.consumer, topic=consumer.topic,
        committed_offset=consumer.committed_offset, lag=consumer.lag,
        updated_at=consumer.updated_at)


TOPICS = Listing("topics", 1, lambda t: (t.name,), topic_info)
CONSUMERS = Listing("consumer offsets", 2, lambda c: (c.consumer, c.topic), consumer_info)


def page_request(request: smq_pb2.ListTopicsRequest | smq_pb2.ListConsumersRequest) -> PageRequest:
    return PageRequest(request.page_size, request.page_token)


POLICY_FIELDS = (("max_messages", "max_messages"), ("max_bytes", "max_bytes"),
                 ("max_age", "max_age_seconds"), ("on_full", "on_full"),
                 ("keep_uncommitted", "keep_uncommitted"))


def policy_from(message: smq_pb2.TopicPolicy) -> TopicPolicy:
    return TopicPolicy(**{ours: getattr(message, wire) if message.HasField(wire) else None
                          for ours, wire in POLICY_FIELDS})


def policy_message(policy: TopicPolicy) -> smq_pb2.TopicPolicy:
    return smq_pb2.TopicPolicy(**{wire: getattr(policy, ours) for ours, wire in POLICY_FIELDS
                                  if getattr(policy, ours) is not None})


def policy_reply(overrides: TopicPolicy, effective: TopicPolicy) -> smq_pb2.TopicPolicyResponse:
    return smq_pb2.TopicPolicyResponse(overrides=policy_message(overrides),
                                       effective=policy_message(effective))


class Reflection(reflection.ReflectionServicer):
    """gRPC reflection whose streams take a --max-streams place like SMQ's own: an idle
    one holds a thread, and the unary calls' threads must stay theirs."""

    def __init__(self, service_names: tuple[str, ...], service: QueueService) -> None:
        super().__init__(service_names)
        self.service = service

    @streaming_rpc
    def ServerReflectionInfo(self, request_iterator, context):
        with self.service.stream_slot():
            yield from super().ServerReflectionInfo(request_iterator, context)


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """mTLS credentials, or None for plaintext. Refuses missing, unreadable or invalid files."""
    if not config.server_enable_mtls:
        return None
    files = {}
    for field, label in (("server_cert", "--server-cert"), ("server_key", "--server-key"),
                         ("server_ca_cert", "--server-ca-cert")):
        path = getattr(config, field)
        try:
            with open(path, "rb") as stream:
                files[field] = stream.read()
        except OSError as exc:
            raise StartupError(f"mTLS is enabled but {label} {path!r} cannot be read: "
                               f"{exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.server_cert, config.server_key, password=lambda: "")
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"mTLS is enabled but --server-cert {config.server_cert!r} and "
                           f"--server-key {config.server_key!r} are not a valid matching "
                           f"PEM certificate and unencrypted key ({exc})") from None
    try:
        context.load_verify_locations(cafile=config.server_ca_cert)
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"mTLS is enabled but --server-ca-cert {config.server_ca_cert!r} "
                           f"is not a valid PEM CA certificate ({exc})") from None
    return grpc.ssl_server_credentials(
        [(files["server_key"], files["server_cert"])],
        root_certificates=files["server_ca_cert"], require_client_auth=True)


def send_limit(config: Config) -> int:
    """The largest answer the server may send (gRPC's max_send_message_length), in bytes."""
    return max(config.max_message_size, PAGE_BYTES) + ENVELOPE_BYTES


def create_server(config: Config, credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    """A grpc.Server bound to TCP with `credentials` (None: plaintext) and to the Unix
    socket, with no services yet and not started. Returns it and the TCP port (useful
    with port 0). Binding first means a busy port is refused before the database is touched."""
    threads = config.workers + config.max_streams
    server = grpc.server(
        FairPool(threads, receive_slots=config.workers),
        maximum_concurrent_rpcs=threads + QUEUED_CALLS_PER_WORKER * config.workers,
        options=[
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ("grpc.max_receive_message_length",
             max(config.max_message_size, MAX_BATCH_BYTES) + ENVELOPE_BYTES),
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
        ])
    address = tcp_address(config.bind, config.port)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc} (is another server using it?)") from None
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
        raise StartupError(f"cannot give the Unix socket {path!r}{to_group}: {exc.strerror}") from None


def add_services(server: grpc.Server, config: Config, service: QueueService,
                 health_servicer: health.HealthServicer, budget: MemoryBudget) -> None:
    """SMQ, health and reflection on one server; SMQ's calls charge `budget`."""
    servicer = Servicer(service, config.heartbeat_interval, config.durability,
                        send_limit(config), budget)
    server.add_generic_rpc_handlers((lenient_handler(servicer, budget=budget),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(Reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), service), server)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def check_memory_budget(config: Config) -> None:
    """The budget must hold the largest request the server accepts; ConfigError if not."""
    largest = max(config.max_message_size, MAX_BATCH_BYTES) + ENVELOPE_BYTES
    if config.memory_budget < minimum_limit(largest):
        raise ConfigError("--memory-budget (SMQ_MEMORY_BUDGET)", str(config.memory_budget),
                          f"too small for requests of {largest} bytes (--max-message-size "
                          f"{config.max_message_size}): at least {minimum_limit(largest)}")


class Server:
    """An SMQ server: database, writer, gRPC ports. `start()`, then `stop()` (or `with`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        check_memory_budget(config)
        malloc.tune()  # before the threads (gRPC's, the writer) first allocate
        self.budget = MemoryBudget(config.memory_budget, stall_seconds=config.stall_timeout,
                                   on_tick=malloc.Trimmer().tick)
        # Refuse bad certificate files and a busy port before the database is touched.
        self._grpc, self.port = create_server(config, server_credentials(config))
        self.health = health.HealthServicer()
        self._serving: bool | None = None
        service: QueueService | None = None
        try:
            storage = Storage(config.dbpath, StorageOptions(
                durability=config.durability, readers=min(config.workers, 8),
                startup_check=config.startup_check, on_corrupt=config.on_corrupt,
                max_db_size=config.max_db_size, min_free_space=config.min_free_space))
            service = QueueService(storage, Limits(
                max_message_size=config.max_message_size, max_streams=config.max_streams,
                allow_remote_writes=config.allow_remote_writes,
                max_consumers_per_topic=config.max_consumers_per_topic,
                topic_defaults=TopicPolicy(
                    config.retention_max_messages, config.retention_max_bytes,
                    math.ceil(config.retention_max_age), config.on_full, keep_uncommitted=False)))
            self.service = service
            self.liveness = LivenessMonitor(service.liveness_problem, config.health_check_interval)
            self.liveness.add_listener(self._set_health)
            add_services(self._grpc, config, service, self.health, self.budget)
        except BaseException:
            if service is not None:
                service.close()  # stops the writer thread too, then closes the database
            elif "storage" in locals():
                storage.close()
            self._grpc.stop(None)
            raise
        self._stopped = threading.Event()

    def start(self) -> "Server":
        self._grpc.start()
        self.budget.start()
        self._set_health(True)
        self.liveness.start()
        log.info("serving on %s (%s, database %s, durability %s)", self.addresses(),
                 "mTLS" if self.config.server_enable_mtls else "plaintext",
                 self.config.dbpath, self.config.durability)
        ignored = self.config.ignored_tls_settings()
        if ignored:
            log.warning("%s given but --server-enable-mtls (SERVER_ENABLE_MTLS) is off: serving "
                        "plaintext, the certificate files are not used", ", ".join(ignored))
        return self

    def _set_health(self, serving: bool) -> None:
        """What the health service answers for SMQ (and for ""): it follows the liveness
        check. Draining overrides it (HealthServicer ignores this from then on)."""
        if serving != self._serving:  # each set() is sent to every Watch: only changes
            self._serving = serving
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)

    def addresses(self) -> str:
        where = tcp_address(self.config.bind, self.port)
        if self.config.unix_socket:
            where += f" and unix:{self.config.unix_socket}"
        return where

    def status_line(self) -> str:
        """One line for `systemctl status`: where it listens and what it stores."""
        topics = self.service.topics()
        stored = sum(t.message_count for t in topics)
        return (f"serving on {self.addresses()}; {_count(len(topics), 'topic')}, "
                f"{_count(stored, 'message')} stored")

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
        self.budget.stop()
        self.service.close()
        if self.config.unix_socket:
            _remove_stale_socket(self.config.unix_socket)
        log.info("stopped")

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
