"""Application builder: the config's `import_path: deployment.app:build_app`.

Serve calls build_app with the application's `args` from the config; the
`deployments:` section of the same config then overrides per-deployment options
(replicas, autoscaling, queue limits, GPUs) by deployment name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ray import serve

from orthrus_runtime.defaults import DEFAULT_MAX_TOKENS
from orthrus_runtime.engine.args import EngineArgs, from_known_fields

from .engine_deployment import OrthrusEngine
from .router import OrthrusRouter
from .server import OrthrusServer

TOPOLOGIES = ("split", "colocated")


@dataclass
class AppArgs:
    # "split": an OrthrusRouter deployment (the ingress, CPU) in front of an OrthrusEngine
    # deployment (one engine per GPU), two Ray hops a stream message. "colocated": one
    # OrthrusServer deployment, the ingress and the engine in each GPU replica, one hop.
    # The config's `deployments:` section names the deployments of the topology chosen.
    topology: str = "split"
    # EngineArgs fields (orthrus_runtime/engine/args.py); unknown keys are refused.
    engine: dict[str, Any] = field(default_factory=dict)
    # The name served in /v1/models, checked against each request's `model`.
    model_id: str = "orthrus"
    # API keys: a comma-separated environment variable and/or a file with one key
    # per line. Auth is off when neither yields a key (see deployment/auth.py).
    api_keys_env: Optional[str] = "ORTHRUS_API_KEYS"
    api_keys_file: Optional[str] = None
    # Each replica (engine and router) serves Prometheus metrics here, or on the
    # next free port when another replica on the node holds it; null: off.
    metrics_port: Optional[int] = 8085
    # Address the metrics endpoints bind: loopback unless scraped from elsewhere (the
    # Helm chart sets 0.0.0.0, where Prometheus scrapes each pod).
    metrics_host: str = "127.0.0.1"
    # max_tokens when a chat or gRPC request leaves it unset (/v1/completions keeps OpenAI's 16).
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    # Minimum time between two stream messages of one request; deltas arriving
    # sooner are merged (deployment/streaming.py). 0: one message per delta.
    stream_interval_s: float = 0.05
    # With this set, the interval follows the load: an engine replica's stream messages per
    # second are spread over its streams in flight, min(stream_interval_s, streams / this), so
    # that a lone stream gets every cycle's tokens as they come. null: the fixed interval.
    stream_messages_per_s: Optional[float] = None
    # Colocated: a replica holds at most this many requests, running or in its engine's queue,
    # and refuses the next at once (503 overloaded / RESOURCE_EXHAUSTED); null: 2 x max_num_seqs.
    # (Split: the engine deployment's max_ongoing_requests and max_queued_requests.)
    max_pending_requests: Optional[int] = None
    # Request bodies above this many bytes are refused with HTTP 413.
    max_request_bytes: int = 1 << 20
    # A request waiting longer than this for the engine (Serve's queue, then the engine's
    # own) is refused with 503 / RESOURCE_EXHAUSTED and a retry hint; null: no deadline.
    queue_timeout_s: Optional[float] = 30.0

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "AppArgs":
        a = from_known_fields(cls, d, "application arg")
        if not isinstance(a.engine, dict):
            raise ValueError("args.engine must be a mapping of EngineArgs fields")
        EngineArgs.from_dict(a.engine)  # fail at deploy time, not in every replica
        if a.topology not in TOPOLOGIES:
            raise ValueError(f"args.topology must be one of {', '.join(TOPOLOGIES)}, got {a.topology!r}")
        if not isinstance(a.model_id, str) or not a.model_id:
            raise ValueError("args.model_id must be a non-empty string")
        if a.metrics_port is not None and not (isinstance(a.metrics_port, int) and 0 <= a.metrics_port < 65536):
            raise ValueError(f"args.metrics_port must be a port number (0: any free port) or null, got {a.metrics_port!r}")
        if not (isinstance(a.default_max_tokens, int) and a.default_max_tokens >= 1):
            raise ValueError("args.default_max_tokens must be a positive integer")
        if not (isinstance(a.stream_interval_s, (int, float)) and 0 <= a.stream_interval_s <= 1):
            raise ValueError("args.stream_interval_s must be a number of seconds in [0, 1]")
        if a.stream_messages_per_s is not None and not (
                isinstance(a.stream_messages_per_s, (int, float)) and not isinstance(a.stream_messages_per_s, bool)
                and a.stream_messages_per_s > 0):
            raise ValueError("args.stream_messages_per_s must be a positive number of messages a second or null")
        if not (isinstance(a.metrics_host, str) and a.metrics_host):
            raise ValueError("args.metrics_host must be an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
        if not (isinstance(a.max_request_bytes, int) and not isinstance(a.max_request_bytes, bool)
                and a.max_request_bytes >= 1024):
            raise ValueError("args.max_request_bytes must be an integer of at least 1024")
        if a.max_pending_requests is not None and not (
                isinstance(a.max_pending_requests, int) and not isinstance(a.max_pending_requests, bool)
                and a.max_pending_requests >= 1):
            raise ValueError("args.max_pending_requests must be a positive integer or null")
        if a.queue_timeout_s is not None and not (isinstance(a.queue_timeout_s, (int, float))
                                                  and a.queue_timeout_s > 0):
            raise ValueError("args.queue_timeout_s must be a positive number of seconds or null")
        return a


def build_app(args: Optional[dict[str, Any]] = None) -> serve.Application:
    a = AppArgs.from_dict(args)
    engine_args = EngineArgs.from_dict(a.engine)
    cpu = engine_args.device == "cpu"
    queue_timeout_s = float(a.queue_timeout_s) if a.queue_timeout_s is not None else None
    stream_interval_s = float(a.stream_interval_s)
    messages_per_s = float(a.stream_messages_per_s) if a.stream_messages_per_s is not None else None
    settings = {
        "model_id": a.model_id,
        "api_keys_env": a.api_keys_env,
        "api_keys_file": a.api_keys_file,
        "metrics_port": a.metrics_port,
        "metrics_host": a.metrics_host,
        "default_max_tokens": a.default_max_tokens,
        "max_request_bytes": a.max_request_bytes,
        "queue_timeout_s": queue_timeout_s,
    }
    # A CPU engine must not wait for a GPU; the config's ray_actor_options still win.
    if a.topology == "colocated":
        settings["max_pending_requests"] = a.max_pending_requests or 2 * engine_args.max_num_seqs
        server = OrthrusServer.options(ray_actor_options={"num_gpus": 0}) if cpu else OrthrusServer
        return server.bind(a.engine, settings, stream_interval_s, messages_per_s)
    engine = OrthrusEngine.options(ray_actor_options={"num_gpus": 0}) if cpu else OrthrusEngine
    engine_app = engine.bind(a.engine, a.model_id, a.metrics_port, stream_interval_s, queue_timeout_s,
                             a.metrics_host, messages_per_s)
    return OrthrusRouter.bind(engine_app, settings)
