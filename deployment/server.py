"""The colocated topology: one deployment, OrthrusServer, whose replicas are both the ingress
(HTTP and gRPC, RouterFront) and an engine host (EngineHost, the engine core in a child
process on the replica's GPU).

A stream message then crosses one Ray hop (proxy -> replica) instead of two (proxy ->
router -> engine replica): on an H200 at concurrency 64 the router hop cost about 30 % of
the served throughput and 200 ms of TTFT (docs/performance.md). Serve's proxy routes each
request to a replica by its queue length (power of two choices), autoscales the deployment
on ongoing requests, and applies max_ongoing_requests / max_queued_requests, as it does for
the split topology's engine deployment; auth, validation, metrics and both protocols are
RouterFront's, unchanged.
"""
# No `from __future__ import annotations` here (see router.py).
import logging
from typing import Any, Optional

from ray import serve

from .engine_client import LocalEngineClient
from .engine_host import ENGINE_HOST_OPTIONS, EngineHost
from .router import RouterFront


logger = logging.getLogger("ray.serve")

SERVER_DEPLOYMENT_NAME = "OrthrusServer"


class _ColocatedServer(RouterFront):
    def __init__(self, engine_args: dict[str, Any], settings: dict[str, Any], stream_interval_s: float = 0.0,
                 stream_messages_per_s: Optional[float] = None):
        ctx = serve.get_replica_context()
        self._host = EngineHost(engine_args, settings["model_id"], ctx.replica_id.unique_id,
                                ctx.replica_id.to_full_id_str(), metrics_port=settings.get("metrics_port"),
                                stream_interval_s=stream_interval_s,
                                queue_timeout_s=settings.get("queue_timeout_s"),
                                metrics_host=settings.get("metrics_host", "127.0.0.1"),
                                stream_messages_per_s=stream_messages_per_s)
        super().__init__(LocalEngineClient(self._host), settings, metrics=self._host.metrics,
                         metrics_port=self._host.metrics_port)

    # The engine deployment's operator methods, over a handle (benchmarks, tests).
    def health(self) -> dict[str, Any]:
        return self._host.health()

    def model_info(self):
        return self._host.model_info()

    async def stats(self):
        return await self._host.stats()

    def check_health(self) -> None:
        # Serve restarts a replica whose check raises: here, a dead or hung engine loop.
        self._host.check_health()

    async def __del__(self):
        # Serve calls this once in-flight requests finished or graceful_shutdown_timeout_s
        # passed: end the streams still open with an explicit "shutting down" error, then stop
        # the engine core process.
        if getattr(self, "_streams", None):
            await self.end_streams()
        host = getattr(self, "_host", None)
        if host is not None:
            await host.close()


OrthrusServer = serve.deployment(
    name=SERVER_DEPLOYMENT_NAME,
    # The replica admits (RouterFront's max_pending_requests, 2 x max_num_seqs unless set) and
    # refuses in the API's error shape; Serve's limits sit above it. The engine's own queue then
    # starts a request the moment a sequence finishes, where Serve's queue would retry with a
    # backoff of up to 0.5 s, and a full replica answers 503 JSON, not the proxy's plain text.
    max_ongoing_requests=1024,
    max_queued_requests=256,
    **ENGINE_HOST_OPTIONS,
)(serve.ingress()(_ColocatedServer))
