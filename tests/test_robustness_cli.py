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



def test_orthrus_serve_binds_prints_and_drains_on_a_signal(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    http_port, grpc_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "deployment/configs/serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    app = config["applications"][0]
    app["args"]["engine"].update(model=str(ckpt), max_model_len=2048)
    app["args"]["metrics_port"] = 0
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        d["ray_actor_options"] = {"num_cpus": 0}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    temp_dir = tempfile.mkdtemp(prefix="orcl", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployment.cli", "--config", str(cfg), "--num-cpus", "2", "--ray-temp-dir", temp_dir,
         "--drain-timeout", "3", "--timeout", "300"],
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
        # What it bound: loopback HTTP and metrics (the local config), gRPC on every interface.
        assert f"http://127.0.0.1:{http_port}/v1" in text
        assert f"[::]:{grpc_port} (all interfaces; from this machine: 127.0.0.1:{grpc_port})" in text
        m = re.search(r"metrics \(router \S+\): http://127\.0\.0\.1:(\d+)/metrics", text)
        assert m and httpx.get(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=30).status_code == 200
        base = f"http://127.0.0.1:{http_port}"
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
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
