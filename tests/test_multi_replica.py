"""Two CPU engine replicas behind one router (a tiny random checkpoint, float32).

- They share the load: of 40 requests (HTTP and gRPC) each replica serves some,
  and together exactly 40 (counted by each replica's own Prometheus metrics).
- A replica killed under load (its Ray actor) leaves the other serving: every
  request sent once the actor is dead succeeds, served by the survivor, and
  the requests it had in flight fail with a clear 503, not a hang.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

ray = pytest.importorskip("ray")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.constants import SERVE_NAMESPACE  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deployment.cli import deploy, wait_running  # noqa: E402
from orthrus_runtime.client import OrthrusClient  # noqa: E402
from orthrus_runtime.model.testing import tiny_checkpoint  # noqa: E402
from processes import free_port, pid_alive  # noqa: E402

APP = "multi"
MODEL_ID = "tiny-orthrus-multi"
SERVICER = "deployment.grpc_service.add_OrthrusServicer_to_server"



@dataclass
class Stack:
    http: str
    grpc_target: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    temp_dir = tempfile.mkdtemp(prefix="ormr", dir="/tmp")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    http_port, grpc_port = free_port(), free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "deployment.app:build_app",
            "args": {"engine": {"model": str(ckpt), "device": "cpu", "dtype": "float32", "max_model_len": 1024},
                     "model_id": MODEL_ID, "metrics_port": 0, "api_keys_env": None},
            "deployments": [
                {"name": "OrthrusEngine", "num_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 64,
                 "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 1,
                 "graceful_shutdown_timeout_s": 2},
                {"name": "OrthrusRouter", "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }
    ray.init(num_cpus=2, namespace=SERVE_NAMESPACE, include_dashboard=False, _temp_dir=temp_dir)
    try:
        deploy(ServeDeploySchema.model_validate(config))
        err = wait_running([APP], timeout=240)
        assert err is None, err
        yield Stack(http=f"http://127.0.0.1:{http_port}", grpc_target=f"127.0.0.1:{grpc_port}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved
            shutil.rmtree(temp_dir, ignore_errors=True)


def _running() -> int:
    d = serve.status().applications[APP].deployments["OrthrusEngine"]
    return d.replica_states.get("RUNNING", 0)


def _wait_two_running(timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _running() != 2:
        assert time.monotonic() < deadline, f"not 2 running replicas: {serve.status().applications[APP]}"
        time.sleep(0.5)


def _replicas(want: int = 2, tries: int = 100) -> dict[str, dict]:
    """{replica id: health()} of the running engine replicas, found by asking through
    the handle until every one has answered (the handle picks a replica per call)."""
    handle = serve.get_deployment_handle("OrthrusEngine", app_name=APP)
    found: dict[str, dict] = {}
    for _ in range(tries):
        h = handle.health.remote().result(timeout_s=30)
        found[h["replica"]] = h
        if len(found) >= want:
            return found
    raise AssertionError(f"only replicas {sorted(found)} answered {tries} health calls")


def _served(port: int, replica: str) -> int:
    """Requests the replica finished (any finish reason), from its own metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "orthrus_request_success_total" and s.labels.get("replica") == replica:
                total += s.value
    return int(total)


def _counts(replicas: dict[str, dict]) -> dict[str, int]:
    return {r: _served(h["metrics_port"], r) for r, h in replicas.items()}


def _complete_http(stack: Stack, i: int, max_tokens: int = 8) -> int:
    r = httpx.post(f"{stack.http}/v1/completions", timeout=120,
                   json={"model": MODEL_ID, "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0})
    if r.status_code != 200:
        # Every refusal is an OpenAI-shaped error body.
        assert set(r.json()["error"]) >= {"message", "type", "code"}, r.text
    return r.status_code


def test_two_replicas_share_forty_requests(stack):
    _wait_two_running()
    replicas = _replicas()
    before = _counts(replicas)

    def one(i: int) -> bool:
        if i % 2:
            return _complete_http(stack, i) == 200
        with OrthrusClient(stack.grpc_target, application=APP, timeout=120) as c:
            return c.complete(f"request {i}", max_tokens=8, temperature=0).usage.completion_tokens == 8

    with ThreadPoolExecutor(max_workers=8) as pool:
        ok = list(pool.map(one, range(40)))
    assert all(ok), ok
    # A replica counts a request once its stream ends, which may trail the response a moment.
    deadline = time.monotonic() + 15
    while True:
        served = {r: n - before[r] for r, n in _counts(replicas).items()}
        if sum(served.values()) == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(served.values()) == 40, served
    assert all(n > 0 for n in served.values()), served


def test_killed_replica_leaves_the_other_serving(stack):
    _wait_two_running()
    replicas = _replicas()
    victim_id, survivor_id = sorted(replicas)
    victim = ray.get_actor(replicas[victim_id]["actor_name"], namespace=SERVE_NAMESPACE)
    victim_core = replicas[victim_id]["engine_core_pid"]
    survivor_port = replicas[survivor_id]["metrics_port"]

    stop = threading.Event()
    outcomes: list[tuple[float, int]] = []  # (start time, HTTP status)
    lock = threading.Lock()

    def load(k: int) -> None:
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            try:
                code = _complete_http(stack, 1000 * k + i, max_tokens=32)
            except httpx.HTTPError:
                code = -1  # a dropped connection would be a failure the test reports
            with lock:
                outcomes.append((t, code))
            i += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while sum(code == 200 for _, code in outcomes) < 8:
            assert time.monotonic() < deadline, outcomes
            time.sleep(0.1)
        ray.kill(victim, no_restart=True)
        # Dead once a call to it fails.
        deadline = time.monotonic() + 30
        while True:
            try:
                ray.get(victim.__ray_ready__.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            assert time.monotonic() < deadline, "the killed replica still answers"
            time.sleep(0.1)
        dead_at = time.monotonic()
        survivor_before = _served(survivor_port, survivor_id)
        while sum(t > dead_at for t, _ in outcomes) < 12:
            assert time.monotonic() < dead_at + 60, outcomes
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    after = [code for t, code in outcomes if t > dead_at]
    assert after and all(code == 200 for code in after), after
    # Requests caught on the dying replica end with a clear 503, never a hang or a dropped connection.
    assert all(code in (200, 503) for _, code in outcomes), outcomes
    assert _served(survivor_port, survivor_id) > survivor_before
    # Serve replaces the killed replica; the deployment is back to two.
    _wait_two_running(timeout=180)
    # The killed actor's engine core process went with it (no orphan holding the GPU).
    deadline = time.monotonic() + 30
    while pid_alive(victim_core):
        assert time.monotonic() < deadline, "the killed replica's engine core process was left running"
        time.sleep(0.2)
    with OrthrusClient(stack.grpc_target, application=APP, timeout=60) as c:
        assert c.complete("hi", max_tokens=4, temperature=0).usage.completion_tokens == 4
