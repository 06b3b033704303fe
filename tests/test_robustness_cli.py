"""`orthrus serve` end to end: it binds where its config says and prints that, and on a
signal it drains (new requests refused with a retry hint, in-flight streams ended with an
explicit error after --drain-timeout) before it stops. Started the way a background job
is, with SIGINT ignored: the command installs its own handlers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

pytest.importorskip("ray")

from orthrus_runtime.client import OrthrusClient  # noqa: E402
from orthrus_runtime.model.testing import tiny_checkpoint  # noqa: E402
from processes import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



def _cli_config(tmp_path, topology: str) -> Path:
    """serve_config.yaml (split) or gpu.yaml (colocated) on this CPU, a tiny checkpoint, free ports."""
    # Eight layers: slow enough on the CPU that the streams the drain must end (1,900 tokens)
    # cannot finish on their own within --drain-timeout, whichever ingress carries them.
    ckpt = tiny_checkpoint(tmp_path / "ckpt", layers=8)
    source = "serve_config.yaml" if topology == "split" else "gpu.yaml"
    config = yaml.safe_load((ROOT / "deployment/configs" / source).read_text())
    config["http_options"].update(port=free_port(), host="127.0.0.1")
    config["grpc_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"]["engine"].update(model=str(ckpt), max_model_len=2048, device="cpu", dtype="float32")
    app["args"]["engine"].pop("gpu_memory_utilization", None)
    app["args"]["metrics_port"] = 0
    app["args"]["metrics_host"] = "127.0.0.1"
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        d["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 0}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def _gauges(url: str, *names: str) -> list[float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {n: 0.0 for n in names}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for smp in fam.samples:
            if smp.name in found:
                found[smp.name] += smp.value
    return [found[n] for n in names]


def _cancel_frees_the_engine(grpc_port: int, metrics_url: str) -> None:
    client = OrthrusClient(f"127.0.0.1:{grpc_port}", timeout=120)
    try:
        for _ in range(3):
            call = client.generate("hello", max_tokens=1900, temperature=0)
            next(call)
            assert _gauges(metrics_url, "orthrus_num_requests_running")[0] == 1
            call.cancel()
            deadline = time.monotonic() + 30
            while any(_gauges(metrics_url, "orthrus_num_requests_running", "orthrus_kv_cache_usage_perc")):
                assert time.monotonic() < deadline, "a cancelled stream kept its engine request or KV pages"
                time.sleep(0.2)
    finally:
        client.close()


def _haproxy_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "haproxy"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


# `make serve` (split, haproxy), gpu.yaml under `orthrus serve` (colocated, haproxy), and Ray
# Serve's proxy actor (--ingress proxy).
@pytest.mark.parametrize("topology,ingress", [("split", "haproxy"), ("colocated", "haproxy"), ("colocated", "proxy")])
def test_orthrus_serve_binds_prints_and_drains_on_a_signal(tmp_path, topology, ingress):
    cfg = _cli_config(tmp_path, topology)
    config = yaml.safe_load(cfg.read_text())
    http_port, grpc_port = config["http_options"]["port"], config["grpc_options"]["port"]
    haproxies = _haproxy_pids()
    temp_dir = tempfile.mkdtemp(prefix="orcl", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployment.cli", "--config", str(cfg), "--num-cpus", "2", "--ray-temp-dir", temp_dir,
         "--drain-timeout", "2", "--timeout", "300", "--ingress", ingress],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), start_new_session=True)
    out: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            out.append(line)
            if "serving; Ctrl-C to stop" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(300), "".join(out[-40:])
        text = "".join(out)
        # What it bound: loopback HTTP and metrics (the local config); gRPC on every interface
        # through Serve's proxy, on the HTTP host through HAProxy.
        assert f"http://127.0.0.1:{http_port}/v1" in text
        if ingress == "proxy":
            assert f"[::]:{grpc_port} (all interfaces; from this machine: 127.0.0.1:{grpc_port})" in text
        else:
            assert f"gRPC (orthrus.v1.Orthrus): 127.0.0.1:{grpc_port}" in text and "ingress: haproxy" in text
            assert _haproxy_pids() - haproxies, "HAProxy should be running"
        m = re.search(r"metrics \(router \S+\): http://127\.0\.0\.1:(\d+)/metrics", text)
        assert m and httpx.get(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=30).status_code == 200
        base = f"http://127.0.0.1:{http_port}"
        if topology == "colocated":
            # A client's cancel of a gRPC stream reaches the engine (through HAProxy: the replica's
            # own gRPC server sees it): the request ends and its KV pages return. The printed
            # metrics endpoint is the replica's, engine gauges included.
            _cancel_frees_the_engine(grpc_port, f"http://127.0.0.1:{m.group(1)}/metrics")
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", f"{base}/v1/completions",
                             json={"prompt": "hello", "max_tokens": 1900, "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                client = OrthrusClient(f"127.0.0.1:{grpc_port}", timeout=120)
                call = client.generate("hello", max_tokens=1900, temperature=0)
                next(call)
                # SIGTERM (docker stop, kill, a script's stop) drains like Ctrl-C; SIGINT takes the same
                # handler (inherited as ignored here: our own handler is installed over it).
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 60
                while True:  # the drain starts: new requests are refused with a retry hint
                    refused = http.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                    if refused.status_code == 503:
                        break
                    assert time.monotonic() < deadline, refused.text
                    time.sleep(0.1)
                assert refused.headers.get("content-type", "").startswith("application/json"), refused.text
                assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
                rest = [x for x in lines if x.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()
        assert proc.wait(timeout=120) == 0
        assert "draining" in "".join(out)
        assert not _haproxy_pids() - haproxies, "a HAProxy outlived the server"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
