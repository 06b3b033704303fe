"""The generated gRPC code matches protos/ and is importable from the package."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "orthrus_runtime" / "proto"

# Lines that only record which protoc/grpcio-tools release wrote the file. They
# differ between tool releases but not between .proto contents, so a newer
# grpcio-tools in CI must not make the committed code look stale.
_VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def _normalized(text: str) -> str:
    for pat in _VERSION_STAMPS:
        text = pat.sub("<version stamp>", text)
    return text


def _load_generator():
    spec = importlib.util.spec_from_file_location("orthrus_protos_generate", REPO / "protos" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    written = _load_generator().generate(tmp_path)
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in GENERATED.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)
    assert names == committed, f"generated {names}, committed {committed}: run `python protos/generate.py`"
    for p in written:
        fresh = _normalized(p.read_text())
        old = _normalized((GENERATED / p.name).read_text())
        assert fresh == old, f"orthrus_runtime/proto/{p.name} is stale against protos/: run `python protos/generate.py`"


def test_generated_imports_are_package_relative():
    grpc_code = (GENERATED / "orthrus_pb2_grpc.py").read_text()
    assert "from . import orthrus_pb2" in grpc_code
    assert "from orthrus.v1" not in grpc_code


def test_relativize_leaves_foreign_imports_alone():
    gen = _load_generator()
    src = (
        "from orthrus.v1 import orthrus_pb2 as orthrus_dot_v1_dot_orthrus__pb2\n"
        "from google.protobuf import empty_pb2 as google_dot_protobuf_dot_empty__pb2\n"
    )
    out = gen._relativize(src, {"orthrus_pb2", "empty_pb2"})
    assert "from . import orthrus_pb2 as orthrus_dot_v1_dot_orthrus__pb2" in out
    assert "from google.protobuf import empty_pb2" in out


def test_service_shape():
    from orthrus_runtime.proto import orthrus_pb2 as pb
    from orthrus_runtime.proto import orthrus_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["Orthrus"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Complete", "ModelInfo", "Health"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not methods["Complete"].server_streaming
    assert methods["Generate"].input_type is methods["Complete"].input_type
    assert service.full_name == "orthrus.v1.Orthrus"
    assert callable(pb_grpc.add_OrthrusServicer_to_server)

    req = pb.GenerateRequest(prompt="hi", stop=["\n"], mode=pb.MODE_AR, temperature=0.0)
    # proto3 `optional`: an explicit 0.0 (greedy) is distinguishable from unset.
    assert req.HasField("temperature") and not req.HasField("top_p")
    assert pb.GenerateRequest.FromString(req.SerializeToString()) == req


def test_messages_pickle_under_their_package_module():
    # Ray Serve pickles request messages to ship them from the gRPC proxy to a
    # replica: the classes must be importable under the name they report.
    import pickle

    from orthrus_runtime.proto import orthrus_pb2 as pb

    assert pb.GenerateRequest.__module__ == "orthrus_runtime.proto.orthrus_pb2"
    req = pb.GenerateRequest(prompt="x", max_tokens=3)
    assert pickle.loads(pickle.dumps(req)) == req
