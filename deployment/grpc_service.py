"""The orthrus.v1 service as Serve's gRPC proxy registers it (the config's
`grpc_servicer_functions` entry), with request parsing that cannot fail.

The generated add_OrthrusServicer_to_server parses each request in the proxy with
FromString, before any of our code runs: a truncated or garbage message, or invalid
UTF-8 in a string field, then fails inside grpcio, which answers UNKNOWN with
"Unexpected <class 'google.protobuf.message.DecodeError'>". Here a message that does
not parse becomes a MalformedMessage, which the proxy forwards like any request and
the router answers with INVALID_ARGUMENT. What still happens before our code: a message
over the proxy's size limit (RESOURCE_EXHAUSTED from grpcio itself), an unknown method
(UNIMPLEMENTED) and metadata errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc

from orthrus_runtime.proto import orthrus_pb2 as pb

SERVICE = "orthrus.v1.Orthrus"


@dataclass
class MalformedMessage:
    """A request body that is not a valid message of its type (picklable: it crosses to the router)."""

    message_type: str
    reason: str


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except Exception as e:  # DecodeError and friends: the bytes are the client's fault
            text = str(e).strip().splitlines()
            return MalformedMessage(cls.DESCRIPTOR.full_name, (text[0] if text else "")[:200])
    return parse


def add_OrthrusServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc's naming
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=_parser(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=_parser(pb.HealthRequest),
            response_serializer=pb.HealthResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
