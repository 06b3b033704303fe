"""The ingress: OpenAI-compatible HTTP (FastAPI) and the orthrus.v1 gRPC service.

HTTP arrives through Ray Serve's HTTP proxy as an ASGI app; gRPC arrives through
Serve's gRPC proxy, which calls the methods named like the proto's RPCs
(Generate, Complete, ModelInfo, Health) with the decoded request message.
RouterFront holds it all, over an EngineClient: this module's OrthrusRouter deployment
reaches the OrthrusEngine deployment over a handle (split topology), server.py's
OrthrusServer hosts the engine in the same replica (colocated).
Both front ends share one path to the engine: `_open` starts an engine stream
and waits for its first item, so a refused request
(bad input, full queue, a passed queue deadline) is answered before any response
byte is sent, and an EngineStream relays the rest. Whenever consumption stops
early (client disconnect, gRPC cancel, error, drain) the engine stream is
cancelled, which closes the replica-side generator and aborts the engine request.

Errors: every failure is an ApiError, answered as OpenAI's JSON error shape (or an
SSE error event followed by [DONE] once a stream has started) and as a gRPC status,
and counted by code; anything unexpected becomes a 500 that names the request id
under which the log holds the traceback, never the exception itself.

Health: /health (liveness) answers from this replica itself; /ready (readiness) and
the gRPC Health method say whether the application can serve: not draining, and
its engine can take requests (EngineClient.ready: split, Serve's controller counts a
healthy engine replica, cached for a second; colocated, this replica's engine loop is
alive), never a request through an engine's queue.
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers'
# annotations (Request) at route registration, through Serve's ingress wrapper.
import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from orthrus_runtime.defaults import DEFAULT_MAX_TOKENS
from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime import validation
from orthrus_runtime.types import AcceptanceStats, GenerateDelta, GenerateRequest, ModelInfo, Usage, merge_deltas

from . import grpc_protocol, openai_protocol as oa
from .auth import ApiKeys, bearer_token
from .engine_deployment import ENGINE_DEPLOYMENT_NAME
from .engine_client import EngineCall, EngineClient, HandleEngineClient
from .errors import (
    RETRY_AFTER_S,
    RETRYABLE_CODES,
    Accepted,
    ApiError,
    Refusal,
    Rejection,
    internal,
    invalid,
    overloaded,
    shutting_down,
    unavailable,
)
from .grpc_service import MalformedMessage

logger = logging.getLogger("ray.serve")

ROUTER_DEPLOYMENT_NAME = "OrthrusRouter"


async def _route_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and methods: OpenAI's error shape instead of FastAPI's {"detail": ...}.
    status = exc.status_code if exc.status_code in (404, 405) else 400
    e = ApiError(status, f"{request.method} {request.url.path}: {exc.detail}", code="invalid_route")
    return JSONResponse(e.to_openai(), status_code=status)


def http_app(front: "RouterFront") -> FastAPI:
    """The OpenAI-compatible HTTP API of one ingress replica, its routes bound to `front`.
    Built per replica (Serve's __serve_build_asgi_app__), so that each ingress class (split
    router, colocated server) serves the same routes without sharing a module-level app."""
    app = FastAPI(title="Orthrus Serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _route_error)
    app.add_api_route("/v1/completions", front.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", front.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", front.models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", front.model, methods=["GET"])
    app.add_api_route("/tokenize", front.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", front.detokenize, methods=["POST"])
    app.add_api_route("/health", front.http_health, methods=["GET"])
    app.add_api_route("/ready", front.http_ready, methods=["GET"])
    return app


class GrpcRequestFailed(Exception):
    """Raised after the status code and details are set on the RayServegRPCContext.

    Serve's gRPC proxy answers with the code set on the context when the method
    raises (see ray.serve._private.grpc_util.get_grpc_response_status).
    """


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

    def __init__(self, gen: EngineCall, first: GenerateDelta, release: Optional[Callable[[], None]] = None):
        self._gen = gen
        self._first = first
        self._done = first.finished
        self._release = release  # called once, at close: the request leaves its admission slot
        # Set by interrupt(): the read in progress, or else the next one, raises it instead (a
        # drain ending the stream).
        self._interrupt: Optional[ApiError] = None
        self._reader: Optional[asyncio.Task] = None  # the task inside _next, while it waits
        self._cancelled_by_interrupt = False

    def interrupt(self, error: ApiError) -> None:
        if self._interrupt is None:
            self._interrupt = error
            if self._reader is not None:  # waiting for the engine: cut the wait short
                self._cancelled_by_interrupt = True
                self._reader.cancel()

    async def _next(self) -> Any:
        """The engine's next item, awaited in the caller's own task: a message costs no task
        and no asyncio.wait (the router relays every message of every stream); an interrupt
        cancels the wait instead, and the cancel becomes its error."""
        if self._interrupt is not None:
            raise self._interrupt
        self._reader = asyncio.current_task()
        try:
            return await self._gen.__anext__()
        except asyncio.CancelledError:
            if self._cancelled_by_interrupt:
                self._cancelled_by_interrupt = False
                if self._reader is not None and self._reader.uncancel() == 0:  # ours alone
                    raise self._interrupt from None
            raise  # cancelled from outside too (the client left)
        finally:
            self._reader = None

    async def deltas(self) -> AsyncIterator[GenerateDelta]:
        try:
            d = self._first
            while True:
                if isinstance(d, Refusal):
                    raise d.to_api_error()
                if not isinstance(d, GenerateDelta):
                    raise unavailable("the engine sent an unexpected item")
                if d.finish_reason == "error":
                    self._done = True
                    raise ApiError(500, d.error or "the request failed inside the engine", code="engine_error")
                self._done = d.finished
                yield d
                if self._done:
                    return
                try:
                    d = await self._next()
                except StopAsyncIteration:
                    raise unavailable("the engine stream ended before the request finished") from None
                except RayError as e:
                    # The log gets the Ray error (an actor dump, say); the client a plain sentence.
                    logger.warning("engine stream failed: %s", _short(e))
                    raise unavailable("the engine replica serving this request failed") from None
        finally:
            self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._gen.cancel()
        if self._release is not None:
            release, self._release = self._release, None
            release()


class EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its engine streams (one per choice) however the
    response ends.

    Starlette never starts the body iterator when the client is gone before
    the headers are sent, so the iterator's own cleanup would not run then.
    """

    def __init__(self, content: AsyncIterator[bytes], streams: list[EngineStream], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._engine_streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for st in self._engine_streams:
                st.close()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def choice_requests(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The engine requests of n choices: choice i gets id `<id>-<i>` and the seed
    validation.derive_seed(seed, i) (n = 1: the request itself)."""
    if n == 1:
        return [req]
    return [dataclasses.replace(req, request_id=f"{req.request_id}-{i}", params=dataclasses.replace(
        req.params, seed=validation.derive_seed(req.params.seed, i), stop=list(req.params.stop),
        stop_token_ids=list(req.params.stop_token_ids))) for i in range(n)]


async def merged(streams: list[EngineStream]) -> AsyncIterator[tuple[int, GenerateDelta]]:
    """(choice index, delta) as each choice's deltas arrive; an error in one ends all (each
    stream's own cleanup cancels its engine request)."""
    its = [st.deltas() for st in streams]
    if len(its) == 1:  # the common case, without a task per delta
        try:
            async for d in its[0]:
                yield 0, d
        finally:
            await its[0].aclose()
        return
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(its)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in sorted(done, key=lambda f: pending[f]):
                i = pending.pop(f)
                try:
                    d = f.result()
                except StopAsyncIteration:
                    continue
                yield i, d
                pending[asyncio.ensure_future(its[i].__anext__())] = i
    finally:
        for f in pending:
            f.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in its:
            await it.aclose()


async def collect(streams: list[EngineStream]) -> list[GenerateDelta]:
    """Each choice's output merged into one final delta, in choice order."""
    out: list[Optional[GenerateDelta]] = [None] * len(streams)
    async for i, d in merged(streams):
        out[i] = merge_deltas(out[i], d)
    assert all(d is not None and d.finished for d in out)
    return out  # type: ignore[return-value]


def total_usage(finals: list[GenerateDelta]) -> tuple[Usage, AcceptanceStats]:
    """Usage of n choices (the prompt counted once, as OpenAI does; completions summed) and
    their acceptance statistics summed."""
    stats = AcceptanceStats()
    for d in finals:
        if d.stats is not None:
            stats.add(d.stats)
    prompt = finals[0].usage.prompt_tokens if finals and finals[0].usage else 0
    return Usage(prompt, sum(d.usage.completion_tokens for d in finals if d.usage)), stats


class RouterFront:
    """The ingress: both protocols, auth, validation, streams and errors, over an
    EngineClient (deployment/engine_client.py). Serve hosts it as OrthrusRouter (split: the
    engine in its own deployment) or as OrthrusServer (colocated: the engine in this replica);
    `metrics` is the replica's registry when the replica already has one (colocated)."""

    def __init__(self, engine: EngineClient, settings: dict[str, Any], metrics: Any = None,
                 metrics_port: Optional[int] = None):
        from orthrus_runtime.metrics import OrthrusMetrics, start_metrics_server

        self._engine = engine
        self._model_id: str = settings["model_id"]
        self._default_max_tokens: int = settings.get("default_max_tokens", DEFAULT_MAX_TOKENS)
        self._max_body = int(settings.get("max_request_bytes", oa.DEFAULT_MAX_REQUEST_BYTES))
        self._queue_timeout_s: Optional[float] = settings.get("queue_timeout_s")
        self._keys = ApiKeys(settings.get("api_keys_env"), settings.get("api_keys_file"))
        self._created = int(time.time())
        self._info: Optional[ModelInfo] = None
        ctx = serve.get_replica_context()
        self._app_name = ctx.app_name
        self.replica = ctx.replica_id.unique_id
        self._metrics_host = settings.get("metrics_host", "127.0.0.1")
        if metrics is None:
            metrics = OrthrusMetrics(self._model_id, self.replica)
            port = settings.get("metrics_port")
            metrics_port = (start_metrics_server(metrics.registry, port, host=self._metrics_host)
                            if port is not None else None)
        self._metrics = metrics
        self._metrics.precreate_router_series()
        self.metrics_port = metrics_port
        self._draining = False
        self._streams: set[EngineStream] = set()
        # Admission (colocated): at most this many requests in this replica at once, running or
        # in the engine's queue; one more is refused at once (503 / RESOURCE_EXHAUSTED, in the
        # API's own error shape). None: Serve's queue limits alone (split: the engine deployment's).
        self._max_pending: Optional[int] = settings.get("max_pending_requests")
        self._pending = 0

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self)

    # ------------------------------------------------------------------ engine access

    async def _open(self, req: GenerateRequest) -> EngineStream:
        """Start the engine request and wait for its first delta (ApiError when refused).

        The queue deadline covers the wait for the engine's Accepted (Serve's queue and
        the engine's checks); the engine applies it again to its own queue."""
        if self._draining:
            raise shutting_down()
        release = None
        if self._max_pending is not None:
            if self._pending >= self._max_pending:
                raise overloaded(f"{self._pending} requests are running or queued on this replica, its limit")
            self._pending += 1
            release = self._release_slot
        try:
            stream = await self._start(req, release)
        except BaseException:
            if release is not None:
                release()
            raise
        if self._draining:  # drained while this one was queued
            stream.close()
            raise shutting_down()
        return stream

    def _release_slot(self) -> None:
        self._pending -= 1

    async def _start(self, req: GenerateRequest, release: Optional[Callable[[], None]]) -> EngineStream:
        gen = self._engine.generate(req)
        try:
            first = await asyncio.wait_for(gen.__anext__(), self._queue_timeout_s)
            if isinstance(first, Accepted):
                first = await gen.__anext__()
        except asyncio.TimeoutError:
            gen.cancel()
            raise overloaded(f"the request waited more than {self._queue_timeout_s:g}s in the queue",
                             code="queue_timeout") from None
        except BackPressureError as e:
            raise overloaded(str(e)) from None
        except StopAsyncIteration:
            raise unavailable("the engine ended the request without output") from None
        except (RayError, DeploymentUnavailableError) as e:
            logger.warning("request %s: engine call failed: %s", req.request_id, _short(e))
            raise unavailable("no engine replica could take the request") from None
        except BaseException:
            gen.cancel()  # cancelled while waiting (client went away): stop the engine request
            raise
        if isinstance(first, Rejection):
            raise invalid(first.message, param=first.param)
        if isinstance(first, Refusal):
            raise first.to_api_error()
        if isinstance(first, GenerateDelta) and first.finish_reason == "error":  # failed before any output
            raise ApiError(500, first.error or "the request failed inside the engine", code="engine_error")
        return EngineStream(gen, first, release)

    async def _open_choices(self, req: GenerateRequest, n: int) -> list[EngineStream]:
        """Start n choices (see choice_requests); all or none: a refusal of one closes the rest."""
        if n == 1:
            return [await self._open(req)]
        opened = await asyncio.gather(*(self._open(r) for r in choice_requests(req, n)), return_exceptions=True)
        failed = [e for e in opened if isinstance(e, BaseException)]
        if failed:
            for st in opened:
                if isinstance(st, EngineStream):
                    st.close()
            raise failed[0]
        return list(opened)  # type: ignore[arg-type]

    async def _detokenize(self, ids: list[int]) -> str:
        try:
            text = await self._engine.detokenize(ids)
        except (RayError, DeploymentUnavailableError) as e:
            logger.warning("detokenize failed: %s", _short(e))
            raise unavailable("no engine replica answered") from None
        if isinstance(text, Rejection):
            raise invalid(text.message, param=text.param)
        return text

    def _track(self, stream: EngineStream) -> None:
        self._streams.add(stream)

    def _untrack(self, stream: EngineStream) -> None:
        self._streams.discard(stream)

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await self._engine.model_info()
            except (RayError, DeploymentUnavailableError) as e:
                logger.warning("model_info failed: %s", _short(e))
                raise unavailable("no engine replica answered") from None
        return self._info

    async def _readiness(self) -> tuple[bool, str]:
        """Whether this application can serve: not draining, and its engine can take requests
        (EngineClient.ready: never a request through an engine's queue)."""
        if self._draining:
            return False, "draining"
        return await self._engine.ready()

    def replica_info(self) -> dict[str, Any]:
        """For operators and tests, over a DeploymentHandle (not routed over HTTP)."""
        return {"replica": self.replica, "metrics_port": self.metrics_port, "metrics_host": self._metrics_host,
                "auth": self._keys.enabled,
                "draining": self._draining, "in_flight": len(self._streams), "pending": self._pending}

    # ------------------------------------------------------------------ drain

    def begin_drain(self) -> dict[str, Any]:
        """Stop admitting: new requests get 503 / UNAVAILABLE with a retry hint; readiness fails."""
        self._draining = True
        return self.replica_info()

    async def end_streams(self, wait_s: float = 5.0) -> dict[str, Any]:
        """End every request still in flight with an explicit "shutting down" error (an
        SSE error event and [DONE]; a gRPC UNAVAILABLE status) and wait for them to go (up to
        wait_s: on a loaded machine the last writes take a while, and shutting down before them
        cuts the responses instead)."""
        self._draining = True
        for st in list(self._streams):
            st.interrupt(shutting_down())
        deadline = time.monotonic() + wait_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.replica_info()

    async def __del__(self):
        # Serve calls this once in-flight requests finished or graceful_shutdown_timeout_s
        # passed: end the rest explicitly rather than cut them.
        if getattr(self, "_streams", None):
            await self.end_streams()

    # ------------------------------------------------------------------ HTTP

    def _http_error(self, e: ApiError) -> JSONResponse:
        self._metrics.on_request_error(str(e.status), "http")
        headers = None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        elif e.code in RETRYABLE_CODES:
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(e.to_openai(), status_code=e.status, headers=headers)

    def _http_auth(self, request: Request) -> None:
        if not self._keys.check(bearer_token(request.headers.get("authorization"))):
            raise ApiError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    async def _http_generate(self, request: Request, chat: bool) -> Response:
        rid = None
        try:
            self._http_auth(request)
            if self._draining:
                raise shutting_down()
            body = oa.parse_json_body(await read_body(request, self._max_body))
            if chat:
                req, opts = oa.parse_chat(body, self._model_id, self._default_max_tokens)
            else:
                req, opts = oa.parse_completion(body, self._model_id)
            rid = req.request_id
            echo_text = ""
            if opts.echo:  # the prompt as sent, or the text of its token ids
                echo_text = req.prompt if req.prompt is not None else await self._detokenize(req.prompt_token_ids)
            streams = await self._open_choices(req, opts.n)
        except ApiError as e:
            return self._http_error(e)
        except Exception:  # noqa: BLE001 - never a plain-text 500
            rid = rid or f"http-{uuid.uuid4().hex}"
            logger.exception("request %s failed", rid)
            return self._http_error(internal(rid))
        self._metrics.on_choices(opts.n, "http")
        if opts.stream:
            return EngineStreamingResponse(self._sse(streams, opts, chat, echo_text), streams,
                                           media_type="text/event-stream",
                                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        for st in streams:
            self._track(st)
        try:
            finals = await collect(streams)
        except ApiError as e:
            return self._http_error(e)
        finally:
            for st in streams:
                self._untrack(st)
        usage, stats = total_usage(finals)
        if chat:
            choices = [oa.chat_choice(i, d.text, d.finish_reason, (d.logprobs or []) if opts.logprobs else None)
                       for i, d in enumerate(finals)]
            return JSONResponse(oa.chat_response(opts, choices, usage, stats))
        choices = []
        for i, d in enumerate(finals):
            lps = None
            if opts.logprobs:
                lps = (d.prompt_logprobs or []) + (d.logprobs or []) if opts.echo else (d.logprobs or [])
                lps = oa.completion_logprobs(lps)
                if opts.echo:
                    self._metrics.on_echo_prompt_tokens(len(d.prompt_logprobs or []), "http")
            choices.append(oa.completion_choice(i, echo_text + d.text, d.finish_reason, lps))
        return JSONResponse(oa.completion_response(opts, choices, usage, stats))

    async def _sse(self, streams: list[EngineStream], opts: oa.ResponseOptions, chat: bool, echo_text: str = ""):
        obj = "chat.completion.chunk" if chat else "text_completion"
        for st in streams:
            self._track(st)
        deltas = merged(streams)
        finals: list[GenerateDelta] = []
        offsets = [len(echo_text)] * len(streams)  # text_offset of each choice's next token
        started = [False] * len(streams)
        try:
            if chat:
                for i in range(len(streams)):
                    yield oa.sse(oa.chat_chunk(opts, {"role": "assistant", "content": ""}, index=i))
            async for i, d in deltas:
                if not chat and opts.echo and not started[i]:
                    started[i] = True  # the prompt first, as its own chunk (with its log-probs)
                    lps = None
                    if opts.logprobs:
                        lps = oa.completion_logprobs(d.prompt_logprobs or [])
                        self._metrics.on_echo_prompt_tokens(len(d.prompt_logprobs or []), "http")
                    yield oa.sse(oa.completion_chunk(opts, echo_text, None, i, lps))
                if not d.finished and not d.text and not (opts.logprobs and d.logprobs):
                    continue  # text held back (partial character or possible stop string)
                if chat:
                    chunk = oa.chat_chunk(opts, {"content": d.text} if d.text else {}, d.finish_reason, i,
                                          (d.logprobs or []) if opts.logprobs else None)
                else:
                    lps = None
                    if opts.logprobs:
                        lps = oa.completion_logprobs(d.logprobs or [], offsets[i])
                        offsets[i] += sum(len(t.token) for t in d.logprobs or [])
                    chunk = oa.completion_chunk(opts, d.text, d.finish_reason, i, lps)
                if d.finished:
                    chunk["orthrus"] = oa.stats_dict(d.stats)
                    finals.append(d)
                yield oa.sse(chunk)
            if opts.include_usage:
                yield oa.sse(oa.usage_chunk(opts, obj, total_usage(finals)[0]))
            yield oa.SSE_DONE
        except ApiError as e:
            # Headers are gone already: report in-band, as OpenAI does, then end the stream.
            self._metrics.on_request_error(str(e.status), "http")
            yield oa.sse(e.to_openai())
            yield oa.SSE_DONE
        finally:
            for st in streams:
                self._untrack(st)
            await deltas.aclose()

    async def completions(self, request: Request) -> Response:
        return await self._http_generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._http_generate(request, chat=True)

    async def _model_card(self) -> dict[str, Any]:
        info = await self._model_info()
        return {"id": self._model_id, "object": "model", "created": self._created, "owned_by": "orthrus",
                "max_model_len": info.max_model_len}

    async def models(self, request: Request) -> Response:
        try:
            self._http_auth(request)
            card = await self._model_card()
        except ApiError as e:
            return self._http_error(e)
        return JSONResponse({"object": "list", "data": [card]})

    async def model(self, model: str, request: Request) -> Response:
        try:
            self._http_auth(request)
            if model != self._model_id:
                raise ApiError(404, f"model '{model}' does not exist; this server serves '{self._model_id}'",
                               param="model", code="model_not_found")
            card = await self._model_card()
        except ApiError as e:
            return self._http_error(e)
        return JSONResponse(card)

    async def _http_body(self, request: Request) -> dict[str, Any]:
        self._http_auth(request)
        return oa.parse_json_body(await read_body(request, self._max_body))

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: {"prompt": str} or {"messages": [...]} -> {count, max_model_len, tokens}."""
        try:
            req = oa.parse_tokenize(await self._http_body(request), self._model_id)
            ids = await self._engine.tokenize(req)
            if isinstance(ids, Rejection):
                raise invalid(ids.message, param=ids.param)
            info = await self._model_info()
        except ApiError as e:
            return self._http_error(e)
        except (RayError, DeploymentUnavailableError) as e:
            logger.warning("tokenize failed: %s", _short(e))
            return self._http_error(unavailable("no engine replica answered"))
        return JSONResponse({"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: {"tokens": [int]} -> {"prompt": str}."""
        try:
            ids = oa.parse_detokenize(await self._http_body(request), self._model_id)
            text = await self._detokenize(ids)
        except ApiError as e:
            return self._http_error(e)
        return JSONResponse({"prompt": text})

    async def http_health(self) -> Response:
        # Liveness, open without a key: answered by this replica alone, whatever the load.
        return JSONResponse({"status": "ok", "replica": self.replica, "draining": self._draining})

    async def http_ready(self) -> Response:
        # Readiness, open without a key: whether requests sent here can be served now.
        ok, message = await self._readiness()
        return JSONResponse({"status": "ok" if ok else "unavailable", "message": message},
                            status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)})

    # ------------------------------------------------------------------ gRPC

    def _grpc_status(self, ctx: RayServegRPCContext, e: ApiError) -> None:
        self._metrics.on_request_error(e.grpc_code.name, "grpc")
        ctx.set_code(e.grpc_code)
        ctx.set_details(e.message)
        if e.code in RETRYABLE_CODES:
            # A retry hint: seconds, and gRPC's own retry-policy pushback in milliseconds.
            ctx.set_trailing_metadata([("retry-after", str(RETRY_AFTER_S)),
                                       ("grpc-retry-pushback-ms", str(RETRY_AFTER_S * 1000))])

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

    def _grpc_request(self, request: Any, ctx: RayServegRPCContext) -> tuple[GenerateRequest, grpc_protocol.Choices]:
        self._grpc_auth(ctx)
        if isinstance(request, MalformedMessage):
            raise invalid(f"the request is not a valid {request.message_type} message: {request.reason}",
                          code="malformed_message")
        if self._draining:
            raise shutting_down()
        return grpc_protocol.parse_request(request, self._default_max_tokens)

    async def _prompt_text(self, req: GenerateRequest) -> str:
        """The prompt's text for echo: as sent, or the text of its token ids (chat messages:
        with the chat template applied)."""
        if req.prompt is not None:
            return req.prompt
        ids = req.prompt_token_ids
        if ids is None:
            ids = await self._engine.tokenize(req)
            if isinstance(ids, Rejection):
                raise invalid(ids.message, param=ids.param)
        return await self._detokenize(ids)

    async def _grpc_open(self, request: Any, ctx: RayServegRPCContext):
        req, choices = self._grpc_request(request, ctx)
        echo_text = await self._prompt_text(req) if choices.echo else ""
        streams = await self._open_choices(req, choices.n)
        self._metrics.on_choices(choices.n, "grpc")
        return req, choices, echo_text, streams

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext):
        rid = None
        try:
            req, choices, echo_text, streams = await self._grpc_open(request, grpc_context)
            rid = req.request_id
        except ApiError as e:
            raise self._grpc_fail(grpc_context, e) from None
        except Exception:  # noqa: BLE001 - never an exception text for the client
            rid = rid or f"grpc-{uuid.uuid4().hex}"
            logger.exception("request %s failed", rid)
            raise self._grpc_fail(grpc_context, internal(rid)) from None
        for st in streams:
            self._track(st)
        deltas = merged(streams)
        started = [False] * len(streams)
        try:
            async for i, d in deltas:
                if d.finished or d.text or d.token_ids or d.prompt_logprobs:
                    first = not started[i]
                    started[i] = True
                    if d.prompt_logprobs and choices.echo:
                        self._metrics.on_echo_prompt_tokens(len(d.prompt_logprobs), "grpc")
                    yield grpc_protocol.delta_to_response(d, i, echo_text=echo_text if first else "")
        except ApiError as e:
            raise self._grpc_fail(grpc_context, e) from None
        finally:
            for st in streams:
                self._untrack(st)
            await deltas.aclose()

    async def Complete(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        rid, streams = None, []
        try:
            req, choices, echo_text, streams = await self._grpc_open(request, grpc_context)
            rid = req.request_id
            for st in streams:
                self._track(st)
            finals = await collect(streams)
        except ApiError as e:
            # A unary method returns: Serve applies the status set on the context,
            # and the client sees only that status (no exception logged for a 4xx).
            self._grpc_status(grpc_context, e)
            return pb.GenerateResponse()
        except Exception:  # noqa: BLE001
            rid = rid or f"grpc-{uuid.uuid4().hex}"
            logger.exception("request %s failed", rid)
            self._grpc_status(grpc_context, internal(rid))
            return pb.GenerateResponse()
        finally:
            for st in streams:
                self._untrack(st)
        if choices.echo:
            self._metrics.on_echo_prompt_tokens(sum(len(d.prompt_logprobs or []) for d in finals), "grpc")
        return grpc_protocol.complete_response([
            grpc_protocol.final_response(d.request_id, d.text, d.token_ids, d,
                                         index=i, echo_text=echo_text, logprobs=d.logprobs,
                                         prompt_logprobs=d.prompt_logprobs)
            for i, d in enumerate(finals)])

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> pb.ModelInfoResponse:
        try:
            self._grpc_auth(grpc_context)
            info = await self._model_info()
        except ApiError as e:
            self._grpc_status(grpc_context, e)
            return pb.ModelInfoResponse()
        return grpc_protocol.model_info_response(info, self._model_id)

    async def Health(self, request: pb.HealthRequest, grpc_context: RayServegRPCContext) -> pb.HealthResponse:
        # Readiness (see /ready); a replica that answers at all is alive.
        ok, message = await self._readiness()
        status = pb.HealthResponse.STATUS_SERVING if ok else pb.HealthResponse.STATUS_NOT_SERVING
        return pb.HealthResponse(status=status, message=message)


class _SplitRouter(RouterFront):
    """The split topology's ingress: the engine is the OrthrusEngine deployment, over a handle."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]):
        super().__init__(HandleEngineClient(engine, serve.get_replica_context().app_name, ENGINE_DEPLOYMENT_NAME),
                         settings)


OrthrusRouter = serve.deployment(
    name=ROUTER_DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1024,
    max_queued_requests=2048,
)(serve.ingress()(_SplitRouter))
