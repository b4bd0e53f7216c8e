"""Generated gRPC code for proto/smq.proto. Never edit: run scripts/gen_proto.py."""
