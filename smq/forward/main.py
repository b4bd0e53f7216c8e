"""`smq forward`: forward SMQ topics to a NATS JetStream stream, for as long as it runs.

    python -m smq.forward --topics sensors,logs --nats-servers nats://dc1:4222 --create-stream

Each message of topic T goes to subject PREFIX.NODE.T with the id NODE/T/OFFSET;
the offset is committed in SMQ (consumer forward-NODE) once JetStream acknowledged it.
See docs/forwarding.md for the design and its guarantees; smq.forward.engine has the
engine, smq.forward.jetstream the NATS side.

With --metrics-port, Prometheus metrics and a health check are served over HTTP
(smq.metrics_http; smq.forward.metrics has what they say).

Exit codes: 0 after SIGTERM or SIGINT (in-flight messages acknowledged and committed),
2 for a bad setting, a missing nats-py or a metrics port that cannot be had (one line
on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import exposure
from ..errors import EXIT_OK, EXIT_USAGE, ConfigError, StartupError
from ..logs import setup_logging
from ..settings import add_flags
from .config import SETTINGS, ForwardConfig, label, load

if TYPE_CHECKING:  # nats-py is only loaded once the settings are known to be good
    from ..metrics_http import MetricsListener
    from .jetstream import NatsOptions
    from .metrics import ForwardMetrics

PROG = "smq forward"

DESCRIPTION = """\
Forward SMQ topics to a NATS JetStream stream: every message exactly once, in order per
topic, with the SMQ consumer offset committed only after JetStream acknowledged it.
Runs until SIGTERM or SIGINT; a backlog is sent at start and after every reconnect."""

EPILOG = """\
examples:
  smq forward --topics sensors,logs --nats-servers nats://dc1:4222,nats://dc2:4222
  smq forward --topics sensors --node edge-17 --create-stream --replicas 3
  NATS_CREDS=/etc/smq/edge.creds SMQ_FORWARD_TOPICS=sensors smq forward

Settings come from flags, then environment variables, then the .env file, then defaults.
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for group in dict.fromkeys(setting.group for setting in SETTINGS):
        add_flags(parser.add_argument_group(group), [s for s in SETTINGS if s.group == group])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, and forward until SIGTERM or SIGINT."""
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load(vars(args))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .jetstream import import_nats

    try:
        import_nats()
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.nats_creds:
        try:
            import nkeys  # noqa: F401  (nats-py signs with it)
        except ImportError:
            print(
                f"{PROG}: error: --nats-creds needs the nkeys package: pip install nkeys",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        nats_options(config).tls_context()  # unreadable or mismatched files: say so now
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: the NATS TLS files cannot be used: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        metrics = metrics_port(config)  # bound now: a taken port refuses the start
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_level, quiet=("nats", "grpc"))
    # asyncio's ssl transport warns about every TLS connection nats-py closes.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    for line in exposure_warnings(config):
        logging.getLogger("smq.forward").warning("%s", line)
    try:
        return asyncio.run(forward(config, metrics))
    finally:
        if metrics is not None:
            metrics[1].stop()  # after the forwarder's last commit: scrapes see the drain


def metrics_port(config: ForwardConfig) -> tuple[ForwardMetrics, MetricsListener] | None:
    """The metrics and their listener, bound but not serving yet, if --metrics-port is
    given. StartupError (one line) if the port cannot be had."""
    if config.metrics_port is None:
        return None
    from ..metrics_http import MetricsListener
    from .metrics import ForwardMetrics

    metrics = ForwardMetrics()
    listener = MetricsListener(
        config.metrics_bind, config.metrics_port, metrics.registry, metrics.health
    )
    return metrics, listener


# The settings that name a file holding a secret: a private key, the NKey seed of a
# credentials file, a password or a token.
SECRET_FILES = ("nats_creds", "nats_key", "nats_password_file", "nats_token_file")


def exposure_warnings(config: ForwardConfig) -> list[str]:
    """A line for each secret of the forwarder's that every user of the device can read:
    its key files, secret files, and the .env file if it holds a password or token."""
    fields = [*SECRET_FILES, *(["client_key"] if config.connection().tls else [])]
    return exposure.readable_secrets(
        [(label(field), getattr(config, field)) for field in fields], config.env_file
    )


def nats_options(config: ForwardConfig) -> NatsOptions:
    from .jetstream import NatsOptions

    return NatsOptions(
        servers=config.nats_servers,
        creds=config.nats_creds,
        user=config.nats_user,
        password=config.nats_password,
        token=config.nats_token,
        ca=config.nats_ca,
        cert=config.nats_cert,
        key=config.nats_key,
        name=f"smq-forward {config.node}",
    )


async def forward(
    config: ForwardConfig, metrics: tuple[ForwardMetrics, MetricsListener] | None = None
) -> int:
    """Run the forwarder until a signal, with its metrics served on `metrics`' listener
    (if any) from the start; returns the exit code."""
    from ..systemd import Notifier
    from .engine import Forwarder, Plan
    from .jetstream import JetStream
    from .source import SmqSource

    log = logging.getLogger("smq.forward")
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # only a flag: the loop does the work

    plan = Plan(
        topics=config.topics,
        node=config.node,
        subject_prefix=config.subject_prefix,
        stream=config.stream,
        window=config.window,
        rate_limit=config.rate_limit,
        ack_timeout=config.ack_timeout,
        start_from=config.start_from,
        create_stream=config.create_stream,
        replicas=config.replicas,
        duplicate_window=config.duplicate_window,
        log_interval=config.log_interval,
    )
    source = SmqSource(config.connection(), config.consumer)
    upstream = JetStream(nats_options(config), config.stream)

    def on_status(status: str) -> None:
        notifier.status(status)
        if notifier.watchdog_seconds:
            notifier.watchdog()  # the event loop is alive and the status fresh

    forwarder = Forwarder(plan, source, upstream, on_ready=notifier.ready, on_status=on_status)
    where = ""
    if metrics is not None:
        metrics[0].attach(forwarder)
        metrics[1].start()
        where = f", metrics on http://{metrics[1].address}/metrics"
    log.info(
        "smq forward starting: topics %s, consumer %r, node %r%s",
        ",".join(config.topics),
        config.consumer,
        config.node,
        where,
    )
    try:
        await forwarder.run(stop)
    finally:
        notifier.stopping()
        await upstream.close()
        await source.close()
        for topic in forwarder.topics:
            log.info(
                "stopped: %r forwarded up to offset %s, committed %s",
                topic.name,
                topic.acked or "-",
                topic.committed if topic.committed is not None else "-",
            )
    return EXIT_OK
