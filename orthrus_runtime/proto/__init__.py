"""Generated gRPC code for protos/orthrus/v1/orthrus.proto.

Do not edit orthrus_pb2*.py by hand: change the .proto and run
`python protos/generate.py` (tests/test_proto.py fails when they are stale).
"""
from . import orthrus_pb2, orthrus_pb2_grpc

__all__ = ["orthrus_pb2", "orthrus_pb2_grpc"]
