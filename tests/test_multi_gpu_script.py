"""benchmarks/multi_gpu.py on the CPU: the Serve configs it builds from
deployment/configs/gpu-multi.yaml, its reading of the replicas' Prometheus
endpoints, its targets, and a whole dry run (two CPU replicas of a tiny random
checkpoint: pinned to 1, autoscaled to 2 under load, back to 1 after) writing the
report and chart."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multi_gpu as mg  # noqa: E402

from orthrus_runtime.metrics import OrthrusMetrics  # noqa: E402
from orthrus_runtime.types import RequestRecord  # noqa: E402

PORTS = mg.Ports(http=18000, grpc=19000, metrics=18085)


def _engine(cfg: dict) -> dict:
    return mg._deployment(cfg["applications"][0], mg.ENGINE)


def test_configs_pin_then_autoscale_the_shipped_file():
    from ray.serve.schema import ServeDeploySchema

    from deployment.app import AppArgs

    base = mg.load_base_config()
    s = mg.Settings(max_replicas=3, engine={"model": "/models/x.gguf"})
    pinned = mg.build_config(base, s, PORTS, pinned=True)
    auto = mg.build_config(base, s, PORTS, pinned=False)
    assert base == mg.load_base_config()  # the file's config is not modified
    for cfg in (pinned, auto):
        ServeDeploySchema.model_validate(cfg)
        args = AppArgs.from_dict(cfg["applications"][0]["args"])  # what build_app checks
        assert (args.metrics_port, args.model_id, args.api_keys_env) == (PORTS.metrics, mg.MODEL_ID, None)
        assert args.engine["model"] == "/models/x.gguf" and args.engine["device"] == "auto"
        assert (cfg["http_options"]["port"], cfg["grpc_options"]["port"]) == (PORTS.http, PORTS.grpc)
    a_pin, a_auto = _engine(pinned)["autoscaling_config"], _engine(auto)["autoscaling_config"]
    assert (a_pin["min_replicas"], a_pin["initial_replicas"], a_pin["max_replicas"]) == (1, 1, 1)
    assert (a_auto["min_replicas"], a_auto["initial_replicas"], a_auto["max_replicas"]) == (1, 1, 3)
    # Only the bounds differ between the phases, so the switch is Serve's lightweight update;
    # every other autoscaling setting is the shipped file's.
    shipped = _engine(base)["autoscaling_config"]
    bounds = {"min_replicas", "initial_replicas", "max_replicas"}
    assert {k: v for k, v in a_pin.items() if k not in bounds} == {k: v for k, v in shipped.items() if k not in bounds}
    assert {k: v for k, v in a_auto.items() if k not in bounds} == {k: v for k, v in shipped.items() if k not in bounds}
    assert _engine(auto)["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 2}
    # The dry run's overrides land on top: CPU replicas, short autoscaler clocks.
    dry = mg.build_config(base, mg.dry_run_settings(Path("/tmp/ckpt")), PORTS, pinned=False)
    ServeDeploySchema.model_validate(dry)
    eng = _engine(dry)
    assert eng["ray_actor_options"] == {"num_gpus": 0, "num_cpus": 0}
    assert eng["autoscaling_config"]["downscale_delay_s"] < shipped["downscale_delay_s"]
    assert dry["applications"][0]["args"]["engine"]["device"] == "cpu"
    assert mg.scale_down_timeout_s(dry, mg.dry_run_settings(Path("/tmp/ckpt"))) == 20 + 2 + 60


def _registry_text(model: str, replica: str, finished: int, tokens_each: int) -> str:
    m = OrthrusMetrics(model, replica)
    for i in range(finished):
        t = 100.0 + i
        m.on_request_finished(RequestRecord(
            request_id=f"r{i}", mode="orthrus" if i % 2 else "ar", finish_reason="length" if i % 3 else "stop",
            prompt_tokens=5, completion_tokens=tokens_each, arrival_time=t, first_scheduled_time=t + 0.01,
            first_token_time=t + 0.02, finished_time=t + 1, emissions=[(t + 0.5, tokens_each - 1)]))
    return generate_latest(m.registry).decode()


def test_replica_counts_from_real_registries():
    engine = _registry_text(mg.MODEL_ID, "rep-a", finished=5, tokens_each=1)
    assert mg.parse_replica_counts(engine) == {"rep-a": {"requests": 5, "generation_tokens": 5}}
    # A router's registry (errors only) and another model's engine count for nothing.
    router = OrthrusMetrics(mg.MODEL_ID, "router-1")
    router.on_request_error("503", "grpc")
    assert mg.parse_replica_counts(generate_latest(router.registry).decode()) == {}
    assert mg.parse_replica_counts(_registry_text("other-model", "rep-b", 3, 1)) == {}
    before = {"rep-a": {"requests": 2, "generation_tokens": 2}}
    after = {"rep-a": {"requests": 5, "generation_tokens": 5}, "rep-c": {"requests": 4, "generation_tokens": 9}}
    assert mg.delta(before, after) == {"rep-a": {"requests": 3, "generation_tokens": 3},
                                       "rep-c": {"requests": 4, "generation_tokens": 9}}


def _report(pinned_tps=100.0, steady_tps=190.0, per_replica=(50, 45), most=2, back=True) -> dict:
    per = {f"r{i}": {"requests": n, "generation_tokens": 10 * n} for i, n in enumerate(per_replica)}
    return {"settings": {"max_replicas": 2, "concurrency": 128},
            "phases": {"pinned": {"bench": {"output_throughput": pinned_tps}},
                       "autoscaled": {"rounds": [{"bench": {"output_throughput": 120.0}, "per_replica": {}},
                                                 {"bench": {"output_throughput": steady_tps}, "per_replica": per}],
                                      "steady_round": 1, "replicas_running_max": most},
                       "scale_down": {"back_to_min": back, "after_s": 130.0}}}


def test_targets():
    t = mg.targets(_report())
    assert set(t) == {"throughput_2_replicas_vs_1_c128", "autoscaled_replicas_max", "replicas_back_to_min",
                      "per_replica_requests_min_over_max"}
    assert all(v["met"] for v in t.values()), t
    assert t["throughput_2_replicas_vs_1_c128"]["measured"] == pytest.approx(1.9)
    assert t["throughput_2_replicas_vs_1_c128"]["bound"] == 1.8
    assert t["per_replica_requests_min_over_max"]["measured"] == pytest.approx(0.9)
    # Each bound can fail.
    t = mg.targets(_report(steady_tps=170.0, per_replica=(60, 40), most=1, back=False))
    assert not any(v["met"] for v in t.values()), t
    # No steady round (never scaled up): measured None, unmet, no exception.
    rep = _report()
    rep["phases"]["autoscaled"]["steady_round"] = None
    t = mg.targets(rep)
    assert t["throughput_2_replicas_vs_1_c128"]["measured"] is None and not t["throughput_2_replicas_vs_1_c128"]["met"]
    assert not t["per_replica_requests_min_over_max"]["met"]
    # A run that stopped before the autoscaled phase still yields every target.
    t = mg.targets({"settings": {"max_replicas": 2, "concurrency": 128}, "phases": {}})
    assert len(t) == 4 and not any(v["met"] for v in t.values())


def test_monitor_keeps_change_points_and_running_bounds():
    states = iter([{"RUNNING": 1}, {"RUNNING": 1}, {"RUNNING": 1, "STARTING": 1}, {"RUNNING": 2}])
    clock = iter([100.0, 100.0, 102.0, 105.0])  # t0, then one reading per change
    mon = mg.Monitor(mg.Settings(), lambda: next(states), lambda: {}, clock=lambda: next(clock))
    for _ in range(4):
        mon.sample_states()
    # Only changes are kept, each at the time it was first seen.
    assert mon.states == [{"t": 0.0, "states": {"RUNNING": 1}}, {"t": 2.0, "states": {"RUNNING": 1, "STARTING": 1}},
                          {"t": 5.0, "states": {"RUNNING": 2}}]
    assert mon.running_between(0.0, 5.0) == (1, 2)
    assert mon.running_between(1.0, 4.9) == (1, 1)  # a state holds until the next change point
    assert mon.running_between(5.0, 60.0) == (2, 2)
    snap = copy.deepcopy(mon.snapshot())
    assert snap["replica_states"] == mon.states and snap["monitor_errors"] == []


@pytest.mark.timeout(600)
def test_dry_run_scales_up_and_down_and_writes_the_report(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--cpu-dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("*-cpu-multi-gpu.json")
    assert path.with_suffix(".png").stat().st_size > 10_000
    rep = json.loads(path.read_text())
    assert rep["errors"] == {} and rep["dry_run"] is True
    n = rep["settings"]["num_prompts"]
    pinned, auto, down = (rep["phases"][k] for k in ("pinned", "autoscaled", "scale_down"))
    assert pinned["bench"]["completed"] == n and pinned["replicas_running"] == [1, 1]
    # Every request is counted once, by the replica that served it.
    assert sum(row["requests"] for row in pinned["per_replica"].values()) == n
    steady = auto["rounds"][auto["steady_round"]]
    assert steady["replicas_running"] == [2, 2] and steady["bench"]["completed"] == n
    assert len(steady["per_replica"]) == 2 and sum(row["requests"] for row in steady["per_replica"].values()) == n
    # The pinned phase's replica is kept by the switch to autoscaling (a lightweight update).
    assert set(pinned["per_replica"]) < set(steady["per_replica"])
    assert auto["scaled_up_after_s"] > 0 and down["back_to_min"] is True
    states = [p["states"] for p in rep["timeline"]["replica_states"]]
    assert {"RUNNING": 2} in states and states[-1] == {"RUNNING": 1}
    t = rep["targets"]
    assert set(t) == {"throughput_2_replicas_vs_1_c8", "autoscaled_replicas_max", "replicas_back_to_min",
                      "per_replica_requests_min_over_max"}
    # The mechanics are real on the CPU too; the throughput ratio of two CPU replicas on shared cores is not.
    assert t["autoscaled_replicas_max"]["met"] and t["replicas_back_to_min"]["met"]
    assert t["throughput_2_replicas_vs_1_c8"]["measured"] > 0
    assert all(set(v) >= {"measured", "bound", "met"} for v in t.values())
