"""One error type for everything the router refuses, mapped to both protocols.

An ApiError carries an HTTP status and an OpenAI error `type`/`code`; the gRPC
status code follows from the HTTP status, so the two front ends can never
disagree about what a failure means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import grpc

from orthrus_runtime.types import GenerateRequest, InvalidRequestError
from orthrus_runtime.validation import check_request

# HTTP status -> (OpenAI error type, gRPC status code).
_BY_STATUS: dict[int, tuple[str, grpc.StatusCode]] = {
    400: ("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    401: ("authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    404: ("not_found_error", grpc.StatusCode.NOT_FOUND),
    405: ("invalid_request_error", grpc.StatusCode.UNIMPLEMENTED),
    413: ("invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
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


# Seconds a client is asked to wait before retrying (HTTP Retry-After, gRPC metadata
# `retry-after` and `grpc-retry-pushback-ms`), for the codes below.
RETRY_AFTER_S = 1
RETRYABLE_CODES = ("overloaded", "queue_timeout", "shutting_down")


def checked(req: GenerateRequest) -> GenerateRequest:
    """The shared request rules (orthrus_runtime.validation) as an ApiError(400) naming the
    field: both protocols call this, so they refuse the same requests with the same words."""
    try:
        check_request(req)
    except InvalidRequestError as e:
        raise invalid(str(e), param=e.param) from None
    return req


def overloaded(detail: str, code: str = "overloaded") -> ApiError:
    # A full queue or a passed queue deadline: retry later (503 / RESOURCE_EXHAUSTED, at once).
    return ApiError(503, f"server overloaded: {detail}", code=code, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED)


def unavailable(detail: str) -> ApiError:
    return ApiError(503, f"engine unavailable: {detail}", code="engine_unavailable")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another replica", code="shutting_down")


def internal(request_id: str) -> ApiError:
    """An unexpected failure: the client gets the id to find the log line, no internals."""
    return ApiError(500, f"internal error; the server log has the details under request id {request_id}",
                    code="internal_error")


@dataclass
class Rejection:
    """What the engine deployment yields, instead of deltas, for a request it refuses
    because of its content (HTTP 400 / INVALID_ARGUMENT).

    Sent as a value rather than raised so the reason crosses the Ray boundary
    intact (a raised error arrives wrapped in RayTaskError with a traceback).
    """

    message: str
    param: Optional[str] = None


@dataclass
class Refusal:
    """What the engine deployment yields when it refuses or ends a request for a reason
    other than its content. reason: "queue_timeout" (503 / RESOURCE_EXHAUSTED),
    "shutting_down" (503 / UNAVAILABLE) or "unavailable" (the engine loop is not running)."""

    message: str
    reason: str

    def to_api_error(self) -> ApiError:
        if self.reason == "queue_timeout":
            return overloaded(self.message, code="queue_timeout")
        if self.reason == "shutting_down":
            return shutting_down()
        return unavailable(self.message)


@dataclass
class Accepted:
    """The engine deployment's first item for a request it has queued: the router's queue
    deadline covers the wait until this arrives (Serve's queue, then checks)."""
