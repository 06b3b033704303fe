"""The Helm chart (helm/orthrus): rendered offline with helm-python-sdk (Helm v4's Go
library through ctypes; no cluster, no helm binary) and checked against the schemas
that will judge it on a cluster: Helm's strict lint, the chart's values schema,
KubeRay's RayService CRD, Kubernetes' own schemas (kubernetes-validate --strict) and
Ray Serve's config schema.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import importlib
import json
import os
import re
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "orthrus"
CONFIGS = ROOT / "deployment" / "configs"
DASHBOARD = CHART / "dashboards" / "orthrus.json"
RELEASE = "demo"
NAMESPACE = "llm"
# KubeRay's RayService CRD: CI keeps it beside the repository; an environment
# variable can point elsewhere. It is third-party data, never copied in here.
CRD_ENV = "ORTHRUS_KUBERAY_RAYSERVICE_CRD"
CRD_DEFAULT = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows.
KUBE_VERSIONS = ("1.26.0", kubernetes_validate.utils.latest_version())
CORE_KINDS = {"Service", "Secret", "ConfigMap", "NetworkPolicy"}
CUSTOM_KINDS = {"RayService", "PodMonitor", "ServiceMonitor"}


def _load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _defaults() -> dict:
    return _load_yaml(CHART / "values.yaml")


def _serve_with(mutate) -> dict:
    """The default `serve` block with `mutate(serve)` applied: lists (applications,
    deployments) are replaced whole by Helm, so value sets carry the whole block."""
    serve = copy.deepcopy(_defaults()["serve"])
    mutate(serve)
    return serve


def _deployment(serve: dict, name: str) -> dict:
    return next(d for d in serve["applications"][0]["deployments"] if d["name"] == name)


# The deployment that hosts the engines in the chart's default (gpu.yaml, colocated).
GPU_HOST = "OrthrusServer"


def _cpu_only_values() -> dict:
    # The project's own CPU config file, as a user would paste it in.
    return {
        "serve": _load_yaml(CONFIGS / "serve_config.yaml"),
        "workers": {"groupName": "cpu-workers", "gpusPerPod": 0, "tolerations": [],
                    "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}},
        # The CPU config's router asks for no CPU; a head with none keeps engines off it.
        "head": {"rayStartParams": {"num-cpus": "0"}},
        "sharedMemory": {"workers": "2Gi"},
    }


def _gpu_autoscaling_values() -> dict:
    def mutate(serve):
        eng = _deployment(serve, GPU_HOST)
        eng["autoscaling_config"].update(min_replicas=2, initial_replicas=3, max_replicas=8)
        eng["ray_actor_options"]["num_gpus"] = 2
        serve["applications"][0]["args"]["engine"].update(dtype="bfloat16", block_size=8)
    return {
        "serve": _serve_with(mutate),
        "model": {"source": "hub", "hub": {"repoId": "orthrus-org/Orthrus-Qwen3-8B", "revision": "v1.0",
                                            "include": ["*.json", "*.safetensors"],
                                            "tokenSecret": {"name": "hf-token"}}},
        "workers": {"gpusPerPod": 2,
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "ray-worker"}}}}]}},
                    "resources": {"requests": {"cpu": "16", "memory": "128Gi"},
                                  "limits": {"cpu": "16", "memory": "128Gi"}}},
        "apiKeys": {"enabled": True, "keys": ["sk-alpha", "sk-beta"]},
        "ray": {"authOptions": {"mode": "token"},
                "autoscaler": {"upscalingMode": "Aggressive", "idleTimeoutSeconds": 120}},
        "rayService": {"upgradeStrategy": {"type": "NewCluster"}},
        "monitoring": {"labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {"annotations": {"grafana_folder": "LLM"}},
        "networkPolicy": {"clients": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]},
        "services": {"http": {"type": "LoadBalancer", "port": 80, "annotations": {"example.com/lb": "internal"}}},
    }


def _quiet_values() -> dict:
    def mutate(serve):
        eng = _deployment(serve, GPU_HOST)
        del eng["autoscaling_config"]
        eng["num_replicas"] = 3
        serve["applications"][0]["args"]["api_keys_file"] = "/etc/orthrus/keys/api-keys"
    return {
        "serve": _serve_with(mutate),
        "apiKeys": {"enabled": True, "keys": ["sk-gamma"]},
        "model": {"source": "pvc", "pvc": {"claimName": "orthrus-models", "path": "orthrus-qwen3-1.7b"}},
        "monitoring": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "dashboard": {"enabled": False},
        "services": {"metrics": {"enabled": False}},
    }


def _servicemonitor_values() -> dict:
    return {
        "model": {"source": "image", "image": {"path": "/opt/models/orthrus-llama"}},
        "monitoring": {"kind": "ServiceMonitor"},
        "apiKeys": {"enabled": True, "existingSecret": "team-keys", "existingSecretKey": "keys"},
        "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    }


def _multi_gpu_values() -> dict:
    # The chart's own example file for one node with several GPUs, as shipped.
    return _load_yaml(CHART / "values-multi-gpu.yaml")


VALUE_SETS = {
    "default": dict,
    "multi-gpu": _multi_gpu_values,
    "cpu-only": _cpu_only_values,
    "gpu-autoscaling": _gpu_autoscaling_values,
    "monitoring-and-netpol-off": _quiet_values,
    "servicemonitor-image-model": _servicemonitor_values,
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def _render(chart, values: dict) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def _objects(chart, values: dict) -> list[dict]:
    docs = []
    for path, text in _render(chart, values).items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _one(objs: list[dict], kind: str, suffix: str = "") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} named *{suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _kinds(objs: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def _pod_templates(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    (worker,) = cluster["workerGroupSpecs"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": worker["template"]}


def _serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request, chart):
    values = VALUE_SETS[request.param]()
    return request.param, values, _objects(chart, values)


# ----------------------------------------------------------------- lint and render


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_strict_lint_passes(name):
    report = helm.lint(CHART, VALUE_SETS[name](), strict=True, namespace=NAMESPACE, kube_version="v1.31.0")
    assert report["total_charts_linted"] == 1
    findings = [m["error"] for m in report["messages"] if m["severity"] >= 2]
    # The one finding allowed is the absent optional dependency: Helm lints that
    # charts/ holds every Chart.yaml dependency, and kuberay-operator is only there
    # after `helm dependency build`, which needs the network (CI and this checkout
    # have none). The chart must not need it: it is off by default.
    missing = sorted(d["name"] for d in helm.dependency_list(CHART) if d["status"] == "missing")
    assert set(missing) <= {"kuberay-operator"}
    allowed = [f"chart directory is missing these dependencies: {','.join(missing)}"] if missing else []
    assert findings == allowed, report
    assert report["errors"] == allowed


def test_kuberay_operator_is_an_optional_dependency(chart):
    (dep,) = chart.metadata["dependencies"]
    assert dep["name"] == "kuberay-operator"
    assert dep["condition"] == "kuberay-operator.enabled"
    assert dep["repository"].startswith("https://")
    assert chart.values["kuberay-operator"] == {"enabled": False}
    assert chart.metadata["apiVersion"] == "v2"


def test_rendered_objects_per_value_set(rendered):
    name, values, objs = rendered
    expected = {
        "default": ["ConfigMap", "NetworkPolicy", "PodMonitor", "RayService", "Service", "Service", "Service"],
        "cpu-only": ["ConfigMap", "NetworkPolicy", "PodMonitor", "RayService", "Service", "Service", "Service"],
        "gpu-autoscaling": ["ConfigMap", "NetworkPolicy", "PodMonitor", "RayService", "Secret",
                            "Service", "Service", "Service"],
        "monitoring-and-netpol-off": ["RayService", "Secret", "Service", "Service"],
        "multi-gpu": ["ConfigMap", "NetworkPolicy", "PodMonitor", "RayService", "Service", "Service", "Service"],
        "servicemonitor-image-model": ["ConfigMap", "NetworkPolicy", "RayService", "Service", "Service", "Service",
                                       "ServiceMonitor"],
    }[name]
    assert _kinds(objs) == expected
    for o in objs:
        assert o["metadata"]["name"].startswith(f"{RELEASE}-orthrus")
        assert len(o["metadata"]["name"]) <= 63
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    rs = _one(objs, "RayService")
    # KubeRay derives cluster and Service names from it and refuses longer ones.
    assert len(rs["metadata"]["name"]) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rs["metadata"]["name"])


def test_notes_show_the_grpc_and_openai_clients(chart):
    notes = _render(chart, _gpu_autoscaling_values())["orthrus/templates/NOTES.txt"]
    assert "from openai import OpenAI" in notes
    assert 'base_url="http://localhost:80/v1"' in notes
    assert 'model="smollm2-135m-orthrus"' in notes
    assert "orthrus client --target localhost:9000 --application orthrus" in notes
    assert "from orthrus_runtime.client import OrthrusClient" in notes
    assert 'api_key=os.environ["ORTHRUS_API_KEY"]' in notes
    assert f"kubectl -n {NAMESPACE} get rayservice {RELEASE}-orthrus" in notes
    assert "2-8 engine replica(s)" in notes


# ----------------------------------------------------------------- schemas


def _crd_candidates() -> list[Path]:
    configured = os.environ.get(CRD_ENV)
    return ([Path(configured)] if configured else []) + [CRD_DEFAULT]


def _strict(node):
    """KubeRay's OpenAPI v3 schema as JSON Schema, with unknown fields refused, as
    the API server does with strict field validation (kubectl's default)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_validator():
    path = next((p for p in _crd_candidates() if p.is_file()), None)
    if path is None:
        pytest.skip(f"KubeRay's RayService CRD not found at {' nor '.join(map(str, _crd_candidates()))}; "
                    f"set {CRD_ENV} to its path")
    crd = _load_yaml(path)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_rayservice_validates_against_kuberay_crd(rendered, rayservice_validator):
    name, _, objs = rendered
    rs = _one(objs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator.iter_errors(rs), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_rayservice_crd_validation_catches_mistakes(rayservice_validator, chart):
    # The check above must be able to fail: a misspelt field and a mistyped value.
    rs = _one(_objects(chart, {}), "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    messages = {e.message for e in rayservice_validator.iter_errors(bad)}
    assert any("maxReplica" in m for m in messages), messages
    assert any("is not of type 'string'" in m for m in messages), messages


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_objects_validate_with_kubernetes_validate_strict(rendered, kube_version):
    _, _, objs = rendered
    assert {o["kind"] for o in objs} <= CORE_KINDS | CUSTOM_KINDS
    checked = [o for o in objs if o["kind"] in CORE_KINDS]
    # The RayService's pod templates are Pod specs: validate them as Pods too, which
    # KubeRay's CRD (a copy of the Pod schema) may lag behind.
    for role, tpl in _pod_templates(_one(objs, "RayService")).items():
        checked.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": f"{role}-template", **tpl["metadata"]}, "spec": tpl["spec"]})
    for obj in checked:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {kube_version}: {path}: {e.message}")


def test_serve_config_is_accepted_by_ray_serve(rendered):
    from ray.serve.schema import ServeDeploySchema

    _, _, objs = rendered
    config = _serve_config(_one(objs, "RayService"))
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "deployment.app:build_app"
    module_name, attr = app.import_path.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr))


def test_serve_config_args_build_the_application(rendered):
    # The rendered args go through the application's own validation (AppArgs,
    # EngineArgs) exactly as Serve passes them; building only binds deployments.
    from ray import serve

    from deployment.app import build_app

    _, _, objs = rendered
    (app,) = _serve_config(_one(objs, "RayService"))["applications"]
    assert isinstance(build_app(app["args"]), serve.Application)


def test_chart_defaults_are_the_gpu_serve_config(chart):
    # One source of truth: the chart ships deployment/configs/gpu.yaml as its default.
    assert chart.values["serve"] == _load_yaml(CONFIGS / "gpu.yaml")


@pytest.mark.parametrize("config", sorted({"serve_config.yaml", "gpu.yaml"} | {p.name for p in CONFIGS.glob("*.yaml")}))
def test_every_deployment_config_fits_the_values_schema(chart, config):
    chart.validate_schema(chart.merge_values({"serve": _load_yaml(CONFIGS / config)}))


def _schema_defs() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())["definitions"]


def test_values_schema_mirrors_the_code():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema,
                                  ServeDeploySchema)

    from deployment.app import AppArgs
    from orthrus_runtime.engine.args import EngineArgs

    defs = _schema_defs()
    names = lambda d: set(defs[d]["properties"])  # noqa: E731
    # Every engine argument and application arg, no more, no fewer.
    assert names("engineArgs") == {f.name for f in dataclasses.fields(EngineArgs)}
    assert names("appArgs") == {f.name for f in dataclasses.fields(AppArgs)}
    # Serve keys the chart accepts are Serve's own (a subset: the chart refuses the rest).
    for definition, model in [("serve", ServeDeploySchema), ("application", ServeApplicationSchema),
                              ("deployment", DeploymentSchema), ("autoscalingConfig", AutoscalingConfig),
                              ("rayActorOptions", RayActorOptionsSchema)]:
        assert names(definition) <= set(model.model_fields), definition


# ----------------------------------------------------------------- what the objects say


def test_worker_group_follows_engine_autoscaling(chart):
    rs = _one(_objects(chart, {}), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 4)
    assert group["idleTimeoutSeconds"] == cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    rs = _one(_objects(chart, _gpu_autoscaling_values()), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 3, 8)
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    assert cluster["authOptions"] == {"mode": "token"}
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert worker["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "podAntiAffinity" in worker["affinity"]
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_multi_gpu_example_runs_one_replica_per_gpu_on_one_node(chart):
    # The example's serve block is deployment/configs/gpu-multi.yaml, key for key.
    assert _multi_gpu_values()["serve"] == _load_yaml(CONFIGS / "gpu-multi.yaml")
    objs = _objects(chart, _multi_gpu_values())
    rs = _one(objs, "RayService")
    engine = _deployment(_serve_config(rs), "OrthrusEngine")
    auto = engine["autoscaling_config"]
    assert engine["ray_actor_options"]["num_gpus"] == 1
    cluster = rs["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    # One 1-GPU worker pod per engine replica, from min_replicas to max_replicas (the GPU count).
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (
        auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 1, 8)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    # A pod outlives the Serve replica it held by more than Serve's downscale delay.
    assert group["idleTimeoutSeconds"] > auto["downscale_delay_s"]
    worker = group["template"]["spec"]
    res = worker["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.count": str(auto["max_replicas"])}
    # Every worker on the first one's node: its own labels match the affinity term.
    (term,) = worker["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()
    head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not term["labelSelector"]["matchLabels"].items() <= head_labels.items()


def test_fixed_replicas_turn_ray_autoscaling_off(chart):
    rs = _one(_objects(chart, _quiet_values()), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (3, 3, 3)


def test_cpu_only_worker_group_has_no_gpu(chart):
    rs = _one(_objects(chart, _cpu_only_values()), "RayService")
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in k for part in res.values() for k in part)
    assert "tolerations" not in group["template"]["spec"]
    assert group["groupName"] == "cpu-workers"
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_worker_readiness_is_the_routers_ready_endpoint_and_the_head_keeps_kuberays(chart):
    """Worker pods are ready when their Serve proxy answers /ready (an engine replica running,
    not draining; answered without an engine's queue); null leaves KubeRay's default probes.
    The head and liveness stay KubeRay's."""
    rs = _one(_objects(chart, _defaults()), "RayService")
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    probe = worker["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": "serve"}
    assert any(p["name"] == "serve" for p in worker["ports"])
    assert "livenessProbe" not in worker
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head and "livenessProbe" not in head
    values = _defaults()
    values["workers"]["readinessProbe"] = None
    rs = _one(_objects(chart, values), "RayService")
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert "readinessProbe" not in group["template"]["spec"]["containers"][0]


def _engine_args(rs: dict) -> dict:
    return _serve_config(rs)["applications"][0]["args"]["engine"]


def _volume(spec: dict, name: str) -> dict:
    return next(v for v in spec["volumes"] if v["name"] == name)


def _mount(container: dict, name: str) -> dict | None:
    return next((m for m in container.get("volumeMounts", []) if m["name"] == name), None)


def test_model_sources(chart):
    # embedded: the image's SmolLM2, nothing mounted.
    rs = _one(_objects(chart, {}), "RayService")
    assert _engine_args(rs)["model"] is None
    worker = _pod_templates(rs)["worker"]["spec"]
    assert _mount(worker["containers"][0], "model") is None and "initContainers" not in worker

    # image: a path inside the image.
    rs = _one(_objects(chart, _servicemonitor_values()), "RayService")
    assert _engine_args(rs)["model"] == "/opt/models/orthrus-llama"

    # pvc: mounted read-only on every worker, the engine pointed inside it.
    rs = _one(_objects(chart, _quiet_values()), "RayService")
    worker = _pod_templates(rs)["worker"]["spec"]
    assert _volume(worker, "model")["persistentVolumeClaim"] == {"claimName": "orthrus-models", "readOnly": True}
    assert _mount(worker["containers"][0], "model") == {"name": "model", "mountPath": "/models", "readOnly": True}
    assert _engine_args(rs)["model"] == "/models/orthrus-qwen3-1.7b"
    assert _mount(_pod_templates(rs)["head"]["spec"]["containers"][0], "model") is None

    # hub: an init container downloads into an emptyDir the engine then reads.
    rs = _one(_objects(chart, _gpu_autoscaling_values()), "RayService")
    worker = _pod_templates(rs)["worker"]["spec"]
    (init,) = worker["initContainers"]
    cmd = init["command"]
    assert cmd[:3] == ["hf", "download", "orthrus-org/Orthrus-Qwen3-8B"]
    assert cmd[cmd.index("--revision") + 1] == "v1.0"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--include"] == ["*.json", "*.safetensors"]
    local_dir = cmd[cmd.index("--local-dir") + 1]
    assert _engine_args(rs)["model"] == local_dir == "/models/orthrus-org--Orthrus-Qwen3-8B"
    token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert _volume(worker, "model")["emptyDir"] == {"sizeLimit": "64Gi"}
    assert _mount(init, "model")["mountPath"] == "/models"
    assert _engine_args(rs)["dtype"] == "bfloat16" and _engine_args(rs)["block_size"] == 8


def test_compile_cache_volume_and_engine_argument(chart):
    # Default: an emptyDir on every worker, the engine's compile_cache_dir pointing into it.
    rs = _one(_objects(chart, {}), "RayService")
    worker = _pod_templates(rs)["worker"]["spec"]
    assert _volume(worker, "compile-cache") == {"name": "compile-cache", "emptyDir": {"sizeLimit": "2Gi"}}
    assert _mount(worker["containers"][0], "compile-cache") == {"name": "compile-cache",
                                                                "mountPath": "/var/cache/orthrus/triton"}
    assert _engine_args(rs)["compile_cache_dir"] == "/var/cache/orthrus/triton"
    # A PVC outlives the pods; disabled, nothing is mounted and the engine keeps Triton's default.
    rs = _one(_objects(chart, {"compileCache": {"pvc": {"claimName": "triton-cache"}}}), "RayService")
    assert _volume(_pod_templates(rs)["worker"]["spec"], "compile-cache")["persistentVolumeClaim"] == {
        "claimName": "triton-cache"}
    rs = _one(_objects(chart, {"compileCache": {"enabled": False}}), "RayService")
    assert all(v["name"] != "compile-cache" for v in _pod_templates(rs)["worker"]["spec"]["volumes"])
    assert "compile_cache_dir" not in _engine_args(rs)


def _env(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def test_ingress_mode_is_set_on_every_pod(chart):
    """haproxy (the default): Ray Serve's throughput-optimized mode on head and workers alike
    (HAProxy on each pod forwards to replicas anywhere); proxy: Ray's defaults, nothing set."""
    for mode, want in (("haproxy", "1"), ("proxy", None)):
        values = _defaults() if mode == "haproxy" else {**_defaults(), "ingress": "proxy"}
        for name, tpl in _pod_templates(_one(_objects(chart, values), "RayService")).items():
            container = tpl["spec"]["containers"][0]
            for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
                got = _env(container, var)
                assert (got and got["value"]) == want, (mode, name, var, got)


def test_api_keys_from_chart_secret_and_existing_secret(chart):
    objs = _objects(chart, _gpu_autoscaling_values())
    secret = _one(objs, "Secret", "-api-keys")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "sk-alpha,sk-beta"
    for tpl in _pod_templates(_one(objs, "RayService")).values():
        env = _env(tpl["spec"]["containers"][0], "ORTHRUS_API_KEYS")
        assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-keys"}

    objs = _objects(chart, _servicemonitor_values())
    assert not [o for o in objs if o["kind"] == "Secret"]
    for tpl in _pod_templates(_one(objs, "RayService")).values():
        container = tpl["spec"]["containers"][0]
        assert _env(container, "ORTHRUS_API_KEYS")["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "keys"}
        assert _env(container, "NCCL_DEBUG") == {"name": "NCCL_DEBUG", "value": "WARN"}

    # A key file: the Secret is mounted as a directory (so rotation reaches the
    # file), one key per line, and no variable duplicates the keys.
    def key_file(s):
        s["applications"][0]["args"]["api_keys_file"] = "/etc/orthrus/keys/api-keys"
    objs = _objects(chart, {"serve": _serve_with(key_file), "apiKeys": {"enabled": True, "keys": ["k1", "k2"]}})
    secret = _one(objs, "Secret", "-api-keys")
    assert base64.b64decode(secret["data"]["api-keys.txt"]).decode() == "k1\nk2\n"
    for tpl in _pod_templates(_one(objs, "RayService")).values():
        container = tpl["spec"]["containers"][0]
        assert _env(container, "ORTHRUS_API_KEYS") is None
        assert _mount(container, "api-keys") == {"name": "api-keys", "mountPath": "/etc/orthrus/keys", "readOnly": True}
        vol = _volume(tpl["spec"], "api-keys")["secret"]
        assert vol["secretName"] == secret["metadata"]["name"]
        assert vol["items"] == [{"key": "api-keys.txt", "path": "api-keys"}]
    # ... or the user's own Secret, mounted the same way.
    objs = _objects(chart, {"serve": _serve_with(key_file),
                            "apiKeys": {"enabled": True, "existingSecret": "vault-keys", "existingSecretKey": "lines"}})
    vol = _volume(_pod_templates(_one(objs, "RayService"))["worker"]["spec"], "api-keys")["secret"]
    assert (vol["secretName"], vol["items"]) == ("vault-keys", [{"key": "lines", "path": "api-keys"}])

    # ... or a volume of the user's own (e.g. a CSI secret store) at the file's directory.
    objs = _objects(chart, {"serve": _serve_with(key_file),
                            "extraVolumes": [{"name": "csi-keys", "csi": {"driver": "secrets-store.csi.k8s.io",
                                                                          "readOnly": True}}],
                            "extraVolumeMounts": [{"name": "csi-keys", "mountPath": "/etc/orthrus/keys"}]})
    worker = _pod_templates(_one(objs, "RayService"))["worker"]["spec"]
    assert _mount(worker["containers"][0], "csi-keys")["mountPath"] == "/etc/orthrus/keys"
    assert not any(v["name"] == "api-keys" for v in worker["volumes"])

    # Keys off: no Secret and no variable, so the application runs without auth.
    objs = _objects(chart, {})
    assert not [o for o in objs if o["kind"] == "Secret"]
    for tpl in _pod_templates(_one(objs, "RayService")).values():
        assert _env(tpl["spec"]["containers"][0], "ORTHRUS_API_KEYS") is None


def test_dashboard_configmap_is_the_dashboard_file_byte_for_byte(chart):
    cm = _one(_objects(chart, _gpu_autoscaling_values()), "ConfigMap", "-dashboard")
    assert cm["data"]["orthrus.json"].encode("utf-8") == DASHBOARD.read_bytes()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


def _container_ports(tpl: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in tpl["spec"]["containers"][0]["ports"]}


def test_services_reach_the_serve_proxies(rendered):
    _, values, objs = rendered
    rs = _one(objs, "RayService")
    templates = _pod_templates(rs)
    config = _serve_config(rs)
    for tpl in templates.values():
        ports = _container_ports(tpl)
        assert ports["serve"] == config["http_options"]["port"]
        assert ports["grpc"] == config["grpc_options"]["port"]
        assert ports["metrics"] == 8080
        assert ports["orthrus-metrics"] == config["applications"][0]["args"]["metrics_port"]
        # KubeRay adds ray.io/serve; everything else in a selector must be on the pods.
        for svc in (o for o in objs if o["kind"] == "Service"):
            selector = {k: v for k, v in svc["spec"]["selector"].items() if k != "ray.io/serve"}
            assert selector.items() <= tpl["metadata"]["labels"].items()
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in ports
    for proto, port in (("http", "serve"), ("grpc", "grpc")):
        svc = _one(objs, "Service", f"-{proto}")
        assert svc["spec"]["selector"]["ray.io/serve"] == "true"
        (p,) = svc["spec"]["ports"]
        assert p["targetPort"] == port
        assert p["port"] == values.get("services", {}).get(proto, {}).get("port", 8000 if proto == "http" else 9000)
    # Ray exports its metrics on the port the pods declare and Prometheus scrapes.
    for group in [rs["spec"]["rayClusterConfig"]["headGroupSpec"], *rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_scrape_config_targets_declared_ports(chart):
    objs = _objects(chart, {})
    templates = _pod_templates(_one(objs, "RayService"))
    pm = _one(objs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics", "orthrus-metrics"]
    for tpl in templates.values():
        assert pm["spec"]["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
        assert {"metrics", "orthrus-metrics"} <= set(_container_ports(tpl))

    objs = _objects(chart, _servicemonitor_values())
    sm = _one(objs, "ServiceMonitor")
    svc = _one(objs, "Service", "-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # Only the metrics Service matches the ServiceMonitor.
    selected = [s["metadata"]["name"] for s in objs if s["kind"] == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert selected == [svc["metadata"]["name"]]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in svc["spec"]["ports"]]

    # metrics_port null: the application serves no Orthrus metrics, so nothing scrapes them.
    serve = _serve_with(lambda s: s["applications"][0]["args"].update(metrics_port=None))
    objs = _objects(chart, {"serve": serve})
    assert [e["port"] for e in _one(objs, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert "orthrus-metrics" not in _container_ports(_pod_templates(_one(objs, "RayService"))["worker"])


def test_network_policy(chart):
    objs = _objects(chart, _gpu_autoscaling_values())
    np_ = _one(objs, "NetworkPolicy")
    templates = _pod_templates(_one(objs, "RayService"))
    for tpl in templates.values():
        assert np_["spec"]["podSelector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
    declared = set(_container_ports(templates["head"])) | set(_container_ports(templates["worker"]))
    rules = np_["spec"]["ingress"]
    for rule in rules:
        assert {p["port"] for p in rule.get("ports", [])} <= declared
    # Ray's pods talk to each other on any port; clients only reach HTTP and gRPC.
    assert rules[0] == {"from": [{"podSelector": np_["spec"]["podSelector"]}]}
    client_rule = next(r for r in rules if {p["port"] for p in r.get("ports", [])} == {"serve", "grpc"})
    assert client_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    operator_rule = rules[-1]
    assert operator_rule["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


def test_pods_run_locked_down(rendered):
    _, _, objs = rendered
    rs = _one(objs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    containers = []
    for tpl in _pod_templates(rs).values():
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            containers.append(c)
            # Ray writes only to /tmp, $HOME and /dev/shm: each is a volume.
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/home/ray"}
        assert _volume(spec, "dshm")["emptyDir"]["medium"] == "Memory"
    if cluster["enableInTreeAutoscaling"]:
        containers.append(cluster["autoscalerOptions"])
    for c in containers:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert _pod_templates(rs)["worker"]["spec"]["automountServiceAccountToken"] is False


def test_dockerfile_matches_the_chart():
    dockerfile = (ROOT / "Dockerfile").read_text()
    defaults = _defaults()
    ray_pin = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert ray_pin and ray_pin.group(1) == defaults["ray"]["version"]
    user = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    sc = defaults["podSecurityContext"]
    assert user[-1] == (str(sc["runAsUser"]), str(sc["runAsGroup"]))
    assert re.search(r"^FROM nvidia/cuda:", dockerfile, re.M)
    assert "flash-attn" in dockerfile
    # KubeRay probes pods with wget and starts Ray through bash.
    assert re.search(r"apt-get install(?:[^\n]|\\\n)*\bwget\b", dockerfile)


# ----------------------------------------------------------------- refused values


def _engine_autoscaling(**kw):
    return {"serve": _serve_with(lambda s: _deployment(s, GPU_HOST)["autoscaling_config"].update(kw))}


def _fixed_replicas(n: int):
    def mutate(serve):
        dep = _deployment(serve, GPU_HOST)
        del dep["autoscaling_config"]
        dep["num_replicas"] = n
    return {"serve": _serve_with(mutate)}


BAD_VALUES = {
    "negative min_replicas": (
        _engine_autoscaling(min_replicas=-1),
        "at '/serve/applications/0/deployments/0/autoscaling_config/min_replicas': minimum: got -1, want 0"),
    "negative num_replicas": (
        _fixed_replicas(-2),
        "at '/serve/applications/0/deployments/0/num_replicas': minimum: got -2, want 0"),
    "negative gpusPerPod": (
        {"workers": {"gpusPerPod": -1}}, "at '/workers/gpusPerPod': minimum: got -1, want 0"),
    "an unknown ingress": (
        {"ingress": "nginx"}, "at '/ingress': value must be one of 'haproxy', 'proxy'"),
    "unknown top-level key": (
        {"replicas": 3}, "at '': additional properties 'replicas' not allowed"),
    "unknown engine argument": (
        {"serve": _serve_with(lambda s: s["applications"][0]["args"]["engine"].update(blocksize=8))},
        "at '/serve/applications/0/args/engine': additional properties 'blocksize' not allowed"),
    "misspelt worker key": (
        {"workers": {"gpus": 2}}, "at '/workers': additional properties 'gpus' not allowed"),
    "non-string rayStartParams": (
        {"head": {"rayStartParams": {"num-cpus": 1}}}, "at '/head/rayStartParams/num-cpus': got number, want string"),
    "pvc without a claim": (
        {"model": {"source": "pvc"}}, "at '/model/pvc/claimName': minLength: got 0, want 1"),
    "bad dtype": (
        {"serve": _serve_with(lambda s: s["applications"][0]["args"]["engine"].update(dtype="fp8"))},
        "at '/serve/applications/0/args/engine/dtype'"),
    "num_replicas beside autoscaling_config": (
        {"serve": _serve_with(lambda s: _deployment(s, GPU_HOST).update(num_replicas=2))},
        "at '/serve/applications/0/deployments/0/num_replicas': value must be 'left out: autoscaling_config sets"),
    "unknown model source": (
        {"model": {"source": "s3"}}, "at '/model/source': value must be one of 'embedded', 'image', 'pvc', 'hub'"),
    "api key with a comma": (
        {"apiKeys": {"enabled": True, "keys": ["a,b"]}}, "at '/apiKeys/keys/0'"),
}

# Cross-field rules JSON Schema cannot state; the chart checks them before rendering.
BAD_COMBINATIONS = {
    "max_replicas below min_replicas": (
        _engine_autoscaling(min_replicas=5, max_replicas=2),
        "OrthrusServer autoscaling_config: max_replicas (2) must be >= min_replicas (5)"),
    "initial_replicas outside the bounds": (
        _engine_autoscaling(min_replicas=1, max_replicas=4, initial_replicas=6),
        "initial_replicas (6) must lie between min_replicas (1) and max_replicas (4)"),
    "GPUs per pod differ from the engine's": (
        {"workers": {"gpusPerPod": 2}},
        "workers.gpusPerPod (2) must equal OrthrusServer ray_actor_options.num_gpus (1)"),
    "CPU-only pods with a GPU engine": (
        {"workers": {"gpusPerPod": 0}},
        "workers.gpusPerPod is 0 (CPU-only) but OrthrusServer ray_actor_options.num_gpus is 1"),
    "engine that would fit the head": (
        {**_cpu_only_values(), "head": {"rayStartParams": {"num-cpus": "4"}}},
        "OrthrusEngine needs 1 CPUs and no GPU, which fits the head"),
    "model path set twice": (
        {"model": {"source": "image", "image": {"path": "/m"}},
         "serve": _serve_with(lambda s: s["applications"][0]["args"]["engine"].update(model="/other"))},
        "leave serve.applications[0].args.engine.model null"),
    "API keys without a way to pass them in": (
        {"apiKeys": {"enabled": True, "keys": ["k"]},
         "serve": _serve_with(lambda s: s["applications"][0]["args"].update(api_keys_env=None))},
        "apiKeys.enabled needs serve.applications[0].args.api_keys_file"),
    "a key file nothing mounts": (
        {"serve": _serve_with(lambda s: s["applications"][0]["args"].update(api_keys_file="/etc/keys/k"))},
        'args.api_keys_file is "/etc/keys/k" but apiKeys.enabled is false '
        'and no extraVolumeMounts entry mounts /etc/keys'),
    "a key file on another volume": (
        {"apiKeys": {"enabled": True, "keys": ["k"]},
         "serve": _serve_with(lambda s: s["applications"][0]["args"].update(api_keys_file="/home/ray/keys"))},
        "the chart mounts the keys Secret on /home/ray, which already holds another volume"),
    "release name that is no DNS-1035 label": (
        {"fullnameOverride": "9lives"}, 'the RayService name "9lives" must be a DNS-1035 label'),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused_by_the_schema(chart, case):
    values, message = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(chart.merge_values(values))
    assert message in str(schema_error.value)
    # Install and lint refuse them too, with the same message.
    with pytest.raises(helm.HelmValuesError) as render_error:
        _render(chart, values)
    assert message in str(render_error.value)
    report = helm.lint(CHART, values, strict=True)
    assert any(message in e for e in report["errors"]), report


@pytest.mark.parametrize("case", sorted(BAD_COMBINATIONS))
def test_inconsistent_values_are_refused_before_rendering(chart, case):
    values, message = BAD_COMBINATIONS[case]
    chart.validate_schema(chart.merge_values(values))  # each value alone is fine
    with pytest.raises(helm.HelmRenderError) as error:
        _render(chart, values)
    assert message in str(error.value)


def test_missing_dashboard_fails_with_a_clear_message(tmp_path, chart):
    # A chart copy without its dashboard: the ConfigMap is refused, not rendered empty.
    copy_dir = Path(chart.save_dir(tmp_path))
    (copy_dir / "dashboards" / "orthrus.json").unlink()
    with helm.Chart.load(copy_dir) as broken:
        with pytest.raises(helm.HelmRenderError, match="dashboards/orthrus.json is missing"):
            _render(broken, {})
        assert "ConfigMap" not in _kinds(_objects(broken, {"dashboard": {"enabled": False}}))
