"""pysmq 1.0.8 flows against a running server, run in a process of their own:

    python tests/support/pysmq_flows.py PORT FLOW

Each flow runs in a fresh interpreter with only pysmq imported, as an application of
the original would, and prints one JSON object of what it observed; test_pysmq.py asserts
on it. (Both clients in one process: tests/client/test_coimport.py.)
"""
from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable

from pysmq.client import Client
from pysmq.exceptions import SMQConsumeError, SMQException

ORDERS = [{"id": i, "item": item, "qty": i * 2} for i, item in
          enumerate(["apple", "pear", "plum", "fig", "kiwi"], start=1)]


def readme(port: int) -> dict:
    """The original README's usage: JSON payloads, produce, consume, stream, trim."""
    out: dict = {}
    topic = "orders"
    with Client("localhost", port) as client:
        client.connect()
        client.create_topic(topic)
        client.create_topic(topic)  # every start calls it: idempotent
        out["offsets"] = [client.produce(topic, json.dumps(order).encode()) for order in ORDERS]

        message, offset = client.consume(topic, 2)
        out["consume_2"] = [json.loads(message), offset]
        message, offset = client.consume_earliest(topic)
        out["earliest_message"] = [json.loads(message), offset]
        message, offset = client.consume_latest(topic)
        out["latest_message"] = [json.loads(message), offset]
        out["earliest"] = client.get_earliest_offset(topic)
        out["latest"] = client.get_latest_offset(topic)

        # A consumer that streams from 0 and stops after some offset; one message
        # arrives live, produced by another client once the history has been read.
        history_read = threading.Event()

        def produce_live() -> None:
            history_read.wait(30)
            with Client("localhost", port) as other:
                other.produce(topic, json.dumps({"id": 6, "item": "live"}).encode())

        producer = threading.Thread(target=produce_live)
        producer.start()
        streamed = []
        for message, offset in client.stream_consume(topic, 0):
            streamed.append([json.loads(message), offset])
            if offset == len(ORDERS):
                history_read.set()
            if offset == len(ORDERS) + 1:
                break
        producer.join(30)
        out["streamed"] = streamed

        pages = []
        start = 1
        while True:
            response = client.bulk_retrieve(topic, start, 2)
            if response.count == 0:
                pages.append([[], response.count, response.next_offset])
                break
            pages.append([[m.offset for m in response.messages], response.count, response.next_offset])
            start = response.next_offset
        out["bulk_pages"] = pages
        first = client.bulk_retrieve(topic, 0, 100)
        out["bulk_from_0"] = [[json.loads(m.message), m.offset] for m in first.messages]

        client.delete_until_offset(topic, 2)
        out["earliest_after_delete"] = client.get_earliest_offset(topic)
        out["consume_earliest_after_delete"] = client.consume_earliest(topic)[1]
        try:
            client.consume(topic, 1)
            out["consume_deleted"] = "no error"
        except SMQConsumeError as error:
            out["consume_deleted"] = error.original_error.code().name
    return out


def errors(port: int) -> dict:
    """Which pysmq exception each failure surfaces as, and the status under it."""
    out: dict = {}
    with Client("localhost", port) as client:
        client.create_topic("empty")
        client.create_topic("one")
        client.produce("one", b"x")
        cases: dict[str, Callable[[], object]] = {
            "consume_missing_topic": lambda: client.consume("missing", 1),
            "consume_above_latest": lambda: client.consume("one", 2),
            "consume_offset_0": lambda: client.consume("one", 0),
            "consume_earliest_empty": lambda: client.consume_earliest("empty"),
            "consume_latest_empty": lambda: client.consume_latest("empty"),
            "latest_offset_empty": lambda: client.get_latest_offset("empty"),
            "produce_missing_topic": lambda: client.produce("missing", b"x"),
            "create_invalid_name": lambda: client.create_topic("bad name"),
            "stream_missing_topic": lambda: next(client.stream_consume("missing", 0)),
            "bulk_missing_topic": lambda: client.bulk_retrieve("missing", 0, 10),
        }
        for name, call in cases.items():
            try:
                call()
                out[name] = None
            except SMQException as error:
                code = error.original_error.code().name if error.original_error else None
                out[name] = [type(error).__name__, code]
    return out


def heartbeats(port: int) -> dict:
    """stream_consume on an empty topic of a server with a short heartbeat interval:
    the heartbeats sent while it waits never reach the caller."""
    out: dict = {}
    with Client("localhost", port) as client:
        client.create_topic("quiet")

        def produce_later() -> None:
            threading.Event().wait(1.0)  # let several 0.2 s heartbeats go by first
            with Client("localhost", port) as other:
                other.produce("quiet", b"finally")
                other.produce("quiet", b"again")

        threading.Thread(target=produce_later).start()
        got = []
        for message, offset in client.stream_consume("quiet", 0):
            got.append([message.decode(), offset])
            if len(got) == 2:
                break
        out["streamed"] = got
    return out


FLOWS = {"readme": readme, "errors": errors, "heartbeats": heartbeats}

if __name__ == "__main__":
    port, flow = int(sys.argv[1]), sys.argv[2]
    print(json.dumps(FLOWS[flow](port)))
