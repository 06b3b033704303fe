"""The engine deployment: one AsyncOrthrusEngine per replica (one GPU each, or CPU).

A thin shim in the Ray Serve LLM style: the engine already exposes an async
generator per request, and this class forwards it over a DeploymentHandle
stream. Everything crossing the handle is a plain data class from
orthrus_runtime.types (picklable, no torch objects).
"""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional, Union

from ray import serve

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.types import (
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
)

from .errors import Rejection
from .streaming import coalesce

logger = logging.getLogger("ray.serve")

ENGINE_DEPLOYMENT_NAME = "OrthrusEngine"


@serve.deployment(
    name=ENGINE_DEPLOYMENT_NAME,
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    # Loading a model takes a while; a replica is only killed after a few
    # consecutive failed checks of a dead step loop, never for being slow to start.
    health_check_period_s=5,
    health_check_timeout_s=30,
    # On scale-down or redeploy, in-flight requests get this long to finish
    # before __del__ aborts what is left.
    graceful_shutdown_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
)
class OrthrusEngine:
    def __init__(self, engine_args: dict[str, Any], model_id: str, metrics_port: Optional[int] = None,
                 stream_interval_s: float = 0.0):
        # Imported here so that building the application (in Serve's controller)
        # never imports torch; only replicas load the model stack.
        from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
        from orthrus_runtime.metrics import OrthrusMetrics, start_metrics_server

        self._stream_interval_s = stream_interval_s
        ctx = serve.get_replica_context()
        self._replica = ctx.replica_id.unique_id
        self._actor_name = ctx.replica_id.to_full_id_str()  # the Ray actor's name (namespace "serve")
        self._metrics = OrthrusMetrics(model_id, self._replica)
        self.metrics_port = (
            start_metrics_server(self._metrics.registry, metrics_port) if metrics_port is not None else None
        )
        args = EngineArgs.from_dict(engine_args)
        self._engine = AsyncOrthrusEngine.from_args(args, stat_logger=self._metrics)
        self._metrics.bind_engine_stats(self._engine.stats)
        info = self._engine.model_info()
        logger.info(
            "engine replica %s ready: %s (%s, block size %d, max_model_len %d), metrics on port %s",
            self._replica, model_id, info.architecture, info.block_size, info.max_model_len, self.metrics_port,
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Union[GenerateDelta, Rejection]]:
        """Stream the request's deltas; yields one Rejection instead when the engine refuses it.

        Deltas are merged so that messages leave at most every stream_interval_s
        (see deployment/streaming.py). Closing this generator (the caller
        cancelled: client disconnect, gRPC cancel) closes the engine's stream,
        which aborts the request and frees its KV blocks.
        """
        stream = coalesce(self._engine.generate(request), self._stream_interval_s)
        started = False
        try:
            async for delta in stream:
                started = True
                yield delta
        except InvalidRequestError as e:
            if started:
                raise
            yield Rejection(str(e))
        finally:
            await stream.aclose()

    def model_info(self) -> ModelInfo:
        return self._engine.model_info()

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def health(self) -> dict[str, Any]:
        return {
            "alive": self._engine.is_alive(),
            "replica": self._replica,
            "actor_name": self._actor_name,
            "metrics_port": self.metrics_port,
        }

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def check_health(self) -> None:
        # Serve restarts a replica whose check raises; a dead step loop can serve nothing.
        if not self._engine.is_alive():
            raise RuntimeError(f"engine step loop of replica {self._replica} has died")

    def __del__(self):
        # Serve calls this after graceful_shutdown_timeout_s: whatever is still
        # running is aborted and the step-loop thread stopped.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
