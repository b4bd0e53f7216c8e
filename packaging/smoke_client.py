"""Drive a running SMQ server through the original RPCs; print one JSON line.

  python packaging/smoke_client.py ADDRESS produce TOPIC COUNT   create TOPIC, produce COUNT messages
  python packaging/smoke_client.py ADDRESS consume TOPIC COUNT   read them back and check them

Needs grpcio and smq._proto: run it with the dev venv's python, or with a PEX's own
environment (`PEX_INTERPRETER=1 smq-...-linux-x86_64.pex packaging/smoke_client.py ...`).
Exit 0 when every check passed.
"""
from __future__ import annotations

import json
import sys
import time

import grpc

from smq._proto import smq_pb2, smq_pb2_grpc


def payload(i: int) -> bytes:
    return f"smoke message {i} ".encode() + bytes(range(256)) * (i % 3)


def main(argv: list[str]) -> int:
    address, action, topic, count = argv[0], argv[1], argv[2], int(argv[3])
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = smq_pb2_grpc.SuhaibMessageQueueStub(channel)
        stub.Connect(smq_pb2.ConnectRequest(), timeout=30)
        result: dict = {"action": action, "topic": topic}
        if action == "produce":
            stub.CreateTopic(smq_pb2.CreateTopicRequest(topic=topic), timeout=30)
            offsets = [stub.Produce(smq_pb2.ProduceRequest(topic=topic, message=payload(i)),
                                    timeout=30).offset for i in range(count)]
            result["offsets"] = [offsets[0], offsets[-1]]
            ok = offsets == list(range(offsets[0], offsets[0] + count))
        elif action == "consume":
            earliest = stub.GetEarliestOffset(smq_pb2.GetEarliestOffsetRequest(topic=topic), timeout=30).offset
            latest = stub.GetLatestOffset(smq_pb2.GetLatestOffsetRequest(topic=topic), timeout=30).offset
            got = [stub.Consume(smq_pb2.ConsumeRequest(topic=topic, offset=earliest + i), timeout=30)
                   for i in range(count)]
            result["offsets"] = [earliest, latest]
            ok = (latest - earliest + 1 == count
                  and [m.message for m in got] == [payload(i) for i in range(count)]
                  and [m.offset for m in got] == list(range(earliest, earliest + count)))
        else:
            raise SystemExit(f"unknown action {action!r}")
    result["ok"] = ok
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
