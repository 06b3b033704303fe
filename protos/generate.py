#!/usr/bin/env python3
"""Regenerate the Python gRPC code in orthrus_runtime/proto/ from protos/.

    python protos/generate.py            # writes orthrus_runtime/proto/
    python protos/generate.py --out DIR  # writes DIR (the staleness test uses this)

protoc names the generated modules after the .proto path (orthrus/v1/...), so
the *_pb2_grpc.py it writes does `from orthrus.v1 import orthrus_pb2`, a
top-level package that does not exist here. The modules are flattened into one
folder and that import is rewritten to be package-relative, so the code works
as `orthrus_runtime.proto.orthrus_pb2` wherever the package is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = REPO / "orthrus_runtime" / "proto"
# .proto files relative to protos/ (the include root, which fixes their
# registered names, e.g. "orthrus/v1/orthrus.proto").
PROTO_FILES = ["orthrus/v1/orthrus.proto"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_ABSOLUTE_IMPORT = re.compile(r"^from ((?:\w+\.)*\w+) import (\w+_pb2)( as \w+)?$", re.M)
# The module name protoc bakes into the message classes (their __module__, which
# pickle uses to find them again, e.g. when Ray Serve ships a request to a replica).
_BUILD_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'[\w.]+'")


def _relativize(source: str, local_modules: set[str]) -> str:
    """Turn `from orthrus.v1 import orthrus_pb2 as x` into `from . import orthrus_pb2 as x`,
    and register the message classes under the module's real name.

    Only imports of modules generated here are rewritten; imports of protobuf's
    own well-known types (google.protobuf...) stay absolute.
    """

    def repl(m: re.Match) -> str:
        if m.group(2) in local_modules and not m.group(1).startswith("google."):
            return f"from . import {m.group(2)}{m.group(3) or ''}"
        return m.group(0)

    source = _ABSOLUTE_IMPORT.sub(repl, source)
    # Classes must name the module they really live in, wherever the package is.
    return _BUILD_MODULE_NAME.sub(r"\1__name__", source)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for PROTO_FILES and write the fixed modules into out_dir; returns them."""
    from grpc_tools import protoc  # dev dependency (grpcio-tools)
    import grpc_tools

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        rc = protoc.main(argv)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(argv)}")
        produced = sorted(p for p in Path(tmp).rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
        local = {p.name.rsplit(".", 1)[0] for p in produced if p.name.endswith("_pb2.py")}
        written = []
        for p in produced:
            target = out_dir / p.name
            if target.exists() and target in written:
                raise RuntimeError(f"two .proto files generate {p.name}; rename one")
            target.write_text(_relativize(p.read_text(), local))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
