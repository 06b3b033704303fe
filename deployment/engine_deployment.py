"""The split topology's engine deployment: one EngineHost per replica (one GPU each, or CPU),
its engine core in a child process of the replica.

A thin shim in the Ray Serve LLM style: the host already exposes an async generator per
request, and this class forwards it over a DeploymentHandle stream to the router
(deployment/router.py). The colocated topology hosts the same EngineHost in its ingress
replica instead (deployment/server.py).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Union

from ray import serve

from orthrus_runtime.types import EngineStats, GenerateDelta, GenerateRequest, ModelInfo

from .engine_host import ENGINE_HOST_OPTIONS, EngineHost
from .errors import Accepted, Refusal, Rejection

ENGINE_DEPLOYMENT_NAME = "OrthrusEngine"


@serve.deployment(name=ENGINE_DEPLOYMENT_NAME, max_ongoing_requests=64, max_queued_requests=256,
                  **ENGINE_HOST_OPTIONS)
class OrthrusEngine:
    def __init__(self, engine_args: dict[str, Any], model_id: str, metrics_port: Optional[int] = None,
                 stream_interval_s: float = 0.0, queue_timeout_s: Optional[float] = None,
                 metrics_host: str = "127.0.0.1", stream_messages_per_s: Optional[float] = None):
        ctx = serve.get_replica_context()
        self._host = EngineHost(engine_args, model_id, ctx.replica_id.unique_id, ctx.replica_id.to_full_id_str(),
                                metrics_port=metrics_port, stream_interval_s=stream_interval_s,
                                queue_timeout_s=queue_timeout_s, metrics_host=metrics_host,
                                stream_messages_per_s=stream_messages_per_s)
        self.metrics_port = self._host.metrics_port

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Union[GenerateDelta, Rejection, Refusal,
                                                                               Accepted]]:
        """EngineHost.generate, streamed to the caller; the caller's cancel closes it (and
        so aborts the engine request)."""
        gen = self._host.generate(request)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()  # at once, not when collected: it aborts the engine request

    def model_info(self) -> ModelInfo:
        return self._host.model_info()

    async def tokenize(self, request: GenerateRequest) -> Union[list[int], Rejection]:
        return await self._host.tokenize(request)

    async def detokenize(self, ids: list[int]) -> Union[str, Rejection]:
        return await self._host.detokenize(ids)

    async def stats(self) -> EngineStats:
        return await self._host.stats()

    def health(self) -> dict[str, Any]:
        return self._host.health()

    async def abort(self, request_id: str) -> None:
        await self._host.abort(request_id)

    def check_health(self) -> None:
        self._host.check_health()

    async def __del__(self):
        # Serve calls this once in-flight requests finished or graceful_shutdown_timeout_s
        # passed: what is still running ends with an explicit "shutting down" error, then the
        # engine core process stops.
        host = getattr(self, "_host", None)
        if host is not None:
            await host.close()
