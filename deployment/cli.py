"""`orthrus serve [--config FILE]`: start a local Ray, deploy the config, serve until Ctrl-C.

This is what `serve run FILE` does (same config schema, same deploy call), plus
waiting for the applications to come up, printing the addresses it bound, and a
graceful drain on SIGINT or SIGTERM before tearing Serve and Ray down: the routers
stop admitting (503 with Retry-After / UNAVAILABLE), in-flight requests get
--drain-timeout seconds to finish, the rest end with an explicit error (an SSE error
event and [DONE]; a gRPC UNAVAILABLE status), and only then do the proxies go.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Optional

from .config import DEFAULT_CONFIG, load_config
from .ingress import DEFAULT_INGRESS, INGRESS_MODES, HandleCaller, ingress_mode, use_ingress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="Ray Serve config file (default: the embedded SmolLM2 on CPU, %(default)s)")
    parser.add_argument("--http-port", type=int, default=None, help="override http_options.port")
    parser.add_argument("--grpc-port", type=int, default=None, help="override grpc_options.port")
    parser.add_argument("--address", default=None,
                        help="connect to this Ray cluster instead of starting a local one (e.g. auto)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--ray-temp-dir", default=None, help="temp/log folder of the local Ray (default: Ray's)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="give up when the applications are not running after this many seconds (0: wait)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGINT/SIGTERM, seconds in-flight requests get to finish (default %(default)s)")
    parser.add_argument("--ingress", choices=INGRESS_MODES, default=DEFAULT_INGRESS,
                        help="how traffic reaches the replicas: haproxy (Ray Serve's throughput-optimized "
                        "mode, HAProxy straight to each replica's own servers) or proxy (Ray Serve's proxy "
                        "actor); a local Ray only, a cluster's is set where it starts (default %(default)s)")


# gRPC messages above this are refused by grpcio in the proxy (RESOURCE_EXHAUSTED); Ray
# Serve's own default is 2 GiB. Read by the proxies, which inherit this environment.
GRPC_MAX_MESSAGE_BYTES = 4 * 2**20


def deploy(config) -> None:
    """Start Serve with the config's proxies and deploy its applications (Ray must be up).

    The same calls as `serve run FILE` (ray/serve/scripts.py), so a config behaves
    here exactly as under `serve run` / `serve deploy`.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


def wait_running(app_names: list[str], timeout: float = 0, log=None) -> Optional[str]:
    """Wait until every application is RUNNING; returns an error message instead on failure."""
    from ray import serve

    deadline = time.monotonic() + timeout if timeout > 0 else None
    last = ""
    while True:
        status = serve.status()
        states = {name: status.applications.get(name) for name in app_names}
        for name, app in states.items():
            if app is None:
                continue
            if app.status == "DEPLOY_FAILED":
                return f"application {name!r} failed to deploy:\n{app.message}"
            for dname, d in app.deployments.items():
                if d.status == "DEPLOY_FAILED":
                    return f"deployment {name}/{dname} failed:\n{d.message}"
        if all(app is not None and app.status == "RUNNING" for app in states.values()):
            return None
        summary = ", ".join(f"{n}: {a.status if a else 'NOT_STARTED'}" for n, a in states.items())
        if log is not None and summary != last:
            log(f"waiting for applications ({summary})")
            last = summary
        if deadline is not None and time.monotonic() > deadline:
            return f"applications not running after {timeout:.0f}s ({summary})"
        time.sleep(0.5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _routers(caller: HandleCaller, app_names: list[str], call: str, *args: Any,
             tries: int = 64) -> list[dict[str, Any]]:
    """Call `call` on every ingress replica of the applications: a handle picks a replica
    per call, so call until every running replica has answered (at most `tries` calls)."""
    from ray import serve

    from .router import ROUTER_DEPLOYMENT_NAME
    from .server import SERVER_DEPLOYMENT_NAME

    out = []
    for name in app_names:
        app = serve.status().applications.get(name)
        # The ingress of the application's topology: the router (split) or the server (colocated).
        ingress = next((d for d in (ROUTER_DEPLOYMENT_NAME, SERVER_DEPLOYMENT_NAME)
                        if app is not None and d in app.deployments), ROUTER_DEPLOYMENT_NAME)
        dep = app.deployments.get(ingress) if app is not None else None
        want = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(tries):
            if len(seen) >= want:
                break
            try:
                info = caller.call(name, ingress, call, *args, timeout_s=30)
            except Exception as e:  # noqa: BLE001 - a replica going away must not stop the drain
                _err(f"drain: {name}: {call} failed ({type(e).__name__})")
                break
            seen[info["replica"]] = info
        out += seen.values()
    return out


def drain(caller: HandleCaller, app_names: list[str], timeout_s: float, log=None) -> None:
    """Stop admitting, wait up to timeout_s for in-flight requests, end the rest explicitly."""
    log = log or _err
    _routers(caller, app_names, "begin_drain")
    deadline = time.monotonic() + timeout_s
    while True:
        in_flight = sum(r["in_flight"] for r in _routers(caller, app_names, "replica_info"))
        if in_flight == 0:
            break
        if time.monotonic() >= deadline:
            log(f"drain: ending {in_flight} request(s) still in flight after {timeout_s:g}s")
            _routers(caller, app_names, "end_streams")
            break
        time.sleep(0.2)


def _bound_http(host: str) -> str:
    return f"{host}" if host not in ("", "::") else "[::]"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if not args.address:
        use_ingress(args.ingress)  # before anything imports Ray Serve, which reads it once
    try:
        config = load_config(args.config, http_port=args.http_port, grpc_port=args.grpc_port)
    except Exception as e:  # a missing file or a schema error: say what, without a traceback
        _err(f"orthrus serve: invalid config {args.config}: {e}")
        return 2

    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    # Our own handlers for both: a process started in the background inherits an ignored
    # SIGINT, and SIGTERM (docker stop, kill) must take the same draining path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(GRPC_MAX_MESSAGE_BYTES))
    init_kwargs = {"namespace": SERVE_NAMESPACE}
    if args.address:
        init_kwargs["address"] = args.address
    else:
        init_kwargs.update(address="local", num_cpus=args.num_cpus)
        if args.ray_temp_dir:
            init_kwargs["_temp_dir"] = args.ray_temp_dir
    ray.init(**init_kwargs)
    # Again: ray.init installs its core worker's own SIGTERM handler (it aborted the process
    # without a drain); ours must be the last one set.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    rc = 0
    names = [a.name for a in config.applications]
    serving = False
    caller = HandleCaller()
    try:
        deploy(config)
        error = wait_running(names, args.timeout, log=_err)
        if error:
            _err(f"orthrus serve: {error}")
            rc = 1
        else:
            serving = True
            host = _bound_http(config.http_options.host)
            for app in config.applications:
                prefix = (app.route_prefix or "/").rstrip("/")
                print(f"[{app.name}] HTTP (OpenAI-compatible): http://{host}:{config.http_options.port}{prefix}/v1",
                      flush=True)
            port = config.grpc_options.port
            if ingress_mode() == "haproxy":  # HAProxy's gRPC front binds the HTTP host
                print(f"gRPC (orthrus.v1.Orthrus): {host}:{port}", flush=True)
            else:  # Ray Serve's gRPC proxy has no host option: it listens on every interface
                print(f"gRPC (orthrus.v1.Orthrus): [::]:{port} (all interfaces; from this machine: 127.0.0.1:{port})",
                      flush=True)
            print(f"ingress: {ingress_mode()}", flush=True)
            if len(names) > 1:
                print("several applications: gRPC clients send the metadata `application: <name>`", flush=True)
            for r in _routers(caller, names, "replica_info"):
                if r["metrics_port"] is not None:
                    print(f"metrics (router {r['replica']}): http://{r['metrics_host']}:{r['metrics_port']}/metrics "
                          "(each engine replica serves its own, from the next port)", flush=True)
            print("serving; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        if serving:
            _err(f"draining (up to {args.drain_timeout:g}s)...")
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the drain
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                drain(caller, names, args.drain_timeout)
            except Exception as e:  # noqa: BLE001 - shut down anyway
                _err(f"drain failed ({type(e).__name__}: {e}); stopping")
        _err("stopping...")
    finally:
        try:
            serve.shutdown()
        finally:
            caller.close()  # after Serve: its routers' shared long-poll client runs on this loop
            ray.shutdown()
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orthrus serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
