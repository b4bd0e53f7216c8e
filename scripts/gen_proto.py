#!/usr/bin/env python3
"""Regenerate smq/_proto/ from proto/smq.proto.

    python scripts/gen_proto.py            # rewrite the committed code
    python scripts/gen_proto.py --check    # exit 1 if the committed code is stale

The output depends only on the .proto and the pinned grpcio-tools version
(requirements/dev.txt), so the same inputs always give the same bytes.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "smq" / "_proto"
GENERATED = ("smq_pb2.py", "smq_pb2.pyi", "smq_pb2_grpc.py")
INIT = '"""Generated gRPC code for proto/smq.proto. Never edit: run scripts/gen_proto.py."""\n'
# The messages are built in a pool of their own, not protobuf's default one: pysmq's
# generated code adds its own (older) "smq.proto" to the default pool, and a process could
# not import both (TypeError: duplicate file name smq.proto). The wire does not change:
# the file, package and message names stay the same.
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("


def generate(out_dir: pathlib.Path) -> None:
    """Write the generated modules for every .proto into out_dir."""
    from grpc_tools import protoc  # only a development dependency

    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes top-level imports ("import smq_pb2"); the code lives in a package.
    for path in out_dir.glob("*_grpc.py"):
        text = path.read_text()
        for proto in protos:
            module = proto.removesuffix(".proto") + "_pb2"
            alias = module.replace("_", "__")
            text = text.replace(f"import {module} as {alias}", f"from . import {module} as {alias}")
        path.write_text(text)
    for path in out_dir.glob("*_pb2.py"):
        text = path.read_text()
        if DEFAULT_POOL not in text:
            raise SystemExit(f"{path.name}: protoc's output no longer adds to the default pool as expected")
        path.write_text(text.replace(DEFAULT_POOL, OWN_POOL))
    (out_dir / "__init__.py").write_text(INIT)


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = pathlib.Path(tmp)
        generate(fresh)
        names = sorted(p.name for p in fresh.iterdir())
        return [n for n in names if not (OUT_DIR / n).exists()
                or (OUT_DIR / n).read_bytes() != (fresh / n).read_bytes()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    if parser.parse_args().check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale) + " (run scripts/gen_proto.py)")
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    generate(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
