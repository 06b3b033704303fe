"""A real Prometheus scrapes the running application; the dashboard's PromQL must work on it.

Prometheus (Debian package `prometheus`) is started on loopback by this module,
scraping every replica's /metrics endpoint and Ray's metrics export port. After
HTTP and gRPC traffic (good and bad requests, both modes), every expression of the
Grafana dashboard is evaluated through Prometheus's HTTP API and must return data,
and the scraped counters must equal what the clients saw.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dashboard_exprs import expressions, load_dashboard, substitute
from obs_app import free_port, running_app

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus (Debian package) not installed; `make test` installs it")

SCRAPE_S = 1


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("obs-app")) as a:
        yield a


class Prometheus:
    def __init__(self, workdir: Path, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                       "evaluation_interval": f"{SCRAPE_S}s"},
            "scrape_configs": [
                # One target per port a replica may hold; those nobody holds stay down.
                {"job_name": "orthrus", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in app.metrics_ports]}]},
                {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{app.ray_metrics_port}"]}]},
            ],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.logpath = workdir / "prometheus.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited:\n" + self.logpath.read_text()[-3000:]
            try:
                if urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("prometheus not ready after 60 s:\n" + self.logpath.read_text()[-3000:])

    def api(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params, doseq=True)
        try:
            body = urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10).read()
        except urllib.error.HTTPError as e:  # 400/422 carry the PromQL error in the body
            body = e.read()
        return json.loads(body)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr, time=f"{time.time():.3f}")

    def values(self, expr: str) -> dict[tuple, float]:
        r = self.query(expr)
        assert r["status"] == "success", (expr, r)
        return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in r["data"]["result"]}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prom(app, tmp_path_factory):
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), app)
    try:
        yield p
    finally:
        p.stop()


def _http_stream(url: str, path: str, body: dict) -> dict:
    """One streaming request; returns usage, the orthrus stats and the mode sent."""
    import httpx

    usage = stats = None
    with httpx.stream("POST", url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            stats = chunk.get("orthrus") or stats
    assert usage is not None and stats is not None
    return {"mode": body.get("mode", "orthrus"), "completion_tokens": usage["completion_tokens"]}


def _http_bad(url: str) -> None:
    import httpx

    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": -1}, timeout=30)
    assert r.status_code == 400, r.text


def _grpc_generate(target: str, mode: str, max_tokens: int) -> dict:
    from orthrus_runtime.client import OrthrusClient

    with OrthrusClient(target, timeout=120) as c:
        last = None
        for last in c.generate("def add(a, b):", max_tokens=max_tokens, temperature=0.0, mode=mode):
            pass
    assert last is not None and last.finished
    return {"mode": mode, "completion_tokens": last.usage.completion_tokens}


def _grpc_bad(target: str) -> None:
    import grpc

    from orthrus_runtime.client import OrthrusClient

    with OrthrusClient(target, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate("x", top_p=2.0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def traffic(app, prom):
    """Several rounds of mixed traffic over ~10 s, so rate() windows see it move."""
    url, tgt = app.http_url, app.grpc_target
    done: list[dict] = []
    errors = {("400", "http"): 0, ("INVALID_ARGUMENT", "grpc"): 0}
    prompts = ["The quick brown fox", "Orthrus drafts a block", "Continuous batching lets", "Speculative decoding is"]
    t_end = time.monotonic() + 10
    with ThreadPoolExecutor(6) as pool:
        rnd = 0
        while time.monotonic() < t_end or rnd < 2:
            futs = [pool.submit(_http_stream, url, "/v1/completions",
                                {"model": app.model_id, "prompt": p, "max_tokens": 24 + 4 * i, "temperature": 0.0,
                                 "mode": "ar" if i == 3 else "orthrus"}) for i, p in enumerate(prompts)]
            futs.append(pool.submit(_http_stream, url, "/v1/chat/completions",
                                    {"model": app.model_id, "max_tokens": 16, "temperature": 0.8, "seed": rnd,
                                     "messages": [{"role": "user", "content": "Say something."}]}))
            futs.append(pool.submit(_grpc_generate, tgt, "orthrus" if rnd % 2 else "ar", 20))
            _http_bad(url)
            _grpc_bad(tgt)
            errors[("400", "http")] += 1
            errors[("INVALID_ARGUMENT", "grpc")] += 1
            done += [f.result() for f in futs]
            rnd += 1
            time.sleep(1)
    return done, errors


def _wait_for(prom: Prometheus, expr: str, ok, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = prom.values(expr)
        if ok(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{expr}: still {last} after {timeout:.0f} s")


def test_targets_up(app, prom, traffic):
    # The engine replica and the router replica each serve /metrics; Ray's exporter too.
    up = _wait_for(prom, 'up == 1', lambda v: sum(1 for k in v if ("job", "orthrus") in k) >= 2
                   and any(("job", "ray") in k for k in v))
    assert sum(1 for k in up if ("job", "orthrus") in k) == 2


def test_scraped_counters_equal_what_clients_saw(app, prom, traffic):
    done, errors = traffic
    truth = {m: sum(d["completion_tokens"] for d in done if d["mode"] == m) for m in ("orthrus", "ar")}
    # Chat requests used the server's default mode (orthrus).
    got = _wait_for(prom, "sum by (mode) (orthrus_generation_tokens_total)",
                    lambda v: {dict(k)["mode"]: x for k, x in v.items()} == truth)
    assert {dict(k)["mode"]: x for k, x in got.items()} == truth
    n_ok = len(done)
    succ = prom.values("sum(orthrus_request_success_total)")
    assert list(succ.values()) == [n_ok]
    errs = prom.values("sum by (code, protocol) (orthrus_request_errors_total)")
    seen = {(dict(k)["code"], dict(k)["protocol"]): v for k, v in errs.items()}
    assert {k: v for k, v in seen.items() if v} == errors
    # Every code the router can answer has a series from the start, at 0 until it happens
    # (the dashboard shows 0, not "No data").
    assert {p for _, p in seen} == {"http", "grpc"} and len(seen) > len(errors)
    # Every orthrus series carries the model and replica labels.
    for series in prom.api("series", **{"match[]": '{__name__=~"orthrus_.+"}'})["data"]:
        assert series["model"] == app.model_id and series["replica"], series
    # Ray Serve's own view: one healthy replica per deployment, the autoscaler's target 1.
    healthy = _wait_for(prom, 'sum by (deployment) (ray_serve_deployment_replica_healthy{application="orthrus"})',
                        lambda v: len(v) == 2)
    assert {dict(k)["deployment"]: x for k, x in healthy.items()} == {"OrthrusEngine": 1, "OrthrusRouter": 1}
    target = prom.values('max by (deployment) (ray_serve_autoscaling_target_replicas{deployment="OrthrusEngine"})')
    assert list(target.values()) == [1]


def test_every_dashboard_expression_returns_data(app, prom, traffic):
    dash = load_dashboard()
    # The latest traffic must be inside every rate window when we evaluate.
    _wait_for(prom, "sum(orthrus_request_errors_total)", lambda v: bool(v))
    time.sleep(3 * SCRAPE_S)
    failures = []
    for title, expr in expressions(dash):
        q = substitute(expr)
        r = prom.query(q)
        if r.get("status") != "success":
            failures.append(f"{title}: {q}\n  error: {r.get('error')}")
            continue
        result = r["data"]["result"]
        finite = [s for s in result if math.isfinite(float(s["value"][1]))]
        if not finite:
            failures.append(f"{title}: {q}\n  no finite value in {result}")
    assert not failures, "\n".join(failures)


def test_template_variables_list_real_values(app, prom, traffic):
    # Grafana's label_values(metric{selector}, label) is Prometheus's label-values API.
    want = {"model": {app.model_id}, "application": {"orthrus"}}
    for v in load_dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert m, v["query"]["query"]
        series, label = substitute(m.group(1)), m.group(2)
        r = prom.api(f"label/{label}/values", **{"match[]": series})
        assert r["status"] == "success", r
        assert r["data"], f"variable {v['name']}: no values for {series}"
        if label in want:
            assert set(r["data"]) == want[label]
        if v["name"] == "replica":
            # Only engine replicas (a router records no engine series), named as Ray
            # Serve names them, so Orthrus and Ray Serve panels can be joined on it.
            ray_names = prom.api("label/replica/values", **{"match[]": 'ray_serve_deployment_replica_healthy{deployment="OrthrusEngine"}'})
            assert set(r["data"]) == set(ray_names["data"]) and len(r["data"]) == 1


def test_gauges_return_to_idle_after_a_client_cancels(app, prom, traffic):
    """A stream the client drops while nothing else runs: the engine aborts it and
    idles, so no further step record comes; the scraped gauges must still say idle."""
    import httpx

    with httpx.stream("POST", app.http_url + "/v1/completions", timeout=60,
                      json={"model": app.model_id, "prompt": "The quick brown fox", "max_tokens": 200,
                            "temperature": 0.0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk: the connection closes mid-stream
    _wait_for(prom, "sum(orthrus_request_success_total{finished_reason='abort'})", lambda v: sum(v.values()) >= 1)
    _wait_for(prom, "sum(orthrus_num_requests_running) + sum(orthrus_num_requests_waiting)",
              lambda v: list(v.values()) == [0.0], timeout=20)
    assert list(prom.values("max(orthrus_kv_cache_usage_perc)").values()) == [0.0]
