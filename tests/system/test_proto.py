"""The committed generated code matches proto/smq.proto, and the contract is docs/wire.md's."""
import subprocess
import sys

from support import ROOT
from smq._proto import smq_pb2


def test_generated_code_is_not_stale():
    result = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


WIRE_RPCS = {
    "Connect": ("ConnectRequest", "ConnectResponse", False, False),
    "GetLatestOffset": ("GetLatestOffsetRequest", "GetLatestOffsetResponse", False, False),
    "GetEarliestOffset": ("GetEarliestOffsetRequest", "GetEarliestOffsetResponse", False, False),
    "CreateTopic": ("CreateTopicRequest", "CreateTopicResponse", False, False),
    "Produce": ("ProduceRequest", "ProduceResponse", False, False),
    "Consume": ("ConsumeRequest", "ConsumeResponse", False, False),
    "StreamProduce": ("ProduceRequest", "ProduceResponse", True, False),
    "StreamConsume": ("ConsumeRequest", "ConsumeResponse", False, True),
    "DeleteUntilOffset": ("DeleteUntilOffsetRequest", "DeleteUntilOffsetResponse", False, False),
    "BulkRetrieve": ("BulkRetrieveRequest", "BulkRetrieveResponse", False, False),
}
WIRE_FIELDS = {
    "ConnectRequest": {}, "ConnectResponse": {}, "CreateTopicResponse": {},
    "DeleteUntilOffsetResponse": {},
    "GetLatestOffsetRequest": {"topic": (1, "string")},
    "GetLatestOffsetResponse": {"offset": (1, "int64")},
    "GetEarliestOffsetRequest": {"topic": (1, "string")},
    "GetEarliestOffsetResponse": {"offset": (1, "int64")},
    "CreateTopicRequest": {"topic": (1, "string")},
    "ProduceRequest": {"topic": (1, "string"), "message": (2, "bytes")},
    "ProduceResponse": {"offset": (1, "int64")},
    "ConsumeRequest": {"topic": (1, "string"), "offset": (2, "int64")},
    "ConsumeResponse": {"message": (1, "bytes"), "offset": (2, "int64")},
    "DeleteUntilOffsetRequest": {"topic": (1, "string"), "offset": (2, "int64")},
    "RetrievedMessage": {"message": (1, "bytes"), "offset": (2, "int64")},
    "BulkRetrieveRequest": {"topic": (1, "string"), "start_offset": (2, "int64"), "limit": (3, "int32")},
    "BulkRetrieveResponse": {"messages": (1, "repeated RetrievedMessage"), "count": (2, "int32"),
                             "next_offset": (3, "int64")},
}
TYPE_NAMES = {9: "string", 12: "bytes", 3: "int64", 5: "int32", 8: "bool"}


def test_service_matches_wire_contract():
    service = smq_pb2.DESCRIPTOR.services_by_name["SuhaibMessageQueue"]
    assert service.full_name == "smq.SuhaibMessageQueue"
    for name, (request, response, client_stream, server_stream) in WIRE_RPCS.items():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == f"smq.{request}"
        assert method.output_type.full_name == f"smq.{response}"
        assert method.client_streaming == client_stream and method.server_streaming == server_stream


def test_messages_match_wire_contract():
    for message, fields in WIRE_FIELDS.items():
        descriptor = smq_pb2.DESCRIPTOR.message_types_by_name[message]
        seen = {}
        for field in descriptor.fields:
            if field.message_type is not None:
                kind = f"repeated {field.message_type.name}"
            else:
                kind = TYPE_NAMES[field.type]
            seen[field.name] = (field.number, kind)
        for name, expected in fields.items():
            assert seen[name] == expected, (message, name)
