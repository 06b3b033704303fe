"""Several GPUs on one host: the real Serve application, one engine replica per GPU.

    python3 benchmarks/multi_gpu.py --out benchmarks/results            # >= 2 GPUs, an estimated 6 minutes
    python3 benchmarks/multi_gpu.py --model /tmp/smollm2.gguf ...        # another checkpoint
    python3 benchmarks/multi_gpu.py --cpu-dry-run --out /tmp/x           # the plumbing, on the CPU

One run, from deployment/configs/gpu-multi.yaml (free HTTP/gRPC ports, otherwise as
shipped), in a local Ray started here:
1. pinned: autoscaling pinned to 1 replica (min = max = 1); `orthrus bench` over gRPC
   at concurrency 128 (after a short warm-up round);
2. autoscaled: the same application redeployed with autoscaling from 1 to
   --max-replicas (a lightweight update: the warm replica stays); `orthrus bench`
   rounds back to back until a whole round ran with every replica up (the steady
   round, whose throughput is compared with the pinned run's);
3. scale-down: the load stops and the replica count is watched going back to 1.
Meanwhile a thread samples Serve's status (replica states) and each engine
replica's Prometheus endpoint (orthrus_request_success_total,
orthrus_generation_tokens_total per `replica` label), found by scanning the ports
from args.metrics_port up (on one host every replica takes the next free port).

Writes <out>/<date>-<gpu>-multi-gpu.json and .png; `targets` holds, for each target
of issue 20, the measured value, the bound and whether it was met. The dry run
(--cpu-dry-run) runs the same steps with two CPU replicas of a tiny random
checkpoint and scaled-down load and autoscaling delays, so that the suite checks the
config building, the metric parsing, the targets and the report without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployment.ingress import DEFAULT_INGRESS, INGRESS_MODES, use_ingress  # noqa: E402

CONFIG = ROOT / "deployment" / "configs" / "gpu-multi.yaml"
APP = "orthrus"
ENGINE = "OrthrusEngine"
ROUTER = "OrthrusRouter"
SERVER = "OrthrusServer"


def engine_host_name(app: dict) -> str:
    """The deployment whose replicas host an engine: OrthrusEngine (split) or OrthrusServer
    (colocated: there is no router then)."""
    return SERVER if (app.get("args") or {}).get("topology") == "colocated" else ENGINE
MODEL_ID = "orthrus-multi-gpu"
METRICS_SCAN = 16  # start_metrics_server tries this many ports from metrics_port up
REQUESTS_METRIC = "orthrus_request_success_total"
TOKENS_METRIC = "orthrus_generation_tokens_total"
BALANCE_BOUND = 0.8  # per-replica request counts within 20 %: the fewest >= 0.8 x the most
SPEEDUP_PER_REPLICA = 0.9  # 2 replicas >= 1.8x one


def log(*a: Any) -> None:
    print(f"[multi_gpu {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """What a run varies; the dry run scales the load and the autoscaler's clocks down."""
    concurrency: int = 128
    num_prompts: int = 1024
    warmup_prompts: int = 128
    max_tokens: int = 256
    dataset: str = "chat"
    max_replicas: int = 2
    scale_up_timeout_s: float = 300.0
    # Extra time allowed for scaling down beyond downscale_delay_s + look_back_period_s.
    scale_down_margin_s: float = 90.0
    sample_interval_s: float = 0.5
    scrape_interval_s: float = 2.0
    bench_timeout_s: float = 600.0
    # Applied on top of the config file (a CPU engine, short autoscaler clocks in the dry run).
    engine: dict = field(default_factory=dict)
    engine_deployment: dict = field(default_factory=dict)
    autoscaling: dict = field(default_factory=dict)
    router_deployment: dict = field(default_factory=dict)
    # Environment of the local Ray (the autoscaler's metric push intervals in the dry run).
    ray_env: dict = field(default_factory=dict)
    ray_num_cpus: Optional[int] = None


def dry_run_settings(ckpt: Path) -> Settings:
    """Two CPU replicas of a tiny checkpoint: max_num_seqs 4, a target of 2 ongoing
    requests and second-long autoscaler clocks, so a load of 8 scales to 2 and back."""
    return Settings(
        concurrency=8, num_prompts=24, warmup_prompts=8, max_tokens=16, scale_up_timeout_s=180.0,
        scale_down_margin_s=60.0, scrape_interval_s=0.5, bench_timeout_s=240.0,
        engine={"model": str(ckpt), "device": "cpu", "dtype": "float32", "max_model_len": 1024, "max_num_seqs": 4,
                "kv_cache_bytes": 32 * 2**20},
        engine_deployment={"max_ongoing_requests": 4, "max_queued_requests": 64, "health_check_period_s": 1,
                           "graceful_shutdown_timeout_s": 2, "ray_actor_options": {"num_gpus": 0, "num_cpus": 0}},
        # downscale_delay_s outlasts a replica's start plus the idle gap between two bench
        # rounds (a new `orthrus bench` process): shorter, and a starting replica is dropped.
        autoscaling={"target_ongoing_requests": 2, "upscale_delay_s": 1, "downscale_delay_s": 20,
                     "look_back_period_s": 2, "metrics_interval_s": 0.5},
        router_deployment={"ray_actor_options": {"num_cpus": 0}},
        ray_env={"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                 "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"},
        ray_num_cpus=2,
    )


# --------------------------------------------------------------------------- the Serve config


@dataclass
class Ports:
    http: int
    grpc: int
    metrics: int


def load_base_config(path: Path = CONFIG) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _deployment(app: dict, name: str) -> dict:
    for d in app["deployments"]:
        if d["name"] == name:
            return d
    raise KeyError(f"the config has no deployment {name!r}")


def _merge(dst: dict, src: dict) -> dict:
    """dst updated with src, nested mappings merged key by key (lists replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def build_config(base: dict, s: Settings, ports: Ports, *, pinned: bool) -> dict:
    """The Serve config of one phase: the file's, with this run's ports and overrides.

    pinned: autoscaling min = max = initial = 1; else from 1 up to s.max_replicas.
    Either way the engine keeps an autoscaling_config, so that switching phases is
    Serve's lightweight update (the running replica stays)."""
    cfg = copy.deepcopy(base)
    cfg.setdefault("http_options", {}).update(host="127.0.0.1", port=ports.http)
    cfg.setdefault("grpc_options", {})["port"] = ports.grpc
    (app,) = cfg["applications"]
    if app["name"] != APP:
        raise ValueError(f"the config's application is {app['name']!r}, expected {APP!r}")
    args = app.setdefault("args", {})
    args.update(model_id=MODEL_ID, metrics_port=ports.metrics, api_keys_env=None, api_keys_file=None)
    _merge(args.setdefault("engine", {}), s.engine)
    engine = _merge(_deployment(app, engine_host_name(app)), s.engine_deployment)
    auto = _merge(engine.setdefault("autoscaling_config", {}), s.autoscaling)
    top = 1 if pinned else s.max_replicas
    auto.update(min_replicas=1, initial_replicas=1, max_replicas=top)
    if engine_host_name(app) == ENGINE:
        _merge(_deployment(app, ROUTER), s.router_deployment)
    return cfg


def scale_down_timeout_s(cfg: dict, s: Settings) -> float:
    auto = _deployment(cfg["applications"][0], ENGINE)["autoscaling_config"]
    return float(auto.get("downscale_delay_s", 600.0)) + float(auto.get("look_back_period_s", 30.0)) + \
        s.scale_down_margin_s


# --------------------------------------------------------------------------- metrics


def parse_replica_counts(text: str, model_id: str = MODEL_ID) -> dict[str, dict[str, int]]:
    """{replica: {"requests", "generation_tokens"}} of the engine registries in one
    Prometheus exposition. Only engines export request_success (a router's registry
    holds its error counter only), so a router's endpoint yields nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.labels.get("model") != model_id or "replica" not in sample.labels:
                continue
            key = {REQUESTS_METRIC: "requests", TOKENS_METRIC: "generation_tokens"}.get(sample.name)
            if key is None:
                continue
            row = out.setdefault(sample.labels["replica"], {"requests": 0.0, "generation_tokens": 0.0})
            row[key] += sample.value
    return {r: {k: int(v) for k, v in row.items()} for r, row in out.items()}


def scrape_replicas(base_port: int, model_id: str = MODEL_ID, host: str = "127.0.0.1",
                    n: int = METRICS_SCAN) -> dict[str, dict[str, int]]:
    """Per-replica counters of every engine replica serving metrics on base_port..base_port+n-1."""
    import httpx

    found: dict[str, dict[str, int]] = {}
    for port in range(base_port, base_port + n):
        try:
            r = httpx.get(f"http://{host}:{port}/metrics", timeout=2.0)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            found.update(parse_replica_counts(r.text, model_id))
    return found


def delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per-replica counts between two scrapes; a replica absent before started at zero."""
    zero = {"requests": 0, "generation_tokens": 0}
    return {r: {k: v - before.get(r, zero).get(k, 0) for k, v in row.items()} for r, row in sorted(after.items())}


# --------------------------------------------------------------------------- the monitor


class Monitor:
    """Samples the engine's replica states (Serve's status API) and each replica's
    counters from a thread; keeps the change points, times relative to t0."""

    def __init__(self, s: Settings, status: Callable[[], dict[str, int]],
                 scrape: Callable[[], dict[str, dict[str, int]]], clock: Callable[[], float] = time.monotonic):
        self.s = s
        self._status, self._scrape, self._clock = status, scrape, clock
        self._lock = threading.Lock()  # the thread appends while the main thread saves
        self.t0 = clock()
        self.states: list[dict[str, Any]] = []  # {"t", "states": {state: count}} at each change
        self.requests: dict[str, list[list[float]]] = {}  # replica -> [[t, requests], ...] at each change
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multi-gpu-monitor", daemon=True)

    def now(self) -> float:
        return round(self._clock() - self.t0, 3)

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample_states(self) -> dict[str, int]:
        st = self._status()
        with self._lock:
            if not self.states or self.states[-1]["states"] != st:
                self.states.append({"t": self.now(), "states": st})
        return st

    def sample_requests(self) -> dict[str, dict[str, int]]:
        counts = self._scrape()
        t = self.now()
        with self._lock:
            for r, row in counts.items():
                series = self.requests.setdefault(r, [])
                if not series or series[-1][1] != row["requests"]:
                    series.append([t, row["requests"]])
        return counts

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"replica_states": copy.deepcopy(self.states), "replica_requests": copy.deepcopy(self.requests),
                    "monitor_errors": list(self.errors)}

    def _run(self) -> None:
        next_scrape = 0.0
        while not self._stop.is_set():
            try:
                self.sample_states()
                if time.monotonic() >= next_scrape:
                    self.sample_requests()
                    next_scrape = time.monotonic() + self.s.scrape_interval_s
            except Exception as e:  # noqa: BLE001 - keep sampling; the report lists what failed
                with self._lock:
                    if len(self.errors) < 20:
                        self.errors.append(f"{self.now()}: {type(e).__name__}: {e}")
            self._stop.wait(self.s.sample_interval_s)

    def running_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(fewest, most) RUNNING replicas over [t0, t1], from the change points."""
        with self._lock:
            states = list(self.states)
        vals = []
        for i, p in enumerate(states):
            t_end = states[i + 1]["t"] if i + 1 < len(states) else float("inf")
            if p["t"] <= t1 and t_end > t0:  # each state holds from its time until the next's
                vals.append(p["states"].get("RUNNING", 0))
        return (min(vals), max(vals)) if vals else (0, 0)


def serve_replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or ENGINE not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in sorted(app.deployments[ENGINE].replica_states.items())}


# --------------------------------------------------------------------------- orthrus bench


def run_bench(s: Settings, grpc_target: str, num_prompts: int, out_json: Path, seed: int) -> dict:
    """One `orthrus bench` run over gRPC at s.concurrency; returns its summary."""
    cmd = [sys.executable, "-m", "orthrus_runtime.tools.cli", "bench", "--protocol", "grpc",
           "--grpc-target", grpc_target, "--application", APP, "-c", str(s.concurrency), "-n", str(num_prompts),
           "--max-tokens", str(s.max_tokens), "--dataset", s.dataset, "--seed", str(seed),
           "--output-json", str(out_json), "--output-png", "", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.bench_timeout_s)
    # 1: some requests failed (the summary counts them); anything else: the run itself failed.
    if p.returncode not in (0, 1) or not out_json.is_file():
        raise RuntimeError(f"orthrus bench exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(out_json.read_text())["summary"]


# --------------------------------------------------------------------------- targets and report


def _target(measured: Any, bound: Any, met: bool, **extra: Any) -> dict:
    return {"measured": measured, "bound": bound, "met": bool(met), **extra}


def targets(rep: dict) -> dict:
    """The issue's targets from a report; a phase that did not run leaves its target unmet."""
    s = rep["settings"]
    r, c = s["max_replicas"], s["concurrency"]
    phases = rep.get("phases", {})
    t: dict[str, dict] = {}
    pinned = phases.get("pinned", {}).get("bench")
    auto = phases.get("autoscaled", {})
    steady_i = auto.get("steady_round")
    steady = auto["rounds"][steady_i] if steady_i is not None else None

    key = f"throughput_{r}_replicas_vs_1_c{c}"
    bound = round(SPEEDUP_PER_REPLICA * r, 6)
    if pinned and steady and pinned["output_throughput"]:
        x = steady["bench"]["output_throughput"] / pinned["output_throughput"]
        t[key] = _target(x, bound, x >= bound, detail=(
            f"output tokens/s with {r} replicas (steady round {steady_i}) "
            f"{steady['bench']['output_throughput']:.1f} vs 1 replica {pinned['output_throughput']:.1f}"))
    else:
        t[key] = _target(None, bound, False, detail="no steady round at the top replica count, or no pinned run")

    most = auto.get("replicas_running_max")
    t["autoscaled_replicas_max"] = _target(most, r, most is not None and most >= r,
                                           detail="most RUNNING engine replicas while the load ran")

    down = phases.get("scale_down", {})
    back = down.get("back_to_min")
    t["replicas_back_to_min"] = _target(back, True, back is True, detail=(
        f"1 RUNNING replica and none STOPPING {down['after_s']:.1f} s after the load stopped"
        if back else "not back to 1 replica within the timeout"))

    per = steady["per_replica"] if steady else {}
    counts = [row["requests"] for row in per.values()]
    if len(counts) >= 2 and max(counts) > 0:
        x = min(counts) / max(counts)
        t["per_replica_requests_min_over_max"] = _target(x, BALANCE_BOUND, x >= BALANCE_BOUND, counts=counts,
                                                         detail="requests each replica finished in the steady round")
    else:
        t["per_replica_requests_min_over_max"] = _target(None, BALANCE_BOUND, False, counts=counts,
                                                         detail="fewer than two replicas served the steady round")
    return t


def chart(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    env = rep.get("env", {})
    where = ("CPU dry run (CPU replicas, tiny random checkpoint; numbers mean nothing)" if rep.get("dry_run") else
             f"{env.get('gpu_count', '?')} x {env.get('gpu', '?')}, one engine replica per GPU")
    fig.suptitle(f"Orthrus Serve, {where}: concurrency {rep['settings']['concurrency']} over gRPC", fontsize=11)
    end = rep.get("elapsed_s") or 1.0

    a = ax[0, 0]
    states = rep.get("timeline", {}).get("replica_states", [])
    for name, style in (("RUNNING", "-"), ("STARTING", "--"), ("STOPPING", ":")):
        xs = [p["t"] for p in states] + [end]
        ys = [p["states"].get(name, 0) for p in states]
        if any(ys):
            a.step(xs, ys + ys[-1:], where="post", ls=style, label=name.lower())
    for (name, ph), color in zip(rep.get("phases", {}).items(), ("tab:gray", "tab:green", "tab:red")):
        if "start_s" in ph and ph.get("end_s") is not None:
            a.axvspan(ph["start_s"], ph["end_s"], color=color, alpha=0.12, label=name)
    a.set(xlabel="time since start (s)", ylabel="engine replicas", title="Replicas over time (Serve status)")

    a = ax[0, 1]
    for replica, series in sorted(rep.get("timeline", {}).get("replica_requests", {}).items()):
        a.step([p[0] for p in series], [p[1] for p in series], where="post", label=replica[:8])
    a.set(xlabel="time since start (s)", ylabel="requests finished", title="Requests per replica (Prometheus)")

    a = ax[1, 0]
    auto = rep.get("phases", {}).get("autoscaled", {})
    steady_i = auto.get("steady_round")
    if steady_i is not None:
        per = auto["rounds"][steady_i]["per_replica"]
        a.bar(range(len(per)), [row["requests"] for row in per.values()])
        a.set_xticks(range(len(per)), [r[:8] for r in per])
    a.set(ylabel="requests", title="Requests per replica in the steady round")

    a = ax[1, 1]
    labels, vals = [], []
    pinned = rep.get("phases", {}).get("pinned", {}).get("bench")
    if pinned:
        labels.append("pinned\n1 replica")
        vals.append(pinned["output_throughput"])
    for i, rd in enumerate(auto.get("rounds", [])):
        lo, hi = rd["replicas_running"]
        labels.append(f"round {i}\n{lo}-{hi} repl." + (" *" if i == steady_i else ""))
        vals.append(rd["bench"]["output_throughput"])
    a.bar(range(len(vals)), vals)
    a.set_xticks(range(len(vals)), labels, fontsize=7)
    a.set(ylabel="output tokens/s", title="Throughput per bench run (* steady round)")

    for a in ax.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_metrics_base(n: int = METRICS_SCAN, tries: int = 50) -> int:
    """A base port with n free ports after it (the dry run's; the GPU run keeps the file's)."""
    for _ in range(tries):
        base = _free_port()
        if base + n < 65536 and all(_port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def gpu_names() -> list[str]:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in p.stdout.splitlines() if line.strip()] if p.returncode == 0 else []


def gpu_slug(name: str) -> str:
    return name.replace("NVIDIA ", "").replace(" ", "-").lower()


def _commit() -> str:
    if os.environ.get("ORTHRUS_COMMIT"):
        return os.environ["ORTHRUS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


@contextlib.contextmanager
def local_ray(num_cpus: int, prefix: str, work: Optional[Path] = None):
    """A local Ray in Serve's namespace with a temp dir of its own; on exit Serve and Ray shut
    down and the temp dir (and `work`) go."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=num_cpus, namespace=SERVE_NAMESPACE, include_dashboard=False,
             _temp_dir=temp_dir)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)


def _deploy(cfg: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from deployment.cli import deploy, wait_running
    from deployment.config import SERVICER_FUNCTION

    funcs = cfg["grpc_options"].setdefault("grpc_servicer_functions", [])
    if SERVICER_FUNCTION not in funcs:
        funcs.append(SERVICER_FUNCTION)
    deploy(ServeDeploySchema.model_validate(cfg))
    err = wait_running([APP], timeout=900, log=log)
    if err:
        raise RuntimeError(err)


def run_phases(rep: dict, s: Settings, base: dict, ports: Ports, work: Path, save_report: Callable[[], None]) -> None:
    """Deploys, loads and watches; fills rep["phases"] and rep["timeline"] as it goes."""
    grpc_target = f"127.0.0.1:{ports.grpc}"
    mon = Monitor(s, serve_replica_states, lambda: scrape_replicas(ports.metrics))
    phases = rep["phases"]

    def save() -> None:
        rep["timeline"] = mon.snapshot()
        save_report()
    pinned_cfg, auto_cfg = build_config(base, s, ports, pinned=True), build_config(base, s, ports, pinned=False)
    rep["serve_config"] = {"pinned": _deployment(pinned_cfg["applications"][0], ENGINE),
                           "autoscaled": _deployment(auto_cfg["applications"][0], ENGINE),
                           "engine_args": auto_cfg["applications"][0]["args"]["engine"]}
    mon.start()
    try:
        # 1. One replica, autoscaling pinned.
        log("deploying with autoscaling pinned to 1 replica")
        _deploy(pinned_cfg)
        phases["pinned"] = {"deployed_s": mon.now()}
        log("warm-up round")
        run_bench(s, grpc_target, s.warmup_prompts, work / "warmup.json", seed=99)
        before = mon.sample_requests()
        phases["pinned"]["start_s"] = mon.now()
        log(f"pinned bench: {s.num_prompts} requests at concurrency {s.concurrency}")
        phases["pinned"]["bench"] = run_bench(s, grpc_target, s.num_prompts, work / "pinned.json", seed=0)
        phases["pinned"]["end_s"] = mon.now()
        phases["pinned"]["per_replica"] = delta(before, mon.sample_requests())
        phases["pinned"]["replicas_running"] = list(mon.running_between(phases["pinned"]["start_s"],
                                                                        phases["pinned"]["end_s"]))
        log("pinned:", round(phases["pinned"]["bench"]["output_throughput"], 1), "output tok/s")
        save()

        # 2. Autoscaling from 1 replica, rounds until one ran entirely at the top count.
        log(f"redeploying with autoscaling from 1 to {s.max_replicas} replicas")
        _deploy(auto_cfg)
        auto = phases["autoscaled"] = {"start_s": mon.now(), "rounds": [], "steady_round": None,
                                       "scaled_up_after_s": None}
        while True:
            before = mon.sample_requests()
            t0 = mon.now()
            i = len(auto["rounds"])
            bench = run_bench(s, grpc_target, s.num_prompts, work / f"round{i}.json", seed=1 + i)
            t1 = mon.now()
            mon.sample_states()
            rnd = {"start_s": t0, "end_s": t1, "bench": bench, "per_replica": delta(before, mon.sample_requests()),
                   "replicas_running": list(mon.running_between(t0, t1))}
            auto["rounds"].append(rnd)
            if auto["scaled_up_after_s"] is None:
                top = next((p["t"] for p in mon.states if p["t"] >= auto["start_s"]
                            and p["states"].get("RUNNING", 0) >= s.max_replicas), None)
                auto["scaled_up_after_s"] = None if top is None else round(top - auto["start_s"], 3)
            log(f"round {i}: {bench['output_throughput']:.1f} output tok/s, replicas {rnd['replicas_running']}, "
                f"per replica {[row['requests'] for row in rnd['per_replica'].values()]}")
            save()
            if rnd["replicas_running"][0] >= s.max_replicas:
                auto["steady_round"] = i
                break
            if t1 - auto["start_s"] > s.scale_up_timeout_s:
                log(f"no round at {s.max_replicas} replicas within {s.scale_up_timeout_s:.0f} s")
                break
        auto["end_s"] = mon.now()
        auto["replicas_running_max"] = mon.running_between(auto["start_s"], auto["end_s"])[1]

        # 3. Load stopped: back to min_replicas.
        down = phases["scale_down"] = {"start_s": mon.now(), "back_to_min": False, "after_s": None}
        limit = scale_down_timeout_s(auto_cfg, s)
        log(f"load stopped; watching the replicas go back to 1 (up to {limit:.0f} s)")
        while mon.now() - down["start_s"] < limit:
            st = mon.sample_states()
            if st.get("RUNNING", 0) == 1 and not st.get("STOPPING", 0) and not st.get("STARTING", 0):
                down.update(back_to_min=True, after_s=round(mon.now() - down["start_s"], 3))
                break
            time.sleep(s.sample_interval_s)
        down["end_s"] = mon.now()
        mon.sample_requests()
        log("back to 1 replica" if down["back_to_min"] else "still not back to 1 replica",
            f"after {down['end_s'] - down['start_s']:.1f} s")
    finally:
        mon.stop()
        rep["timeline"] = mon.snapshot()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--model", default=None, help="engine.model (default: the config's, the embedded SmolLM2)")
    ap.add_argument("--max-replicas", type=int, default=2, help="the autoscaled phase's max_replicas (<= GPUs)")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=1024, help="requests per bench round")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dataset", default="chat", help="`orthrus bench` built-in prompt set")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="two CPU replicas of a tiny random checkpoint, scaled-down load and clocks")
    ap.add_argument("--ingress", choices=INGRESS_MODES, default=DEFAULT_INGRESS,
                    help="how the bench reaches the replicas (deployment/ingress.py; default %(default)s)")
    args = ap.parse_args(argv)
    use_ingress(args.ingress)  # before Ray starts: its processes inherit it

    work = Path(tempfile.mkdtemp(prefix="orthrus-multi-gpu-"))
    if args.cpu_dry_run:
        from orthrus_runtime.model.testing import tiny_checkpoint

        s = dry_run_settings(tiny_checkpoint(work / "ckpt"))
        gpus: list[str] = []
        slug = "cpu"
    else:
        s = Settings(concurrency=args.concurrency, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                     dataset=args.dataset, max_replicas=args.max_replicas,
                     engine={"model": args.model} if args.model else {})
        gpus = gpu_names()
        if len(gpus) < 2 or len(gpus) < s.max_replicas:
            print(f"benchmarks/multi_gpu.py needs >= max(2, --max-replicas {s.max_replicas}) GPUs, found {len(gpus)}"
                  " (--cpu-dry-run checks the script without one)", file=sys.stderr)
            return 2
        slug = gpu_slug(gpus[0])
    if s.max_replicas < 2:
        print("--max-replicas must be >= 2", file=sys.stderr)
        return 2

    base = load_base_config()
    # The GPU run keeps the file's metrics port; the dry run may share the machine with other tests.
    metrics = free_metrics_base() if args.cpu_dry_run else int(base["applications"][0]["args"]["metrics_port"])
    ports = Ports(http=_free_port(), grpc=_free_port(), metrics=metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{slug}-multi-gpu" + (f"-{args.tag}" if args.tag else "")
    import ray

    rep: dict = {"commit": _commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "dry_run": args.cpu_dry_run, "config_file": str(CONFIG.relative_to(ROOT)), "ingress": args.ingress,
                 "env": {"gpus": gpus, "gpu": gpus[0] if gpus else "cpu", "gpu_count": len(gpus),
                         "ray": ray.__version__},
                 "settings": {k: v for k, v in asdict(s).items() if k not in ("engine", "engine_deployment",
                                                                              "autoscaling", "router_deployment")},
                 "phases": {}, "errors": {}}
    t_start = time.monotonic()

    def save() -> None:
        rep["targets"] = targets(rep)
        rep["elapsed_s"] = round(time.monotonic() - t_start, 1)
        (out / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        try:
            chart(rep, out / f"{stem}.png")
        except Exception:  # noqa: BLE001
            rep["errors"]["chart"] = traceback.format_exc()[-2000:]

    os.environ.update(s.ray_env)
    with local_ray(s.ray_num_cpus, "ormg", work):
        try:
            run_phases(rep, s, base, ports, work, save)
        except Exception:  # noqa: BLE001 - report what was measured, and why the rest was not
            rep["errors"]["run"] = traceback.format_exc()[-4000:]
            log("FAILED\n", rep["errors"]["run"])
    save()
    print(json.dumps(rep["targets"], indent=1))
    log("wrote", out / f"{stem}.json", "and .png")
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
