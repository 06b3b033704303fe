"""Structural check of the Grafana dashboard shipped in the Helm chart.

Its PromQL is evaluated against a live Prometheus in test_prometheus_e2e.py; here:
importability (schema, variables, ids, layout), every panel has queries and a unit,
every metric it names exists, and every expression parses (promtool).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboard_exprs import DASHBOARD, data_panels, expressions, load_dashboard, metric_names, substitute
from orthrus_runtime.metrics import OrthrusMetrics

DS_REF = "${datasource}"


@pytest.fixture(scope="module")
def dash() -> dict:
    return load_dashboard()


def test_top_level(dash):
    assert DASHBOARD.relative_to(DASHBOARD.parents[3]).as_posix() == "helm/orthrus/dashboards/orthrus.json"
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and len(dash["uid"]) <= 40
    assert dash["title"]
    assert "id" not in dash or dash["id"] is None  # a fixed id would clash on import


def test_template_variables(dash):
    vars_ = {v["name"]: v for v in dash["templating"]["list"]}
    ds = vars_["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("model", "replica"):
        v = vars_[name]
        assert v["type"] == "query"
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})")
        assert v["datasource"]["uid"] == DS_REF
        assert v["includeAll"] and v["allValue"] == ".*"
    # The replica list follows the chosen model.
    assert "$model" in vars_["replica"]["query"]["query"]


def test_panel_ids_unique_and_layout_fits(dash):
    ids = [p["id"] for p in dash["panels"]] + [q["id"] for p in dash["panels"] for q in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for dx in range(g["w"]):
            for dy in range(g["h"]):
                cell = (g["x"] + dx, g["y"] + dy)
                assert cell not in cells, f"panel {p['title']!r} overlaps another"
                cells.add(cell)


def test_every_panel_has_queries_datasource_and_unit(dash):
    panels = data_panels(dash)
    assert len(panels) >= 15
    for p in panels:
        assert p.get("targets"), f"{p['title']}: no query"
        assert p["datasource"]["uid"] == DS_REF, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == DS_REF


def test_required_views_present(dash):
    titles = " | ".join(p["title"].lower() for p in data_panels(dash))
    for needle in ("output tokens/s", "requests/s", "mean acceptance length", "acceptance rate",
                   "acceptance by draft position", "time to first token", "inter-token latency",
                   "end-to-end latency", "running and waiting", "kv cache usage", "healthy", "errors",
                   "choices/s", "scored by echo"):
        assert needle in titles, needle
    exprs = " ".join(e for _, e in expressions(dash))
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(orthrus_time_to_first_token_seconds_bucket" in exprs
    assert "ray_serve_autoscaling_target_replicas" in exprs
    assert "ray_serve_deployment_replica_healthy" in exprs


def _orthrus_sample_names() -> set[str]:
    met = OrthrusMetrics("m", "r")
    names = set()
    for fam in met.registry.collect():
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update({fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"})
        else:
            names.add(fam.name)
    return names


def _ray_serve_metric_names() -> set[str]:
    """Metric names Ray Serve defines, from its source (Ray exports them with the ray_ prefix)."""
    # Located without importing ray, which is slow to import.
    src = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "serve" / "_private"
    names = set()
    for f in src.rglob("*.py"):
        names.update(re.findall(r'"(serve_[a-z_]+)"', f.read_text(errors="replace")))
    return {"ray_" + n for n in names}


def test_every_metric_exists(dash):
    known = _orthrus_sample_names() | _ray_serve_metric_names()
    for title, expr in expressions(dash):
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        unknown = names - known
        assert not unknown, f"{title}: unknown metric(s) {unknown}"
    for v in load_dashboard()["templating"]["list"]:
        if v["type"] == "query":
            assert metric_names(v["query"]["query"]) <= known


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_every_expression_parses(dash, tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(expressions(dash))]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # And promtool does reject broken PromQL, so the check above means something.
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(a[1m])"}]}]}))
    bad = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
