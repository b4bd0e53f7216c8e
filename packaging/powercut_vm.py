"""Power cuts for real, driven from the host (packaging/verify-powercut builds the VM).

Each cycle boots the VM (SMQ's unit starts at boot), checks that every message acknowledged
so far is stored at its offset, produces from the host (two unary producers, a
ProduceBatch and a StreamProduce producer, through qemu's port forward), and kills qemu
at a random moment.
The disk is opened with cache=none: qemu writes what the guest writes straight to the
image, so killing it loses exactly what a power cut loses, the guest kernel's page
cache, while a kill -9 of the server (tests/e2e/test_powercut.py) keeps it. After the last
cycle one more boot checks everything; the database is then read out of the image
(debugfs) and SQLite's integrity_check runs on it here.

    .venv/bin/python packaging/powercut_vm.py --root ROOT --image DISK [--cycles N] [--json F]
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import grpc

from smq._proto import smq_pb2, smq_pb2_grpc

TOPIC = "powercut"
CALL_TIMEOUT = 30.0
STREAM_MESSAGES = 20  # per StreamProduce call
# Software emulation is slow: a boot takes one to two minutes, and the first one also
# unpacks the PEX (several minutes of emulated CPU, over more than one TimeoutStartSec).
BOOT_TIMEOUT, FIRST_BOOT_TIMEOUT = 600.0, 1500.0
STATE = "/var/lib/private/smq"  # StateDirectory= of a DynamicUser= unit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VM:
    def __init__(self, root: str, image: str, console: str) -> None:
        self.port = free_port()
        self.image = image
        self.proc = subprocess.Popen(
            ["packaging/vm-boot", root, image, console,
             "-drive", f"file={image},format=raw,if=virtio,cache=none",
             "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:8097",
             "-device", "virtio-net-pci,netdev=net0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = smq_pb2_grpc.SuhaibMessageQueueStub(self.channel)

    def wait_serving(self, timeout: float) -> float:
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"qemu exited with {self.proc.returncode} before SMQ served")
            try:
                self.stub.Connect(smq_pb2.ConnectRequest(), timeout=2)
                return time.monotonic() - started
            except grpc.RpcError:
                if time.monotonic() - started > timeout:
                    self.cut()
                    raise SystemExit(f"SMQ did not serve within {timeout:.0f} s of boot; "
                                     f"its journal:\n{journal_tail(self.image)}")
                time.sleep(0.5)

    def cut(self) -> None:
        """The power cut: qemu dies at once, with whatever the guest had not written."""
        self.proc.kill()
        self.proc.wait()
        self.channel.close()


def replay_journal(image: str) -> None:
    """Replay the ext4 journal of the image, as the next boot's mount would: after a cut,
    the file system's latest metadata (bitmaps, inodes, directories) may be only there,
    and debugfs, which does not replay it, then refuses the image or reads old state."""
    replay = subprocess.run(["e2fsck", "-p", "-E", "journal_only", image],
                            capture_output=True, text=True)
    if replay.returncode not in (0, 1):  # 1: the journal was replayed ("errors corrected")
        raise SystemExit(f"cannot replay the journal of {image} (e2fsck exit "
                         f"{replay.returncode}): {(replay.stderr or replay.stdout).strip()}")


def dump(image: str, source: str, target: str) -> None:
    """Copy a file out of the image; SystemExit naming debugfs' complaint if it is not there."""
    done = subprocess.run(["debugfs", "-R", f"dump {source} {target}", image],
                          capture_output=True, text=True)
    if not Path(target).exists():
        lines = [line for line in done.stderr.splitlines() if not line.startswith("debugfs ")]
        raise SystemExit(f"cannot read {source} out of {image}: {' '.join(lines) or 'no such file'}")


def journal_tail(image: str, lines: int = 30) -> str:
    """The last lines the smq unit logged, read out of the image (what went wrong in it)."""
    replay_journal(image)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["debugfs", "-R", f"rdump /var/log/journal {scratch}", image],
                       capture_output=True)
        try:
            shown = subprocess.run(["journalctl", f"--directory={scratch}/journal", "-u", "smq",
                                    "-o", "short-monotonic", "--no-pager", "-n", str(lines)],
                                   capture_output=True, text=True)
        except FileNotFoundError:
            return "(no journalctl here to read the image's journal)"
        return shown.stdout or shown.stderr or "(no journal in the image)"


def produce(stub, cycle: int, acked: list[tuple[int, bytes]], stream_acks: list[tuple[int, list[bytes]]],
            lock: threading.Lock) -> list[threading.Thread]:
    """Producers that record each acknowledged message until their calls fail: with its
    offset (unary, batch), or as a StreamProduce's payloads and its last offset."""
    def unary(worker: int) -> None:
        for i in range(10**9):
            payload = f"c{cycle}-u{worker}-{i}".encode()
            try:
                offset = stub.Produce(smq_pb2.ProduceRequest(topic=TOPIC, message=payload),
                                      timeout=CALL_TIMEOUT).offset
            except grpc.RpcError:
                return
            with lock:
                acked.append((offset, payload))

    def batch() -> None:
        for i in range(10**9):
            payloads = [f"c{cycle}-b{i}-{k}".encode() for k in range(50)]
            try:
                reply = stub.ProduceBatch(smq_pb2.ProduceBatchRequest(topic=TOPIC, messages=payloads),
                                          timeout=CALL_TIMEOUT)
            except grpc.RpcError:
                return
            with lock:
                acked.extend(zip(range(reply.first_offset, reply.last_offset + 1), payloads))

    def streamed() -> None:
        # A StreamProduce answers once, after the half-close: its messages are then
        # acknowledged, at the offsets up to the one it returns.
        for i in range(10**9):
            payloads = [f"c{cycle}-s{i}-{k}".encode() for k in range(STREAM_MESSAGES)]
            try:
                last = stub.StreamProduce(iter([smq_pb2.ProduceRequest(topic=TOPIC, message=p)
                                                for p in payloads]), timeout=CALL_TIMEOUT).offset
            except grpc.RpcError:
                return
            with lock:  # this stream's messages, in order, end at `last` (others interleave)
                stream_acks.append((last, payloads))

    threads = [threading.Thread(target=unary, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=batch), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    return threads


def acknowledged(acked: list[tuple[int, bytes]], stream_acks: list[tuple[int, list[bytes]]]) -> int:
    return len(acked) + sum(len(payloads) for _, payloads in stream_acks)


def stored_messages(stub) -> dict[int, bytes]:
    stored, start = {}, 1
    while True:
        page = stub.BulkRetrieve(smq_pb2.BulkRetrieveRequest(topic=TOPIC, start_offset=start, limit=5000),
                                 timeout=CALL_TIMEOUT)
        if not page.messages:
            return stored
        stored.update((m.offset, m.message) for m in page.messages)
        start = page.next_offset


def check(stub, acked: list[tuple[int, bytes]], stream_acks: list[tuple[int, list[bytes]]]) -> dict[int, bytes]:
    stored = stored_messages(stub)
    lost = [(offset, payload) for offset, payload in acked if stored.get(offset) != payload]
    offset_of = {payload: offset for offset, payload in stored.items()}
    misplaced = []
    for last, payloads in stream_acks:  # all there, in order, the last one at `last`
        offsets = [offset_of.get(payload) for payload in payloads]
        lost += [(None, payload) for offset, payload in zip(offsets, payloads) if offset is None]
        if None not in offsets and (offsets != sorted(offsets) or offsets[-1] != last):
            misplaced.append((last, offsets))
    if lost:
        raise SystemExit(f"LOST {len(lost)} acknowledged messages, e.g. {lost[:3]}")
    if misplaced:
        raise SystemExit(f"StreamProduce messages out of order or not ending at the acknowledged "
                         f"offset: {misplaced[:2]}")
    if sorted(stored) != list(range(1, len(stored) + 1)):
        raise SystemExit("the stored offsets have holes")
    return stored


def integrity(image: str) -> str:
    """integrity_check of the database as the next boot would find it (with its WAL)."""
    replay_journal(image)
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("smq.db", "smq.db-wal"):  # the server keeps its WAL file (PERSIST_WAL)
            dump(image, f"{STATE}/{name}", f"{scratch}/{name}")
        if not Path(scratch, "smq.db").stat().st_size:
            raise SystemExit(f"the database {STATE}/smq.db in the image is empty")
        connection = apsw.Connection(f"{scratch}/smq.db")
        return connection.execute("PRAGMA integrity_check").fetchall()[0][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="the VM root (kernel and initramfs)")
    parser.add_argument("--image", required=True, help="the VM's disk image, SMQ installed")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--seed", type=int, default=random.randrange(10**9))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    console = str(Path(args.image).with_name("console.log"))
    acked: list[tuple[int, bytes]] = []
    stream_acks: list[tuple[int, list[bytes]]] = []
    lock = threading.Lock()
    cycles = []
    for cycle in range(args.cycles + 1):
        vm = VM(args.root, args.image, console)
        boot = vm.wait_serving(FIRST_BOOT_TIMEOUT if cycle == 0 else BOOT_TIMEOUT)
        if cycle == 0:
            vm.stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=TOPIC), timeout=CALL_TIMEOUT)
        stored = check(vm.stub, acked, stream_acks)
        total = acknowledged(acked, stream_acks)
        print(f"[powercut-vm] boot {cycle + 1}: serving after {boot:.1f} s; all {total} "
              f"acknowledged messages there ({len(stored)} stored)", flush=True)
        if cycle == args.cycles:
            vm.cut()
            break
        threads = produce(vm.stub, cycle, acked, stream_acks, lock)
        run_for = rng.uniform(3.0, 8.0)
        time.sleep(run_for)
        vm.cut()
        for thread in threads:
            thread.join(CALL_TIMEOUT + 5)
        this_cycle = acknowledged(acked, stream_acks) - total
        cycles.append({"boot_s": round(boot, 1), "produced_for_s": round(run_for, 1),
                       "acked": this_cycle})
        print(f"[powercut-vm] cut {cycle + 1} after {run_for:.1f} s of producing: "
              f"{this_cycle} messages acknowledged in this cycle", flush=True)
    result = integrity(args.image)
    report = {"seed": args.seed, "cycles": cycles, "acknowledged": total, "stored": len(stored),
              "stream_produce_calls_acknowledged": len(stream_acks), "lost": 0, "integrity_check": result}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"[powercut-vm] {args.cycles} power cuts, {total} acknowledged messages ({len(stream_acks)} "
          f"StreamProduce calls of {STREAM_MESSAGES} among them), all stored ({len(stored)} with "
          f"those in flight at a cut); integrity_check: {result}")
    return 0 if result == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
