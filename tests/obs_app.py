"""Starts the real Orthrus Serve application (tiny model, CPU) for the observability tests.

The application is deployed from the shipped default config (deployment/configs/
serve_config.yaml) with the model, ports and metrics port swapped for test values,
through the same deploy path `orthrus serve` uses.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from processes import free_port  # noqa: F401 (re-exported: the observability tests import it from here)

MODEL_ID = "tiny-orthrus"
# Engine and router replicas bind metrics_port or the next free ports after it.
METRICS_PORT_SPAN = 4


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_run(n: int) -> int:
    """The first of n consecutive free ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000)
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no run of {n} free ports found")


@dataclass
class RunningApp:
    http_url: str
    grpc_target: str
    metrics_ports: list[int]  # where replicas may serve /metrics (metrics_port and the next ones)
    ray_metrics_port: int  # Ray's metrics export port (ray_serve_* metrics)
    model_id: str = MODEL_ID


@contextlib.contextmanager
def running_app(workdir: Path, *, block_size: int = 4, max_model_len: int = 256) -> Iterator[RunningApp]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from deployment.cli import deploy, wait_running
    from deployment.config import DEFAULT_CONFIG, load_config
    from orthrus_runtime.model.testing import tiny_checkpoint

    model = tiny_checkpoint(workdir / "tiny", diffusion="ar-copy", block_size=block_size)
    http_port, grpc_port, ray_metrics_port = free_port(), free_port(), free_port()
    metrics_base = free_port_run(METRICS_PORT_SPAN)

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": http_port}
    raw["grpc_options"]["port"] = grpc_port
    app = raw["applications"][0]
    app["args"]["engine"].update({"model": str(model), "device": "cpu", "dtype": "float32",
                                  "max_model_len": max_model_len, "max_num_seqs": 16})
    app["args"]["model_id"] = MODEL_ID
    app["args"]["metrics_port"] = metrics_base
    app["args"]["api_keys_env"] = "ORTHRUS_OBS_TEST_NO_KEYS"  # unset: auth off
    cfg_path = workdir / "serve_config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    temp_dir = tempfile.mkdtemp(prefix="rayobs", dir="/tmp")
    ray.init(num_cpus=4, _temp_dir=temp_dir, _metrics_export_port=ray_metrics_port,
             include_dashboard=False, log_to_driver=False)
    try:
        deploy(load_config(cfg_path))
        err = wait_running([app["name"]], timeout=240)
        assert err is None, err
        yield RunningApp(
            http_url=f"http://127.0.0.1:{http_port}",
            grpc_target=f"127.0.0.1:{grpc_port}",
            metrics_ports=[metrics_base + i for i in range(METRICS_PORT_SPAN)],
            ray_metrics_port=ray_metrics_port,
        )
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
