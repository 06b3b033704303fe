"""One error type for everything the router refuses, mapped to both protocols.

An ApiError carries an HTTP status and an OpenAI error `type`/`code`; the gRPC
status code follows from the HTTP status, so the two front ends can never
disagree about what a failure means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import grpc

# HTTP status -> (OpenAI error type, gRPC status code).
_BY_STATUS: dict[int, tuple[str, grpc.StatusCode]] = {
    400: ("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    401: ("authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    404: ("not_found_error", grpc.StatusCode.NOT_FOUND),
    500: ("internal_error", grpc.StatusCode.INTERNAL),
    503: ("service_unavailable", grpc.StatusCode.UNAVAILABLE),
}


class ApiError(Exception):
    """A request failed in a way the client is told about.

    status: HTTP status code; code: a short machine-readable reason
    ("invalid_value", "model_not_found", "overloaded", ...); param: the request
    field at fault, when there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Optional[str] = None,
        param: Optional[str] = None,
        grpc_code: Optional[grpc.StatusCode] = None,
    ):
        super().__init__(message)
        if status not in _BY_STATUS:
            raise ValueError(f"no mapping for HTTP status {status}")
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self._grpc_code = grpc_code

    @property
    def type(self) -> str:
        return _BY_STATUS[self.status][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self._grpc_code or _BY_STATUS[self.status][1]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def overloaded(detail: str) -> ApiError:
    # A full queue: the client should retry later (503 / RESOURCE_EXHAUSTED, at once).
    return ApiError(503, f"server overloaded: {detail}", code="overloaded", grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)


def unavailable(detail: str) -> ApiError:
    return ApiError(503, f"engine unavailable: {detail}", code="engine_unavailable")


@dataclass
class Rejection:
    """What the engine deployment yields, instead of deltas, for a request it refuses.

    Sent as a value rather than raised so the reason crosses the Ray boundary
    intact (a raised error arrives wrapped in RayTaskError with a traceback).
    """

    message: str
