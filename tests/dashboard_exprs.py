"""Reads the Grafana dashboard's PromQL so tests can check and evaluate it."""
from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "helm" / "orthrus" / "dashboards" / "orthrus.json"

# What Grafana would put in place of its variables when "All" is selected.
DEFAULT_SUBST = {"$__rate_interval": "1m", "$model": ".*", "$replica": ".*", "$application": ".*"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dash: dict) -> list[dict]:
    """Every panel that shows data (rows only group them), nested rows included."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def expressions(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [(p["title"], t["expr"]) for p in data_panels(dash) for t in p.get("targets", [])]


def substitute(expr: str, subst: dict[str, str] | None = None) -> str:
    subst = {**DEFAULT_SUBST, **(subst or {})}
    # Longest names first: $__rate_interval must not be cut by a shorter variable.
    for k in sorted(subst, key=len, reverse=True):
        expr = expr.replace(k, subst[k])
    left = re.findall(r"\$\{?\w+", expr)
    if left:
        raise ValueError(f"unsubstituted variable(s) {left} in {expr}")
    return expr


METRIC_RE = re.compile(r"\b((?:orthrus|ray)_[a-zA-Z0-9_]+)\b")


def metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))
