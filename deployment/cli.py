"""`orthrus serve [--config FILE]`: start a local Ray, deploy the config, serve until Ctrl-C.

This is what `serve run FILE` does (same config schema, same deploy call), plus
waiting for the applications to come up, printing the HTTP and gRPC addresses,
and tearing Serve and Ray down on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Optional

from .config import DEFAULT_CONFIG, load_config


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


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, http_port=args.http_port, grpc_port=args.grpc_port)
    except Exception as e:  # a missing file or a schema error: say what, without a traceback
        _err(f"orthrus serve: invalid config {args.config}: {e}")
        return 2

    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    # SIGTERM (docker stop, kill) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    init_kwargs = {"namespace": SERVE_NAMESPACE}
    if args.address:
        init_kwargs["address"] = args.address
    else:
        init_kwargs.update(address="local", num_cpus=args.num_cpus)
        if args.ray_temp_dir:
            init_kwargs["_temp_dir"] = args.ray_temp_dir
    ray.init(**init_kwargs)
    rc = 0
    try:
        deploy(config)
        names = [a.name for a in config.applications]
        error = wait_running(names, args.timeout, log=_err)
        if error:
            _err(f"orthrus serve: {error}")
            rc = 1
        else:
            host = _display_host(config.http_options.host)
            for app in config.applications:
                prefix = (app.route_prefix or "/").rstrip("/")
                print(f"[{app.name}] HTTP (OpenAI-compatible): http://{host}:{config.http_options.port}{prefix}/v1",
                      flush=True)
            print(f"gRPC (orthrus.v1.Orthrus): {host}:{config.grpc_options.port}", flush=True)
            if len(names) > 1:
                print("several applications: gRPC clients send the metadata `application: <name>`", flush=True)
            print("serving; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        _err("stopping...")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="orthrus serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
