"""A real mTLS server with an access-control file (--acl-file) and a Unix socket, and
stubs whose client certificates name an identity (a subject CN), for the tests of the
ACL from the server, the client, the CLI and the forwarder."""
from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc

from smq._proto import smq_pb2 as pb
from smq._proto import smq_pb2_grpc
from support.certs import CertSet, client_for, make_certs
from support.servers import ServerProcess

TIMEOUT = 15.0

# A writer and a reader of sensors.*: the client's and the commands' tests.
WRITER_READER_ACL = """\
[identities."writer"]
produce = ["sensors.*"]
[identities."reader"]
consume = ["sensors.*"]
"""


class AclServer:
    """An mTLS server with an ACL file and a Unix socket; stubs per identity."""

    def __init__(self, certs: CertSet, workdir: Path, acl: str, *flags: str) -> None:
        self.certs = certs
        self.acl_path = workdir / "acl.toml"
        self.acl_path.write_text(acl)
        self.socket = workdir / "s.sock"
        self.process = ServerProcess(
            ["--dbpath", str(workdir / "smq.db"), "--port", "0", "--bind", "127.0.0.1",
             "--durability", "normal", "--heartbeat-interval", "0.2",
             "--unix-socket", str(self.socket), *certs.server_flags(),
             "--acl-file", str(self.acl_path), *flags], workdir).wait_serving()
        self._stubs: dict[tuple[str | None, ...], smq_pb2_grpc.SuhaibMessageQueueStub] = {}
        self.local = smq_pb2_grpc.SuhaibMessageQueueStub(
            grpc.insecure_channel(f"unix:{self.socket}"))

    def stub(self, identity: str | None, *cns: str) -> smq_pb2_grpc.SuhaibMessageQueueStub:
        """A stub whose client certificate has this CN (None: a certificate without one;
        more `cns`: a subject with several CNs)."""
        name = (identity, *cns)
        if name not in self._stubs:
            cert, key = client_for(self.certs, identity, *cns)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.certs.read("ca_cert"), private_key=key.read_bytes(),
                certificate_chain=cert.read_bytes())
            self._stubs[name] = smq_pb2_grpc.SuhaibMessageQueueStub(
                grpc.secure_channel(f"localhost:{self.process.port}", credentials))
        return self._stubs[name]

    def make_topic(self, topic: str, count: int = 3) -> None:
        """Through the socket (full rights without an "@local" table)."""
        self.local.CreateTopic(pb.CreateTopicRequest(topic=topic), timeout=TIMEOUT)
        for i in range(1, count + 1):
            self.local.Produce(pb.ProduceRequest(topic=topic, message=f"m{i}".encode()),
                               timeout=TIMEOUT)

    def state(self, topic: str) -> tuple | None:
        """Everything a call could change about a topic, read through the socket."""
        try:
            info = self.local.DescribeTopic(pb.DescribeTopicRequest(topic=topic), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return None
        page = self.local.BulkRetrieve(
            pb.BulkRetrieveRequest(topic=topic, start_offset=0, limit=1000), timeout=TIMEOUT)
        policy = self.local.GetTopicPolicy(pb.GetTopicPolicyRequest(topic=topic), timeout=TIMEOUT)
        consumers = self.local.ListConsumers(pb.ListConsumersRequest(topic=topic), timeout=TIMEOUT)
        return (info.topic.next_offset, [(m.offset, m.message) for m in page.messages],
                policy.overrides.SerializeToString(),
                [(c.consumer, c.committed_offset) for c in consumers.consumers])

    def reload(self, acl: str) -> None:
        self.acl_path.write_text(acl)
        self.process.proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        self.process.close()

    def files_of(self, identity: str | None) -> tuple[str, str, str]:
        """The client certificate, key and CA files of an identity (as the client takes them)."""
        cert, key = client_for(self.certs, identity)
        return str(cert), str(key), str(self.certs.ca_cert)

    def cli_flags(self, identity: str | None) -> list[str]:
        """The `smq COMMAND` flags that connect as this identity."""
        cert, key, ca = self.files_of(identity)
        return ["--host", "localhost", "--port", str(self.process.port), "--enable-mtls",
                "--client-cert", cert, "--client-key", key, "--ca-cert", ca]


def writer_reader_server(tmp_path_factory, messages: int) -> Iterator[AclServer]:
    """A module fixture's body: an AclServer of WRITER_READER_ACL whose topic sensors.a
    holds `messages` messages."""
    server = AclServer(make_certs(tmp_path_factory.mktemp("certs")),
                       tmp_path_factory.mktemp("acl"), WRITER_READER_ACL)
    server.make_topic("sensors.a", messages)
    yield server
    server.close()
