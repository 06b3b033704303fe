"""Soak: thousands of requests of random lengths through the real Serve application, over
both protocols, a fifth of them aborted at random points and a tenth hostile. At the end
the engine holds no KV block and no request, its replica was never replaced, its
admission slots are all free again and its memory did not grow. It runs the colocated topology of
gpu.yaml (one OrthrusServer replica). The figures are printed (docs/reliability.md quotes a run).

A tiny random checkpoint keeps it under a minute on two cores (through HAProxy); SOAK_REQUESTS scales it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.serve._private.constants import SERVE_NAMESPACE  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deployment.cli import deploy, wait_running  # noqa: E402
from deployment.ingress import DEFAULT_INGRESS, ingress_env  # noqa: E402
from orthrus_runtime.client import OrthrusClient  # noqa: E402
from orthrus_runtime.model.testing import tiny_checkpoint  # noqa: E402
from orthrus_runtime.proto import orthrus_pb2 as pb  # noqa: E402
from processes import free_port  # noqa: E402

MODEL_ID = "tiny-soak"
N_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "5000"))
CONCURRENCY = 16
SERVICER = "deployment.grpc_service.add_OrthrusServicer_to_server"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Orthrus", "drafts", "blocks", "ünï", "🙂"]



def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    temp_dir = tempfile.mkdtemp(prefix="orsk", dir="/tmp")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The shipped ingress (HAProxy straight to the replica), inherited by the Ray started below.
    env = ingress_env(os.environ.get("ORTHRUS_TEST_INGRESS", DEFAULT_INGRESS))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    http_port, grpc_port = free_port(), free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [{
            "name": "soak", "route_prefix": "/", "import_path": "deployment.app:build_app",
            # The shipped GPU topology (gpu.yaml): colocated, one replica both ingress and engine.
            "args": {"topology": "colocated",
                     "engine": {"model": str(ckpt), "device": "cpu", "dtype": "float32", "max_model_len": 1024,
                                "max_num_seqs": 32},
                     "model_id": MODEL_ID, "metrics_port": None, "api_keys_env": None, "stream_interval_s": 0.02,
                     "max_pending_requests": 64},
            "deployments": [
                {"name": "OrthrusServer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}},
            ],
        }],
    }
    ray.init(num_cpus=2, namespace=SERVE_NAMESPACE, include_dashboard=False, _temp_dir=temp_dir)
    try:
        deploy(ServeDeploySchema.model_validate(config))
        assert wait_running(["soak"], timeout=300) is None
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


HOSTILE_HTTP = [
    {"prompt": "x", "top_k": 9223372036854775808}, {"prompt": "x", "max_tokens": 2**70},
    {"prompt": "a\ud800b"}, {"prompt": "x", "temperature": 2.5}, {"prompt": "x", "top_p": 0},
    {"prompt": [10**6]}, {"prompt": "x", "stop": [""]}, {"prompt": "x", "seed": 2**64}, {"prompt": ""},
    {"messages": [{"role": "wizard", "content": "x"}]}, {"prompt": "x", "max_tokens": 1024},
]
HOSTILE_RAW = [b"{not json", b"[" * 50_000, b'{"prompt": ' + b"9" * 5000 + b"}", b"\xff\xfe"]
HOSTILE_GRPC = [dict(prompt="x", top_k=2**62), dict(prompt="x", temperature=1e300), dict(prompt="x", max_tokens=2**40),
                dict(messages=[{"role": "wizard", "content": "x"}]), dict(prompt_token_ids=[10**6]), dict()]


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def _sampling(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"temperature": 0}
    return {"temperature": rng.choice([0.5, 1.0, 1.5]), "top_k": rng.choice([-1, 5, 50]),
            "top_p": rng.choice([1.0, 0.9]), "seed": rng.randint(0, 2**32)}


class Clients:
    """One gRPC channel and one HTTP connection pool per client thread, as real clients keep
    them (a new channel per request would spend the two cores on handshakes); closed at the end."""

    def __init__(self, target: str):
        self.target, self._local, self._all, self._lock = target, threading.local(), [], threading.Lock()

    def _own(self, name: str, make):
        c = getattr(self._local, name, None)
        if c is None:
            c = make()
            setattr(self._local, name, c)
            with self._lock:
                self._all.append(c)
        return c

    def grpc(self) -> OrthrusClient:
        return self._own("grpc", lambda: OrthrusClient(self.target, application="soak", timeout=120))

    def http(self) -> httpx.Client:
        return self._own("http", lambda: httpx.Client(timeout=120))

    def close(self) -> None:
        for c in self._all:
            c.close()


def one(i: int, base: str, clients: Clients) -> str:
    """Run request i; returns its kind ("ok", "aborted", "hostile"), raising on anything unexpected."""
    rng = random.Random(i)
    kind = rng.random()
    over_grpc = rng.random() < 0.5
    mode = rng.choice(["orthrus", "ar"])
    if kind < 0.12:  # hostile
        if over_grpc:
            c = clients.grpc()
            try:
                c.complete(**rng.choice(HOSTILE_GRPC))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                return "hostile"
            raise AssertionError("a hostile gRPC request was served")
        if rng.random() < 0.3:
            r = clients.http().post(f"{base}/v1/completions", content=rng.choice(HOSTILE_RAW),
                                    headers={"Content-Type": "application/json"})
        else:
            body = dict(rng.choice(HOSTILE_HTTP))
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it.
            r = clients.http().post(base + path, content=json.dumps(body),
                                    headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        return "hostile"
    aborted = kind < 0.12 + 0.22
    max_tokens = rng.randint(64, 200) if aborted else rng.randint(1, 16)
    keep = rng.randint(1, 3)  # messages read before an abort
    prompt = _prompt(rng)
    if over_grpc:
        c = clients.grpc()
        if not aborted and rng.random() < 0.5:
            r = c.complete(prompt, max_tokens=max_tokens, mode=mode, **_sampling(rng))
            assert r.finished and r.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            return "ok"
        call = c.generate(prompt, max_tokens=max_tokens, mode=mode, **_sampling(rng))
        n = 0
        for m in call:
            n += 1
            if aborted and n >= keep:
                call.cancel()
                return "aborted"
            if m.finished:
                assert m.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        return "ok"  # finished before the abort point
    chat = rng.random() < 0.5
    body = {"max_tokens": max_tokens, "mode": mode, **_sampling(rng)}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not aborted and rng.random() < 0.5:
        r = clients.http().post(base + path, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return "ok"
    with clients.http().stream("POST", base + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            n += 1
            if aborted and n >= keep:
                return "aborted"  # leaving the block drops the connection
            assert "error" not in line, line
            if line == "data: [DONE]":
                return "ok"
    raise AssertionError("a stream ended without [DONE]")


def test_soak(app):
    base, target = app
    engine = serve.get_deployment_handle("OrthrusServer", app_name="soak")
    health = engine.health.remote().result(timeout_s=30)
    pid, actor = health["pid"], health["actor_name"]
    t0 = time.monotonic()
    kinds: dict[str, int] = {}
    warm = min(500, N_REQUESTS // 10)
    clients = Clients(target)
    try:
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            for k in pool.map(lambda i: one(i, base, clients), range(warm)):
                kinds[k] = kinds.get(k, 0) + 1
            rss_start = _rss_mb(pid)  # after warm-up: allocator pools and caches are in place
            for k in pool.map(lambda i: one(i, base, clients), range(warm, N_REQUESTS)):
                kinds[k] = kinds.get(k, 0) + 1
    finally:
        clients.close()
    took = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while True:
        s = engine.stats.remote().result(timeout_s=30)
        if s.num_running == 0 and s.num_waiting == 0 and s.num_kv_blocks_free == s.num_kv_blocks_total:
            break
        assert time.monotonic() < deadline, f"engine not idle after the soak: {s}"
        time.sleep(0.2)
    rss_end = _rss_mb(pid)
    after = engine.health.remote().result(timeout_s=30)
    figures = {"requests": N_REQUESTS, "seconds": round(took, 1), **kinds,
               "aborted_by_reason": s.finished_by_reason.get("abort", 0),
               "errors": s.finished_by_reason.get("error", 0),
               "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1)}
    print("soak:", json.dumps(figures))
    assert sum(kinds.values()) == N_REQUESTS
    assert kinds.get("aborted", 0) >= 0.2 * N_REQUESTS and kinds.get("hostile", 0) >= 0.1 * N_REQUESTS
    assert s.finished_by_reason.get("error", 0) == 0
    assert after["actor_name"] == actor and after["pid"] == pid and after["alive"]  # never restarted
    assert rss_end - rss_start <= 50, figures
    # The ingress side holds nothing either: no stream tracked, no admission slot taken.
    info = engine.replica_info.remote().result(timeout_s=30)
    assert info["in_flight"] == 0 and info["pending"] == 0, info
