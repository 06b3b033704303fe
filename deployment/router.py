"""The ingress deployment: OpenAI-compatible HTTP (FastAPI) and the orthrus.v1 gRPC service.

HTTP arrives through Ray Serve's HTTP proxy as an ASGI app; gRPC arrives through
Serve's gRPC proxy, which calls the methods named like the proto's RPCs
(Generate, Complete, ModelInfo, Health) with the decoded request message.
Both front ends share one path to the engine: `_open` starts an engine stream
over the DeploymentHandle and waits for its first item, so a refused request
(bad input, full queue) is answered before any response byte is sent, and an
EngineStream relays the rest. Whenever consumption stops early (client
disconnect, gRPC cancel, error) the engine stream is cancelled, which closes
the replica-side generator and aborts the engine request.
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers'
# annotations (Request) at route registration, through Serve's ingress wrapper.
import asyncio
import logging
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime.types import GenerateDelta, GenerateRequest, ModelInfo, Usage

from . import grpc_protocol, openai_protocol as oa
from .auth import ApiKeys, bearer_token
from .errors import ApiError, Rejection, invalid, overloaded, unavailable

logger = logging.getLogger("ray.serve")

ROUTER_DEPLOYMENT_NAME = "OrthrusRouter"
HEALTH_TIMEOUT_S = 10.0

fastapi_app = FastAPI(title="Orthrus Serve", docs_url=None, redoc_url=None, openapi_url=None)


class GrpcRequestFailed(Exception):
    """Raised after the status code and details are set on the RayServegRPCContext.

    Serve's gRPC proxy answers with the code set on the context when the method
    raises (see ray.serve._private.grpc_util.get_grpc_response_status).
    """


# Module-level helpers are defined above the deployment class: @serve.ingress
# builds a new class at decoration time, which Ray pickles by value together
# with only the globals that existed then.
def _short(e: BaseException) -> str:
    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


class EngineStream:
    """One engine request's output, owned by one response.

    close() cancels the request in the engine unless it already ran to its
    final delta; every path that stops reading early ends up there (client
    disconnect, gRPC cancel, an error while relaying).
    """

    def __init__(self, gen: DeploymentResponseGenerator, first: GenerateDelta):
        self._gen = gen
        self._first = first
        self._done = first.finished

    async def deltas(self) -> AsyncIterator[GenerateDelta]:
        try:
            yield self._first
            while not self._done:
                try:
                    d = await self._gen.__anext__()
                except StopAsyncIteration:
                    raise unavailable("the engine stream ended before the request finished") from None
                except RayError as e:
                    raise unavailable(_short(e)) from None
                self._done = d.finished
                yield d
        finally:
            self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._gen.cancel()


class EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its engine stream however the response ends.

    Starlette never starts the body iterator when the client is gone before
    the headers are sent, so the iterator's own cleanup would not run then.
    """

    def __init__(self, content: AsyncIterator[bytes], stream: EngineStream, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._engine_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._engine_stream.close()


async def _collect(deltas: AsyncIterator[GenerateDelta]) -> tuple[str, list[int], GenerateDelta]:
    text: list[str] = []
    ids: list[int] = []
    last = None
    try:
        async for d in deltas:
            text.append(d.text)
            ids.extend(d.token_ids)
            last = d
    finally:
        await deltas.aclose()
    assert last is not None and last.finished
    return "".join(text), ids, last


@serve.deployment(
    name=ROUTER_DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1024,
    max_queued_requests=2048,
)
@serve.ingress(fastapi_app)
class OrthrusRouter:
    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]):
        from orthrus_runtime.metrics import OrthrusMetrics, start_metrics_server

        self._engine = engine
        self._model_id: str = settings["model_id"]
        self._default_max_tokens: int = settings.get("default_max_tokens", grpc_protocol.DEFAULT_MAX_TOKENS)
        self._keys = ApiKeys(settings.get("api_keys_env"), settings.get("api_keys_file"))
        self._created = int(time.time())
        self._info: Optional[ModelInfo] = None
        replica = serve.get_replica_context().replica_id.unique_id
        self._metrics = OrthrusMetrics(self._model_id, replica)
        port = settings.get("metrics_port")
        self.metrics_port = start_metrics_server(self._metrics.registry, port) if port is not None else None

    # ------------------------------------------------------------------ engine access

    async def _open(self, req: GenerateRequest) -> EngineStream:
        """Start the engine request and wait for its first delta (ApiError when refused)."""
        gen = self._engine.options(stream=True).generate.remote(req)
        try:
            first = await gen.__anext__()
        except BackPressureError as e:
            raise overloaded(str(e)) from None
        except StopAsyncIteration:
            raise unavailable("the engine ended the request without output") from None
        except (RayError, DeploymentUnavailableError) as e:
            raise unavailable(_short(e)) from None
        except BaseException:
            gen.cancel()  # cancelled while waiting (client went away): stop the engine request
            raise
        if isinstance(first, Rejection):
            raise invalid(first.message)
        return EngineStream(gen, first)

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self._engine.model_info.remote()
            except (RayError, DeploymentUnavailableError) as e:
                raise unavailable(_short(e)) from None
        return self._info

    async def _engine_health(self) -> tuple[bool, str]:
        try:
            h = await asyncio.wait_for(self._engine.health.remote(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False, f"engine did not answer within {HEALTH_TIMEOUT_S:.0f}s"
        except (RayError, DeploymentUnavailableError, BackPressureError) as e:
            return False, _short(e)
        return (True, "ok") if h["alive"] else (False, "engine step loop has died")

    def replica_info(self) -> dict[str, Any]:
        """For operators and tests, over a DeploymentHandle (not routed over HTTP)."""
        return {"metrics_port": self.metrics_port, "auth": self._keys.enabled}

    # ------------------------------------------------------------------ HTTP

    def _http_error(self, e: ApiError) -> JSONResponse:
        self._metrics.on_request_error(str(e.status), "http")
        headers = None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif e.code == "overloaded":
            headers = {"Retry-After": "1"}
        return JSONResponse(e.to_openai(), status_code=e.status, headers=headers)

    def _http_auth(self, request: Request) -> None:
        if not self._keys.check(bearer_token(request.headers.get("authorization"))):
            raise ApiError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    async def _http_generate(self, request: Request, chat: bool) -> Response:
        try:
            self._http_auth(request)
            body = oa.parse_json_body(await request.body())
            if chat:
                req, opts = oa.parse_chat(body, self._model_id, self._default_max_tokens)
            else:
                req, opts = oa.parse_completion(body, self._model_id)
            stream = await self._open(req)
        except ApiError as e:
            return self._http_error(e)
        if opts.stream:
            return EngineStreamingResponse(self._sse(stream, opts, chat), stream, media_type="text/event-stream",
                                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, _, last = await _collect(stream.deltas())
        except ApiError as e:
            return self._http_error(e)
        build = oa.chat_response if chat else oa.completion_response
        return JSONResponse(build(opts, text, last.finish_reason, last.usage or Usage(), last.stats))

    async def _sse(self, stream: EngineStream, opts: oa.ResponseOptions, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        deltas = stream.deltas()
        try:
            if chat:
                yield oa.sse(oa.chat_chunk(opts, {"role": "assistant", "content": ""}))
            async for d in deltas:
                if not d.finished and not d.text:
                    continue  # text held back (partial character or possible stop string)
                if chat:
                    chunk = oa.chat_chunk(opts, {"content": d.text} if d.text else {}, d.finish_reason)
                else:
                    chunk = oa.completion_chunk(opts, d.text, d.finish_reason)
                if d.finished:
                    chunk["orthrus"] = oa.stats_dict(d.stats)
                yield oa.sse(chunk)
                if d.finished:
                    if opts.include_usage:
                        yield oa.sse(oa.usage_chunk(opts, obj, d.usage or Usage()))
                    yield oa.SSE_DONE
        except ApiError as e:
            # Headers are gone already: report in-band, as OpenAI does, and end without [DONE].
            self._metrics.on_request_error(str(e.status), "http")
            yield oa.sse(e.to_openai())
        finally:
            await deltas.aclose()

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._http_generate(request, chat=False)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._http_generate(request, chat=True)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self._model_id, "object": "model", "created": self._created, "owned_by": "orthrus"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._http_auth(request)
        except ApiError as e:
            return self._http_error(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    @fastapi_app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request) -> Response:
        try:
            self._http_auth(request)
            if model != self._model_id:
                raise ApiError(404, f"model '{model}' does not exist; this server serves '{self._model_id}'",
                               param="model", code="model_not_found")
        except ApiError as e:
            return self._http_error(e)
        return JSONResponse(self._model_card())

    @fastapi_app.get("/health")
    async def health(self) -> Response:
        # Open without a key: load balancers and probes call it.
        ok, message = await self._engine_health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "message": message},
                            status_code=200 if ok else 503)

    # ------------------------------------------------------------------ gRPC

    def _grpc_status(self, ctx: RayServegRPCContext, e: ApiError) -> None:
        self._metrics.on_request_error(e.grpc_code.name, "grpc")
        ctx.set_code(e.grpc_code)
        ctx.set_details(e.message)

    def _grpc_fail(self, ctx: RayServegRPCContext, e: ApiError) -> GrpcRequestFailed:
        """For streams: set the status, then raise what this returns.

        Serve only carries a streaming method's context back with a yielded
        message, so a stream that fails before its first message must raise.
        """
        self._grpc_status(ctx, e)
        return GrpcRequestFailed(e.message)

    def _grpc_auth(self, ctx: RayServegRPCContext) -> None:
        values = [v for k, v in ctx.invocation_metadata() if k == "authorization"]
        if not self._keys.check(bearer_token(values[0] if values else None)):
            raise ApiError(401, "missing or invalid API key (send metadata `authorization: Bearer <key>`)",
                           code="invalid_api_key")

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext):
        try:
            self._grpc_auth(grpc_context)
            req = grpc_protocol.to_generate_request(request, self._default_max_tokens)
            stream = await self._open(req)
        except ApiError as e:
            raise self._grpc_fail(grpc_context, e) from None
        deltas = stream.deltas()
        try:
            async for d in deltas:
                if d.finished or d.text or d.token_ids:
                    yield grpc_protocol.delta_to_response(d)
        except ApiError as e:
            raise self._grpc_fail(grpc_context, e) from None
        finally:
            await deltas.aclose()

    async def Complete(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        try:
            self._grpc_auth(grpc_context)
            req = grpc_protocol.to_generate_request(request, self._default_max_tokens)
            stream = await self._open(req)
            text, token_ids, last = await _collect(stream.deltas())
        except ApiError as e:
            # A unary method returns: Serve applies the status set on the context,
            # and the client sees only that status (no exception logged for a 4xx).
            self._grpc_status(grpc_context, e)
            return pb.GenerateResponse()
        return grpc_protocol.final_response(req.request_id, text, token_ids, last)

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        try:
            self._grpc_auth(grpc_context)
            info = await self._model_info()
        except ApiError as e:
            self._grpc_status(grpc_context, e)
            return pb.ModelInfoResponse()
        return grpc_protocol.model_info_response(info, self._model_id)

    async def Health(self, request: pb.HealthRequest, grpc_context: RayServegRPCContext) -> pb.HealthResponse:
        ok, message = await self._engine_health()
        status = pb.HealthResponse.STATUS_SERVING if ok else pb.HealthResponse.STATUS_NOT_SERVING
        return pb.HealthResponse(status=status, message=message)
