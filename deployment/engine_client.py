"""How the ingress reaches its engine: one interface, two topologies.

- HandleEngineClient (split): the engine runs in its own deployment (OrthrusEngine); every
  call is a Ray call over a DeploymentHandle, and each stream message crosses one more Ray
  hop (proxy -> router -> engine replica).
- LocalEngineClient (colocated): the engine runs in the ingress replica itself (OrthrusServer);
  every call is a plain await on its EngineHost, and a stream message crosses only the
  proxy's hop.

A call to generate() returns an EngineCall: `__anext__` gives the next item (Accepted,
GenerateDelta, Rejection or Refusal, see deployment/errors.py) and `cancel()` stops the
engine request unless it already ended. Ray's DeploymentResponseGenerator is one already.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Protocol, Union

from orthrus_runtime.types import GenerateRequest, ModelInfo

from .errors import Rejection

# Readiness asks Serve's controller at most this often, and waits this long for it.
READY_CACHE_S = 1.0
READY_TIMEOUT_S = 5.0


class EngineCall(Protocol):
    def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    def generate(self, req: GenerateRequest) -> EngineCall: ...

    async def tokenize(self, req: GenerateRequest) -> Union[list[int], Rejection]: ...

    async def detokenize(self, ids: list[int]) -> Union[str, Rejection]: ...

    async def model_info(self) -> ModelInfo: ...

    async def ready(self) -> tuple[bool, str]:
        """Whether an engine can take requests now, and why not; never through a request queue."""
        ...


class HandleEngineClient:
    """The engine deployment `deployment_name` of application `app_name`, over `handle`.
    Its calls raise Ray's errors (RayError, DeploymentUnavailableError, BackPressureError)
    when no replica answers; the router turns them into ApiErrors."""

    def __init__(self, handle: Any, app_name: str, deployment_name: str):
        self._handle = handle
        self._app_name = app_name
        self._deployment_name = deployment_name
        self._stream = handle.options(stream=True)
        self._ready: tuple[float, bool, str] = (0.0, False, "not checked yet")

    def generate(self, req: GenerateRequest) -> EngineCall:
        return self._stream.generate.remote(req)

    async def tokenize(self, req: GenerateRequest) -> Union[list[int], Rejection]:
        return await self._handle.tokenize.remote(req)

    async def detokenize(self, ids: list[int]) -> Union[str, Rejection]:
        return await self._handle.detokenize.remote(ids)

    async def model_info(self) -> ModelInfo:
        return await self._handle.model_info.remote()

    async def ready(self) -> tuple[bool, str]:
        """Serve's controller counts a healthy engine replica (whose check reads the engine
        loop's heartbeat); cached for READY_CACHE_S."""
        from ray import serve

        t, ok, msg = self._ready
        if time.monotonic() - t < READY_CACHE_S:
            return ok, msg
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), READY_TIMEOUT_S)
            app = status.applications.get(self._app_name)
            dep = app.deployments.get(self._deployment_name) if app is not None else None
            running = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
            ok, msg = (running > 0, f"{running} engine replica(s) running" if running else "no engine replica running")
        except Exception as e:  # noqa: BLE001 - the controller being unreachable means not ready
            ok, msg = False, f"Serve's controller did not answer ({type(e).__name__})"
        self._ready = (time.monotonic(), ok, msg)
        return ok, msg


class LocalCall:
    """One EngineHost.generate stream, read in the caller's task (no task, no queue per
    message). cancel() closes the generator, which aborts the engine request; when a reader
    is inside it at that moment (the generator cannot be closed under it) the engine request
    is aborted instead, and the reader gets its final delta."""

    def __init__(self, host: Any, req: GenerateRequest, pending: set):
        self._host = host
        self._request_id = req.request_id
        self._gen: AsyncIterator[Any] = host.generate(req)
        self._pending = pending  # the client's cleanup tasks, held until they end
        self._cancelled = False

    def __anext__(self) -> Any:
        return self._gen.__anext__()

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        running = getattr(self._gen, "ag_running", False)
        task = asyncio.get_running_loop().create_task(
            self._host.abort(self._request_id) if running else self._gen.aclose())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class LocalEngineClient:
    """The EngineHost of this very replica (the colocated topology)."""

    def __init__(self, host: Any):
        self._host = host
        self._pending: set[asyncio.Task] = set()

    def generate(self, req: GenerateRequest) -> EngineCall:
        return LocalCall(self._host, req, self._pending)

    async def tokenize(self, req: GenerateRequest) -> Union[list[int], Rejection]:
        return await self._host.tokenize(req)

    async def detokenize(self, ids: list[int]) -> Union[str, Rejection]:
        return await self._host.detokenize(ids)

    async def model_info(self) -> ModelInfo:
        return self._host.model_info()

    async def ready(self) -> tuple[bool, str]:
        if self._host.is_alive():
            return True, "the engine of this replica is running"
        return False, "the engine of this replica is not running"
