"""EngineHost: one AsyncOrthrusEngine inside a Serve replica, as plain async methods.

Both topologies host the engine through this class: the split one's OrthrusEngine deployment
forwards its methods over a DeploymentHandle (engine_deployment.py); the colocated
OrthrusServer calls them in the ingress replica itself (server.py). It owns the engine (its
core in a child process on the replica's GPU), the replica's stream pacer and its metrics
registry. Everything it returns is a plain data class from orthrus_runtime.types or
deployment.errors (picklable, no torch objects), so it crosses a Ray boundary intact.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Optional, Union

from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.types import (
    EngineDeadError,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    RequestRefusedError,
)

from .errors import Accepted, Refusal, Rejection
from .streaming import StreamPacer

logger = logging.getLogger("ray.serve")

# Serve options of every deployment whose replicas host an engine (OrthrusEngine, OrthrusServer).
# Loading a model takes a while; a replica is only killed after a few consecutive failed checks
# of a dead or hung step loop (its heartbeat), never for being slow to start. On scale-down or
# redeploy, in-flight requests get graceful_shutdown_timeout_s before __del__ ends the rest.
ENGINE_HOST_OPTIONS = dict(ray_actor_options={"num_gpus": 1}, health_check_period_s=5, health_check_timeout_s=30,
                           graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=1)


def process_start_time() -> Optional[float]:
    """This process's start as a Unix time, from /proc (Linux); None elsewhere."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


class EngineHost:
    def __init__(self, engine_args: dict[str, Any], model_id: str, replica: str, actor_name: str,
                 metrics_port: Optional[int] = None, stream_interval_s: float = 0.0,
                 queue_timeout_s: Optional[float] = None, metrics_host: str = "127.0.0.1",
                 stream_messages_per_s: Optional[float] = None):
        t_init = time.time()
        # Imported here so that building the application (in Serve's controller, or a router
        # replica) never imports torch; only replicas that host an engine load the model stack.
        from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
        from orthrus_runtime.metrics import OrthrusMetrics, start_metrics_server

        self.replica = replica
        self._actor_name = actor_name
        self._pacer = StreamPacer(stream_interval_s, stream_messages_per_s)
        self.metrics = OrthrusMetrics(model_id, replica)
        self.metrics_port = (
            start_metrics_server(self.metrics.registry, metrics_port, host=metrics_host)
            if metrics_port is not None else None
        )
        args = EngineArgs.from_dict(engine_args)
        # The engine core steps in a process of its own (on this replica's GPU), out of the way
        # of this actor's event loop and Ray's streams.
        self._engine = AsyncOrthrusEngine.from_args(args, stat_logger=self.metrics, queue_timeout_s=queue_timeout_s)
        self.metrics.bind_engine_stats(self._engine.stats)
        info = self._engine.model_info()
        self.metrics.precreate_positions(info.block_size - 1)
        # Where the replica's start-up went: the actor process's start to this __init__ (Ray and
        # Serve), then __init__ itself (imports, the engine core process: health's startup_s).
        started = process_start_time()
        self._startup_s = {"actor_start_to_init": round(t_init - started, 2) if started else None,
                           "replica_init": round(time.time() - t_init, 2)}
        logger.info(
            "engine replica %s ready: %s (%s, block size %d, max_model_len %d), metrics on port %s",
            replica, model_id, info.architecture, info.block_size, info.max_model_len, self.metrics_port,
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Union[GenerateDelta, Rejection, Refusal,
                                                                               Accepted]]:
        """Accepted, then the request's deltas; or one Rejection / Refusal instead.

        Refusals are values, not exceptions, so that the reason crosses the Ray
        boundary intact. Deltas are merged so that one stream's messages leave
        at most every stream_interval_s, closer together while few streams share the replica's
        stream_messages_per_s (see deployment/streaming.py). Closing this generator (the
        caller cancelled: client disconnect, gRPC cancel) closes the engine's
        stream, which aborts the request and frees its KV blocks.
        """
        try:
            engine_stream = await self._engine.submit(request)
        except InvalidRequestError as e:
            yield Rejection(str(e), e.param)
            return
        except RequestRefusedError as e:
            yield Refusal(str(e), e.reason)
            return
        except EngineDeadError:
            yield Refusal("the engine loop is not running", "unavailable")
            return
        stream = self._pacer.relay(engine_stream)
        try:
            yield Accepted()
            async for delta in stream:
                yield delta
        except RequestRefusedError as e:  # the queue deadline passed, or the engine is draining
            yield Refusal(str(e), e.reason)
        except EngineDeadError:
            yield Refusal("the engine loop died", "unavailable")
        finally:
            await stream.aclose()

    def model_info(self) -> ModelInfo:
        return self._engine.model_info()

    async def tokenize(self, request: GenerateRequest) -> Union[list[int], Rejection]:
        """The prompt's token ids (chat template applied), or a Rejection."""
        try:
            return await self._engine.tokenize(request)
        except InvalidRequestError as e:
            return Rejection(str(e), e.param)

    async def detokenize(self, ids: list[int]) -> Union[str, Rejection]:
        try:
            return await self._engine.detokenize(ids)
        except InvalidRequestError as e:
            return Rejection(str(e), e.param)

    async def stats(self) -> EngineStats:
        # Answered by the engine core process: wait off this actor's event loop.
        return await asyncio.to_thread(self._engine.stats)

    def health(self) -> dict[str, Any]:
        return {
            **self._engine.health(),
            "replica": self.replica,
            "pid": os.getpid(),
            "actor_name": self._actor_name,
            "metrics_port": self.metrics_port,
            "replica_startup_s": self._startup_s,
        }

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def is_alive(self) -> bool:
        return self._engine.is_alive()

    def check_health(self) -> None:
        # Serve restarts a replica whose check raises; a dead or hung step loop (no
        # heartbeat for stall_timeout_s) can serve nothing. Serve calls this on the
        # actor directly, not through the request queue, so load does not fail it.
        if not self._engine.is_alive():
            raise RuntimeError(f"engine step loop of replica {self.replica} is not running")

    async def close(self) -> None:
        """End what is still running with an explicit "shutting down" error (delivered while
        this loop runs), then stop the engine core process."""
        ended = await self._engine.drain(0.0)
        if ended:
            logger.info("engine replica %s stopping: ended %d request(s) still running", self.replica, ended)
        self._engine.shutdown()
